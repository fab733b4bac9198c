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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Prompts right-aligned in one [n, width] batch: (ids, attention mask, whether any row is padded).
    Without padding callers pass no mask, so the model takes its plain causal path."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device), bool((mask == 0).any())


def _generate_batch(model, prompts, max_new_tokens, temperature, top_p, top_k, stops, gen, pad_id, include_stop):
    n = len(prompts)
    outs: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return outs
    device = _device(model)
    dtype = next(model.parameters()).dtype
    ids, mask, padded = left_pad(prompts, pad_id, device)
    width = ids.shape[1]
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


# ---------------------------------------------------------------------------------------------------
# `lm2 generate` and `lm2 chat`: the engine behind a JSONL file and a terminal.


def resolve_checkpoint(ws, run: str, checkpoint=None):
    """The given model folder, else the run's latest finished stage's `final/` (see `stages.resolve_model`)."""
    from .layout import STAGES
    from .stages import resolve_model

    return resolve_model(ws, run, checkpoint, stages=STAGES, what="checkpoint",
                         missing=f"no CHECKPOINT given and {ws.run_dir(run)} has no finished stage; "
                                 "train one (lm2 pretrain, lm2 sft) or pass a checkpoint folder").path


def load_for_inference(checkpoint, device: Optional[str] = None):
    """(model, tokenizer) from a checkpoint folder; bf16 on a GPU, fp32 otherwise."""
    from .convert import load_model
    from .tokenizer import Tokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.load(checkpoint)
    dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else None
    model = load_model(checkpoint, dtype=dtype, device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise InputError(f"{checkpoint}: the tokenizer has {tok.vocab_size} ids, the model {model.config.vocab_size}")
    return model, tok


def prompt_ids(tok, record) -> list[int]:
    """A prompts.jsonl record → ids. `messages`: the chat template plus the generation prompt (contents
    stay text); `prompt`: raw text after BOS, written by the user as a whole, so special-token strings
    in it (a hand-written template) are parsed."""
    from .chat import Rejected, encode_prompt

    if not isinstance(record, dict):
        raise Rejected("bad-record", "a line must be a JSON object")
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise Rejected("no-messages", "`messages` must be a non-empty list")
        return encode_prompt(tok, record["messages"])
    if isinstance(record.get("prompt"), str):
        return tok.encode(record["prompt"], bos=True, allow_special=True)
    raise Rejected("no-prompt", "a line needs `messages` (a conversation) or `prompt` (text)")


def run_generate(checkpoint, input_path, output_path, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = 0, batch_size: int = 16,
                 device: Optional[str] = None) -> dict:
    """Each input line gets `completion` and `finish_reason` ("stop" | "length"); a line that cannot be
    prompted keeps its place with `error` instead, so the output aligns with the input line by line."""
    import json
    from pathlib import Path

    from .chat import Rejected
    from .console import progress
    from .layout import atomic_write_text

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise InputError(f"input {input_path} does not exist (expected a prompts .jsonl file)")
    model, tok = load_for_inference(checkpoint, device)
    records, todo = [], []  # todo: (record index, prompt ids)
    for n, line in enumerate(input_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            todo.append((len(records), prompt_ids(tok, rec)))
        except json.JSONDecodeError as e:
            rec = {"line": n, "error": f"invalid-json: {e}", "text": line}
        except Rejected as e:
            rec = {**rec, "error": f"{e.code}: {e.detail}"} if isinstance(rec, dict) else {"line": n, "error": e.code}
        records.append(rec)
    stops = tuple(tok.stop_ids)
    chunk = batch_size * 4
    new_tokens = 0
    with progress("generate", total=len(todo)) as task:
        for c in range(0, len(todo), chunk):
            part = todo[c:c + chunk]
            outs = generate(model, [ids for _, ids in part], max_new_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, stop_ids=stops, seed=None if seed is None else seed + c,
                            batch_size=batch_size, pad_id=tok.pad_id, include_stop=True)
            for (i, _), out in zip(part, outs):
                stopped = bool(out) and out[-1] in stops
                records[i]["completion"] = tok.decode(out[:-1] if stopped else out)
                records[i]["finish_reason"] = "stop" if stopped else "length"
                new_tokens += len(out)
            task.advance(len(part))
    atomic_write_text(output_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"output": str(output_path), "checkpoint": str(checkpoint), "prompts": len(todo),
            "errors": len(records) - len(todo), "new_tokens": new_tokens}


CHAT_HELP = "/reset clears the conversation, /system <text> sets the system prompt (empty: none), /exit quits"


def run_chat(checkpoint, *, system: str = "", max_new_tokens: int = 1024, temperature: float = 0.8,
             top_p: float = 0.8, top_k: int = 0, seed: Optional[int] = None, device: Optional[str] = None,
             stdin=None, stdout=None) -> int:
    """An interactive chat; returns the number of replies. On a terminal it is a Rich prompt; from a pipe
    it reads one user message per line and writes each reply (then a newline) to stdout, with notes
    on stderr, so a script can drive it.

    The conversation is kept as token ids: the model's replies go back into the context exactly as it
    wrote them (never re-tokenized from their decoded text), each closed by `<|im_end|>\\n`.
    """
    import sys

    from .chat import encode_message, generation_prompt
    from .console import log

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdin.isatty() and stdout.isatty()
    model, tok = load_for_inference(checkpoint, device)
    log(f"chatting with {checkpoint} ({CHAT_HELP})")
    closing = [tok.im_end_id] + tok.encode("\n")
    history: list[int] = []  # ids of the turns so far, after BOS and the system turn
    replies = 0
    while True:
        line = _read_line(stdin, tty)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = []
                log("(conversation cleared)")
            elif cmd == "/system":
                system = arg.strip()
                log(f"(system prompt {'set' if system else 'cleared'})")
            else:
                log(f"unknown command {cmd}; {CHAT_HELP}")
            continue
        head = [tok.bos_id] + (encode_message(tok, {"role": "system", "content": system})[0] if system else [])
        turn = encode_message(tok, {"role": "user", "content": text})[0] + generation_prompt(tok)
        out = generate(model, [head + history + turn], max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, stop_ids=tok.stop_ids, seed=None if seed is None else seed + replies,
                       pad_id=tok.pad_id)[0]
        history += turn + out + closing
        replies += 1
        reply = tok.decode(out)
        if tty:
            from rich.console import Console

            Console(file=stdout, highlight=False).print(f"[bold cyan]assistant>[/bold cyan] {_escape(reply)}")
        else:
            stdout.write(reply + "\n")
            stdout.flush()
    return replies


def _read_line(stdin, tty: bool):
    if tty:
        from rich.prompt import Prompt

        try:
            return Prompt.ask("[bold green]you[/bold green]")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
