"""lm2 checkpoints as OpenCompass models (SPEC §9.1): `LM2Model`, the ChatML meta template, postprocessors.

OpenCompass builds the model from a config dict, by dotted path, with everything else as kwargs:

    dict(type="lm2cli.evaluate.opencompass_model.LM2Model", abbr="lm2", path="/abs/checkpoint",
         meta_template=chatml_meta_template(tok), max_seq_len=1024, max_out_len=32, batch_size=8,
         rope_scaling={"type": "dynamic", "factor": 2.0}, dtype="auto", run_cfg=dict(num_gpus=0))

`dtype` is lm2's eval dtype (auto: bf16 on CUDA, fp32 on CPU). OpenCompass hands the model whole
batches of `batch_size` prompts; `get_ppl` and `generate` sort them by length internally (pad minimal).

Contract (opencompass 0.5.4 `models/base.py`):
- every input is `<s>` + the text, with special-token strings parsed (the meta template writes
  `<|im_start|>` and friends as text); inputs longer than `max_seq_len` lose tokens after `<s>`;
- `generate` returns continuations only, greedy unless `generation_kwargs` ask for sampling, stopping
  at `</s>`, `<|im_end|>`, the meta template's `eos_token_id` and any stop word (cut from the text);
- `get_ppl` is the mean token cross-entropy per sample (not its exp), excluding the first
  `mask_length[i]` tokens; the PPL inferencer picks the lowest;
- `get_loglikelihood(inputs, conts)` is −`get_ppl` with everything before the continuation masked;
- `get_token_len` counts `<s>`, so `mask_length` from it lines up with `get_ppl`.

`min_out_len` is accepted and ignored: lm2's decoder stops only on real end tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from opencompass.models.base import BaseModel
from opencompass.openicl.icl_evaluator import BaseEvaluator

from ..generate import generate as lm2_generate
from .common import load_checkpoint, load_tokenizer
from .ppl import token_nll


def chatml_meta_template(tok) -> dict:
    """InternLM2's chat layout (SPEC §3.2) as an OpenCompass meta template; `<s>` is added by the model."""
    return dict(
        round=[
            dict(role="HUMAN", begin="<|im_start|>user\n", end="<|im_end|>\n"),
            dict(role="BOT", begin="<|im_start|>assistant\n", end="<|im_end|>\n", generate=True),
        ],
        reserved_roles=[dict(role="SYSTEM", begin="<|im_start|>system\n", end="<|im_end|>\n")],
        eos_token_id=tok.im_end_id,
    )


