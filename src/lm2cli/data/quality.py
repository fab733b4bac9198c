"""Locally trained text classifiers and the quality filter (SPEC §4.6).

InternLM2 used BERT classifiers for ads, fluency and toxicity; lm2 trains a hashed n-gram logistic
regression in numpy (mixed-token unigrams + bigrams, so Chinese gets character n-grams) from labelled
JSONL `{"text": ..., "label": 0|1}` — `lm2 prepare train-classifier --name ad|fluency|toxic`. A model is
one `.npz` (weights + JSON metadata). The pipeline finds `<workdir>/data/classifiers/<name>.npz` by
itself, or takes a path from the recipe. Label 1 means: ad (ad), fluent (fluency), toxic (toxic).

The optional perplexity filter scores text with an lm2 checkpoint (torch imported lazily).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import xxhash

from ..config import QualityConfig
from ..errors import InputError
from . import mixed

CLASSIFIER_NAMES = ("ad", "fluency", "toxic")


def features(text: str, bits: int) -> np.ndarray:
    """Bucket ids of the text's hashed unigrams and bigrams (lowercased mixed tokens)."""
    toks = [t.lower() for t in mixed.tokens(text[:20_000])]
    grams = toks + [a + " " + b for a, b in zip(toks, toks[1:])]
    if not grams:
        return np.zeros(0, dtype=np.int64)
    mask = (1 << bits) - 1
    hashes = np.fromiter(map(xxhash.xxh32_intdigest, map(str.encode, grams)), dtype=np.int64, count=len(grams))
    return np.unique(hashes & mask)


@dataclass
class HashedLR:
    weights: np.ndarray
    bias: float
    bits: int
    meta: dict

    def logit(self, text: str) -> float:
        idx = features(text, self.bits)
        if idx.size == 0:
            return self.bias
        return float(self.weights[idx].sum() / np.sqrt(idx.size) + self.bias)

    def score(self, text: str) -> float:
        """P(label = 1)."""
        return float(1.0 / (1.0 + np.exp(-self.logit(text))))

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, weights=self.weights.astype(np.float32), bias=np.float32(self.bias),
                            bits=np.int64(self.bits), meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8))
        from ..layout import atomic_write_bytes

        atomic_write_bytes(path, buf.getvalue())


def load_classifier(path: Path) -> HashedLR:
    try:
        with np.load(Path(path)) as z:
            return HashedLR(z["weights"], float(z["bias"]), int(z["bits"]), json.loads(bytes(z["meta"]).decode()))
    except (OSError, KeyError, ValueError) as e:
        raise InputError(f"{path} is not an lm2 classifier: {e}") from None


def read_labels(path: Path) -> list[tuple[str, int]]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read labels {path}: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text, label = obj["text"], obj["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{i}: expected a JSON object with 'text' and 'label'") from None
        if label not in (0, 1, True, False) or not isinstance(text, str):
            raise InputError(f"{path}:{i}: 'label' must be 0/1 (or true/false) and 'text' a string")
        out.append((text, int(label)))
    if len({y for _, y in out}) < 2:
        raise InputError(f"{path}: need examples of both labels (0 and 1)")
    return out


def train(examples: list[tuple[str, int]], bits: int = 18, epochs: int = 10, lr: float = 0.5, l2: float = 1e-6,
          seed: int = 0, holdout: float = 0.1) -> tuple[HashedLR, dict]:
    """Logistic regression by AdaGrad over hashed features; returns the model and held-out metrics."""
    rng = random.Random(seed)
    data = [(features(t, bits), y) for t, y in examples]
    rng.shuffle(data)
    n_hold = int(len(data) * holdout) if len(data) >= 20 else 0
    hold, fit = data[:n_hold], data[n_hold:]
    w = np.zeros(1 << bits, dtype=np.float64)
    g2 = np.full(1 << bits, 1e-8)
    b, gb2 = 0.0, 1e-8
    for _ in range(epochs):
        rng.shuffle(fit)
        for idx, y in fit:
            if idx.size == 0:
                continue
            scale = 1.0 / np.sqrt(idx.size)
            z = w[idx].sum() * scale + b
            p = 1.0 / (1.0 + np.exp(-z))
            grad = p - y
            gw = grad * scale + l2 * w[idx]
            g2[idx] += gw * gw
            w[idx] -= lr * gw / np.sqrt(g2[idx])
            gb2 += grad * grad
            b -= lr * grad / np.sqrt(gb2)
    model = HashedLR(w.astype(np.float32), float(b), bits, {})

    def acc(rows):
        if not rows:
            return None
        return round(sum((model_logit(model, idx) > 0) == bool(y) for idx, y in rows) / len(rows), 4)

    metrics = {"examples": len(data), "train_accuracy": acc(fit), "holdout_accuracy": acc(hold), "holdout": len(hold)}
    return model, metrics


