"""The one generation engine: batched decoding with left padding and a KV cache, and log-prob scoring.

`lm2 generate`, `lm2 chat`, the needle evaluation and RLHF's PPO rollouts all call `generate`, so its
signature is a stable API:

    generate(model, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0, top_k=0,
             stop_ids=None, seed=None, batch_size=16, pad_id=0, include_stop=False) -> list[list[int]]

- `prompts` are token-id lists (BOS and chat template already applied); the result holds, per
  prompt and in the input order, only the new tokens.
- Decoding stops at `max_new_tokens` or at the first token in `stop_ids`. That stop token is left
  out of the result unless `include_stop=True` (PPO wants it, to score the sequence at its end).
  `stop_ids=None` means `default_stop_ids(model)`: `</s>` and `<|im_end|>` (SPEC P9). Pass `()` to
  always decode `max_new_tokens` tokens.
- `temperature == 0` is greedy (argmax, ties to the lowest id). Otherwise logits are divided by the
  temperature, cut to the `top_k` most likely ids (0 = off) and to the smallest nucleus of mass
  `top_p` (1.0 = off), then sampled. With a `seed` the samples are reproducible for the same
  prompts, order and `batch_size`; without one they draw from torch's global RNG.
- Prompts are decoded `batch_size` at a time, longest first (less padding), left-padded with
  `pad_id` under an attention mask, so the pad id never matters. A row that has finished is
  dropped from the batch, so it costs nothing afterwards.

`score_logprobs(model, input_ids, attention_mask)` gives each token's log-probability under the
model, in chunks so the [B, T, V] logits never exist at once.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .errors import InputError
from .model import InternLM2, KVCache


def default_stop_ids(model: InternLM2) -> tuple[int, ...]:
    """`</s>` and `<|im_end|>`: the six chat tokens are the vocabulary's last ids and `<|im_end|>` is the
    second to last (SPEC §3.3 step 4), so this holds for lm2 vocabularies and InternLM2's (92542)."""
    cfg = model.config
    return (int(cfg.eos_token_id), int(cfg.vocab_size) - 2)


@torch.inference_mode()
def generate(
    model: InternLM2,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Optional[Iterable[int]] = None,
    seed: Optional[int] = None,
    batch_size: int = 16,
    pad_id: int = 0,
    include_stop: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt, in input order (see the module docstring for the contract)."""
    _check_args(prompts, max_new_tokens, temperature, top_p, top_k, batch_size)
    stops = tuple(default_stop_ids(model) if stop_ids is None else stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        gen = None
        if seed is not None and temperature > 0:
            gen = torch.Generator(device=_device(model)).manual_seed(int(seed) + b)
        outs = _generate_batch(model, [prompts[i] for i in idx], max_new_tokens, temperature, top_p, top_k,
                               stops, gen, pad_id, include_stop)
        for i, out in zip(idx, outs):
            results[i] = out
    return results


def _check_args(prompts, max_new_tokens, temperature, top_p, top_k, batch_size) -> None:
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0, got {top_k}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty; a prompt needs at least one token (BOS)")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _generate_batch(model, prompts, max_new_tokens, temperature, top_p, top_k, stops, gen, pad_id, include_stop):
    n = len(prompts)
    outs: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return outs
    device = _device(model)
    dtype = next(model.parameters()).dtype
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Without padding the model's plain causal path applies (no mask tensor at all).
    padded = bool((mask == 0).any())
    cache = KVCache(model.config, n, width + max_new_tokens, device=device, dtype=dtype)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    live = list(range(n))  # batch row -> prompt row
    hidden = model(ids, attention_mask=mask if padded else None, cache=cache, return_hidden=True)
    logits = model.output(hidden[:, -1])  # only the last position's head: the prompt's logits are unused
    for step in range(max_new_tokens):
        tok = _pick(logits, temperature, top_p, top_k, gen)
        done = torch.isin(tok, stop_t) if stop_t is not None else torch.zeros_like(tok, dtype=torch.bool)
        tok_list, done_list = tok.tolist(), done.tolist()
        for r, (t, d) in enumerate(zip(tok_list, done_list)):
            if not d or include_stop:
                outs[live[r]].append(t)
        if step == max_new_tokens - 1:
            break
        if any(done_list):
            keep = [r for r, d in enumerate(done_list) if not d]
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            tok, mask = tok[index], mask[index]
            live = [live[r] for r in keep]
        if padded:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(tok[:, None], attention_mask=mask if padded else None, cache=cache)[:, -1]
    return outs


def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen) -> torch.Tensor:
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def score_logprobs(
    model: InternLM2,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """[B, T-1] float32: entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]).

    Works with left or right padding through `attention_mask` (1 = real token); entries whose target
    is padding are meaningless and left to the caller to mask. It runs under the caller's grad mode,
    so PPO's actor update gets gradients and its rollout scoring (under `torch.no_grad()`) does not.
    """
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)[:, :-1]
    targets = input_ids[:, 1:]
    out = []
    for s in range(0, hidden.shape[1], chunk):
        logits = model.output(hidden[:, s:s + chunk]).float()
        tgt = targets[:, s:s + chunk]
        out.append(logits.gather(-1, tgt[..., None])[..., 0] - logits.logsumexp(-1))
    return torch.cat(out, dim=1) if out else hidden.new_zeros((input_ids.shape[0], 0), dtype=torch.float32)