def first_line(text: str) -> str:
    """Prediction postprocessor for short-answer tasks: the first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


class ExactMatchEvaluator(BaseEvaluator):
    """Accuracy (0–100): a prediction is right when it equals the reference as a stripped string.

    Plain Python, unlike OpenCompass's `AccEvaluator`, which loads a Hugging Face `evaluate` metric
    into a cache under `~/.cache` on every run."""

    def score(self, predictions: list, references: list) -> dict:
        if len(predictions) != len(references):
            return {"error": f"{len(predictions)} predictions for {len(references)} references"}
        details = [{"pred": p, "answer": r, "correct": str(p).strip() == str(r).strip()}
                   for p, r in zip(predictions, references)]
        right = sum(d["correct"] for d in details)
        return {"accuracy": 100.0 * right / len(details) if details else 0.0, "details": details}


class LM2Model(BaseModel):
    """An lm2 checkpoint (or its HF export) behind OpenCompass's `BaseModel` interface."""

    def __init__(self, path: str, max_seq_len: int = 2048, tokenizer_only: bool = False,
                 meta_template: dict | None = None, generation_kwargs: dict | None = None,
                 sync_rank: bool = False, rope_scaling: dict | None = None, stop_words: tuple = (),
                 device: str | None = None, dtype: str = "auto", **kwargs):
        super().__init__(path=path, max_seq_len=max_seq_len, tokenizer_only=tokenizer_only,
                         meta_template=meta_template, generation_kwargs=dict(generation_kwargs or {}),
                         sync_rank=sync_rank)
        if tokenizer_only:
            self.tokenizer, self.model = load_tokenizer(path), None
        else:
            self.model, self.tokenizer = load_checkpoint(path, rope_scaling, device, dtype=dtype)
        self.stop_words = list(stop_words)
        stops = set(self.tokenizer.stop_ids)
        if self.eos_token_id is not None:
            stops.add(int(self.eos_token_id))
        self.stop_ids = sorted(stops)

    # -- tokens ------------------------------------------------------------------------------------

    def _ids(self, text: str, reserve: int = 0) -> tuple[list[int], int]:
        """`<s>` + tokens, cut after `<s>` to fit `max_seq_len - reserve`; returns (ids, tokens cut)."""
        ids = self.tokenizer.encode(str(text), bos=True, allow_special=True)
        limit = max(self.max_seq_len - reserve, 2)
        if len(ids) <= limit:
            return ids, 0
        cut = len(ids) - limit
        return ids[:1] + ids[1 + cut:], cut

    def get_token_len(self, prompt: str) -> int:
        return len(self.tokenizer.encode(str(prompt), bos=True, allow_special=True))

    def encode(self, prompt: str) -> torch.Tensor:
        return torch.tensor([self._ids(prompt)[0]], dtype=torch.long)

    def decode(self, tokens) -> str:
        ids = [int(t) for t in torch.as_tensor(tokens).flatten().tolist()]
        return self.tokenizer.decode([t for t in ids if t != self.tokenizer.bos_id])

    # -- scoring -----------------------------------------------------------------------------------

    def get_ppl(self, inputs: list[str], mask_length: list[int] | None = None) -> np.ndarray:
        seqs, cuts = zip(*(self._ids(t) for t in inputs)) if inputs else ((), ())
        nll = token_nll(self.model, seqs, batch_size=max(len(seqs), 1))
        out = []
        for i, row in enumerate(nll):
            # row[t] scores token t+1; the first `skip` tokens (prompt, <s>) are not scored.
            skip = max((mask_length[i] if mask_length is not None else 0) - cuts[i], 1)
            kept = row[skip - 1:]
            out.append(float(kept.mean()) if len(kept) else float("nan"))
        return np.array(out)

    def get_ppl_tokenwise(self, inputs, mask_length=None):
        raise NotImplementedError("LM2Model does not implement token-wise ppl; use get_ppl")

    def get_loglikelihood(self, inputs: list[str], conts: list[str]) -> np.ndarray:
        contexts = [t[: len(t) - len(c)] if c and t.endswith(c) else t.replace(c, "", 1) for t, c in zip(inputs, conts)]
        return -self.get_ppl(inputs, [self.get_token_len(c) for c in contexts])

    # -- generation --------------------------------------------------------------------------------

    def generate(self, inputs: list[str], max_out_len: int, min_out_len: int | None = None,
                 stopping_criteria: list[str] = (), **kwargs) -> list[str]:
        gen = {**self.generation_kwargs, **kwargs}
        temperature = float(gen.get("temperature", 1.0)) if gen.get("do_sample") else 0.0
        prompts = [self._ids(t, reserve=max_out_len)[0] for t in inputs]
        outs = lm2_generate(self.model, prompts, max_out_len, temperature=temperature,
                            top_p=float(gen.get("top_p", 1.0)), top_k=int(gen.get("top_k", 0)),
                            stop_ids=self.stop_ids, seed=gen.get("seed"), batch_size=max(len(prompts), 1),
                            pad_id=self.tokenizer.pad_id)
        stops = [s for s in {*stopping_criteria, *self.stop_words} if s]
        texts = []
        for ids in outs:
            text = self.tokenizer.decode([t for t in ids if not self.tokenizer.is_special(t)])
            for s in stops:
                text = text.split(s)[0]
            texts.append(text)
        return texts