def model_logit(model: HashedLR, idx: np.ndarray) -> float:
    if idx.size == 0:
        return model.bias
    return float(model.weights[idx].sum() / np.sqrt(idx.size) + model.bias)


def train_classifier(labels: Path, name: str, out: Path, bits: int = 18, epochs: int = 10, seed: int = 0) -> dict:
    """`lm2 prepare train-classifier`: train on labelled JSONL and write the model to `out`."""
    if name not in CLASSIFIER_NAMES:
        raise InputError(f"classifier name must be one of {', '.join(CLASSIFIER_NAMES)}, got {name!r}")
    examples = read_labels(labels)
    model, metrics = train(examples, bits=bits, epochs=epochs, seed=seed)
    model.meta = {"name": name, "kind": "hashed-ngram-logistic-regression", "bits": bits, "epochs": epochs,
                  "seed": seed, "labels": str(Path(labels).resolve()), "positive": {"ad": "ad", "fluency": "fluent",
                                                                                    "toxic": "toxic"}[name], **metrics}
    model.save(out)
    return {"name": name, "model": str(out), **metrics}


# ---------------------------------------------------------------------------------------------------
# Quality stage


class PerplexityScorer:
    """Perplexity of the first `max_tokens` tokens under an lm2 checkpoint (InternLM2 §3.1.3 uses a
    perplexity-difference filter for long data; this is the plain form)."""

    def __init__(self, checkpoint: Path, max_tokens: int = 1024):
        try:
            import torch  # noqa: F401

            from ..convert import load_model
            from ..tokenizer import Tokenizer
        except ImportError as e:
            raise InputError(f"the perplexity filter needs lm2's model and tokenizer modules: {e}") from None
        self.torch = torch
        self.model = load_model(checkpoint).eval()
        self.tok = Tokenizer.load(checkpoint)
        self.max_tokens = max_tokens

    def __call__(self, text: str) -> float:
        torch = self.torch
        ids = self.tok.encode(text)[: self.max_tokens]
        if len(ids) < 2:
            return float("inf")
        x = torch.tensor([ids])
        with torch.no_grad():
            out = self.model(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:])
        return float(torch.exp(loss))


class Quality:
    def __init__(self, cfg: QualityConfig, ad: Optional[Path], fluency: Optional[Path], perplexity: Optional[Path]):
        self.cfg = cfg
        self.ad = load_classifier(ad) if ad else None
        self.fluency = load_classifier(fluency) if fluency else None
        self.ppl = PerplexityScorer(perplexity) if perplexity else None

    def check(self, record: dict) -> Optional[str]:
        lm2 = record["meta"]["lm2"]
        text = record["text"]
        if record["lang"] not in self.cfg.langs:
            return None
        if self.ad is not None:
            lm2["not_ad_score"] = round(1.0 - self.ad.score(text), 4)
            if lm2["not_ad_score"] < self.cfg.ad_threshold:
                return "ad_classifier"
        if self.fluency is not None:
            lm2["fluency_score"] = round(self.fluency.score(text), 4)
            if lm2["fluency_score"] < self.cfg.fluency_threshold:
                return "fluency_classifier"
        if self.ppl is not None:
            lm2["perplexity"] = round(self.ppl(text), 3)
            if self.cfg.max_perplexity > 0 and lm2["perplexity"] > self.cfg.max_perplexity:
                return "perplexity"
        return None


def resolve_model(value: str, default: Path) -> Optional[Path]:
    """"" -> the default path if it exists; "none" -> off; else the path, which must exist."""
    if value == "none":
        return None
    if not value:
        return default if default.exists() else None
    p = Path(value)
    if not p.exists():
        raise InputError(f"classifier {p} does not exist")
    return p
