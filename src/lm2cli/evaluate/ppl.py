"""`lm2 eval ppl`: perplexity and bits per byte by language and content type, and the contamination check.

Scoring (SPEC §9.1). A document is its text tokens (no special tokens). They are predicted in windows
of `eval.max_len` positions at most, and never more than the model's trained length: the first window
starts with `<s>`, each later one with the token just before it, so every text token is predicted
exactly once (lm-eval's rolling windows). Then

    loss = ΣNLL / Σtokens (nats),  ppl = exp(loss),  bpb = ΣNLL / (ln 2 · Σbytes),

where bytes are the UTF-8 bytes the scored tokens decode to. Bits per byte do not depend on the
vocabulary, so runs with different tokenizers compare. Groups: all, by language, by content type and
by split (`<lang>.<content_type>`, the token store's split names).

Sources: the validation split of `data/tokens` (default) or JSONL files/folders whose records carry
`text` (and optionally `lang`, `content_type`, as `data/prepared` does).

Contamination (SPEC §9.3, InternLM2 report §5.4): the mean per-sample loss of a benchmark's train split,
its test split and look-alike reference text; Δ1 = L_test − L_ref (low or negative: the test set
leaked into training), Δ2 = L_test − L_train (high: overfit to the train split).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

LN2 = math.log(2.0)
UNKNOWN = "unknown"
LOGITS_BUDGET = 1 << 27  # floats of [B, chunk, V] logits at once (512 MB): a 100k vocabulary gets short chunks


@dataclass
class Doc:
    ids: list[int]
    n_bytes: int
    lang: str = UNKNOWN
    content_type: str = UNKNOWN

    @property
    def split(self) -> str:
        return f"{self.lang}.{self.content_type}"


# ---------------------------------------------------------------------------------------------------
# Token scoring, shared with the OpenCompass model


@torch.no_grad()
def batch_nll(model, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """One batch: per sequence, the NLL (nats) of each token after the first, `out[i][t] = −log p(s[t+1] |
    s[:t+1])`. Rows are right-padded to the longest under an attention mask (none when all are as long)."""
    from ..generate import score_logprobs

    device = next(model.parameters()).device
    live = [i for i, s in enumerate(seqs) if len(s) > 1]
    out: list[np.ndarray] = [np.zeros(0) for _ in seqs]
    if not live:
        return out
    width = max(len(seqs[i]) for i in live)
    ids = torch.zeros((len(live), width), dtype=torch.long)
    mask = torch.zeros((len(live), width), dtype=torch.long)
    for r, i in enumerate(live):
        ids[r, :len(seqs[i])] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
        mask[r, :len(seqs[i])] = 1
    padded = bool((mask == 0).any())
    chunk = max(16, LOGITS_BUDGET // (len(live) * model.config.vocab_size))
    logp = score_logprobs(model, ids.to(device), mask.to(device) if padded else None, chunk=chunk)
    logp = logp.double().cpu().numpy()
    for r, i in enumerate(live):
        out[i] = -logp[r, :len(seqs[i]) - 1]
    return out


def token_nll(model, seqs: Sequence[Sequence[int]], batch_size: int = 8, world=None) -> list[np.ndarray]:
    """`batch_nll` over any number of sequences, batched by length (longest first, each batch padded only
    to its own longest), in input order; with a `world` of several ranks each scores its share of the
    batches and all get every result."""
    from .parallel import World, map_batches

    def score(idx: list[int]) -> dict[int, np.ndarray]:
        return dict(zip(idx, batch_nll(model, [seqs[i] for i in idx])))

    return map_batches([len(s) for s in seqs], batch_size, world or World(), score)


def windows(ids: Sequence[int], bos: int, max_len: int) -> list[list[int]]:
    """Inputs that together predict every id once: `[<s>] + ids[:max_len-1]`, then `[prev] + next chunk`."""
    step = max_len - 1
    return [([bos] if a == 0 else [ids[a - 1]]) + list(ids[a:a + step]) for a in range(0, len(ids), step)]


def document_nll(model, docs: Sequence[Doc], bos: int, max_len: int, batch_size: int = 8,
                 task=None, world=None) -> np.ndarray:
    """Summed NLL (nats) of each document's tokens. All windows of all documents are batched together by
    length; with a `world` of several ranks each scores its share and every rank gets all the sums,
    added up in window order as one rank would."""
    from .parallel import World, map_batches

    seqs, owner = [], []
    for d, doc in enumerate(docs):
        for w in windows(doc.ids, bos, max_len):
            seqs.append(w)
            owner.append(d)

    def score(idx: list[int]) -> dict[int, float]:
        nll = batch_nll(model, [seqs[i] for i in idx])
        if task is not None:
            task.advance(sum(len(seqs[i]) - 1 for i in idx))
        return {i: float(n.sum()) for i, n in zip(idx, nll)}

    per_window = map_batches([len(s) for s in seqs], batch_size, world or World(), score)
    sums = np.zeros(len(docs))
    for o, nll in zip(owner, per_window):
        sums[o] += nll
    return sums


# ---------------------------------------------------------------------------------------------------
# Breakdown


def group_stats(nll: float, tokens: int, n_bytes: int, docs: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    return {
        "docs": docs,
        "tokens": tokens,
        "bytes": n_bytes,
        "nll": nll,
        "loss": loss,
        "ppl": math.exp(loss) if tokens else float("nan"),
        "bpb": nll / (LN2 * n_bytes) if n_bytes else float("nan"),
        "bytes_per_token": n_bytes / tokens if tokens else float("nan"),
    }


def breakdown(docs: Sequence[Doc], nll: Sequence[float]) -> dict:
    """{"all": stats, "lang": {l: stats}, "content_type": {...}, "split": {...}}, sums over documents."""
    keys = {"lang": lambda d: d.lang, "content_type": lambda d: d.content_type, "split": lambda d: d.split}
    acc: dict[str, dict[str, list]] = {k: {} for k in keys}
    total = [0.0, 0, 0, 0]
    for doc, n in zip(docs, nll):
        row = (float(n), len(doc.ids), doc.n_bytes, 1)
        total = [a + b for a, b in zip(total, row)]
        for k, f in keys.items():
            cur = acc[k].setdefault(f(doc), [0.0, 0, 0, 0])
            acc[k][f(doc)] = [a + b for a, b in zip(cur, row)]
    out = {"all": group_stats(*total)}
    for k in keys:
        out[k] = {name: group_stats(*v) for name, v in sorted(acc[k].items())}
    return out


# ---------------------------------------------------------------------------------------------------
# Sources


def jsonl_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their `*.jsonl` (recursively), in path order."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise InputError(f"{p} holds no .jsonl files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p} does not exist")
    return files


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a malformed line is an InputError naming it."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not UTF-8") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def record_text(path: Path, n: int, rec: dict) -> str:
    """A record's text: `text`, else `question` + newline + `answer` (benchmark rows)."""
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("question"), str) and "answer" in rec:
        return f"{rec['question']}\n{rec['answer']}"
    raise InputError(f"{path}:{n}: record has no string 'text' (or 'question' and 'answer')")


class _Budget:
    """Caps the tokens taken per split; a document crossing the cap is cut there."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.used = max_tokens, {}

    def take(self, split: str, ids: list[int]) -> list[int] | None:
        if not self.max_tokens:
            return ids
        left = self.max_tokens - self.used.get(split, 0)
        if left <= 0:
            return None
        ids = ids[:left]
        self.used[split] = self.used.get(split, 0) + len(ids)
        return ids


def _doc(tok, ids: list[int], lang: str, content_type: str) -> Doc:
    return Doc(ids, len(tok.decode_bytes(ids)), lang, content_type)


def jsonl_docs(paths: Iterable[Path], tok, max_tokens: int = 0) -> list[Doc]:
    budget, docs = _Budget(max_tokens), []
    for path in jsonl_files(paths):
        for n, rec in read_jsonl(path):
            text = record_text(path, n, rec)
            lang, ctype = str(rec.get("lang") or UNKNOWN), str(rec.get("content_type") or UNKNOWN)
            ids = budget.take(f"{lang}.{ctype}", tok.encode(text))
            if ids:
                docs.append(_doc(tok, ids, lang, ctype))
    if not docs:
        raise InputError(f"no text to score in {', '.join(map(str, paths))}")
    return docs


def token_store_docs(tokens_dir: Path, tok, max_tokens: int = 0) -> list[Doc]:
    """The validation split of `data/tokens`, without the `<s>`/`</s>` around each document. Shards
    written with another tokenizer are decoded and re-encoded: bits per byte still compare."""
    from ..tokens import TokenStore

    store = TokenStore(tokens_dir)
    splits = store.splits("val")
    if not any(s.num_docs for s in splits.values()):
        raise InputError(f"{tokens_dir} has no validation documents (tokenize.val_fraction is 0?); "
                         "give JSONL files with --data")
    same = store.tokenizer_fingerprint == tok.fingerprint
    store_tok = tok if same else store.tokenizer()
    budget, docs = _Budget(max_tokens), []
    for name, split in splits.items():
        lang, _, ctype = name.partition(".")
        for i in range(split.num_docs):
            ids = [int(t) for t in split.doc(i) if not store_tok.is_special(int(t))]
            if not same:
                ids = tok.encode(store_tok.decode(ids))
            ids = budget.take(name, ids)
            if ids is None:
                break
            if ids:
                docs.append(_doc(tok, ids, lang, ctype or UNKNOWN))
    return docs


def texts_of(path: Path) -> list[str]:
    texts = [record_text(p, n, rec) for p in jsonl_files([path]) for n, rec in read_jsonl(p)]
    if not texts:
        raise InputError(f"{path} holds no records")
    return texts


# ---------------------------------------------------------------------------------------------------
# Contamination (SPEC §9.3)


def mean_sample_loss(model, tok, texts: Sequence[str], max_len: int, batch_size: int = 8, world=None) -> float:
    """Mean over samples of each sample's mean token loss (nats), texts predicted after `<s>`."""
    docs = [Doc(tok.encode(t), 0) for t in texts]
    docs = [d for d in docs if d.ids]
    nll = document_nll(model, docs, tok.bos_id, max_len, batch_size, world=world)
    return float(np.mean([n / len(d.ids) for d, n in zip(docs, nll)]))


def contamination(model, tok, train: Path, test: Path, ref: Path, max_len: int, batch_size: int = 8,
                  world=None) -> dict:
    sets = {"train": train, "test": test, "ref": ref}
    texts = {k: texts_of(p) for k, p in sets.items()}
    loss = {k: mean_sample_loss(model, tok, t, max_len, batch_size, world) for k, t in texts.items()}
    return {
        "L_train": loss["train"], "L_test": loss["test"], "L_ref": loss["ref"],
        "delta1": loss["test"] - loss["ref"], "delta2": loss["test"] - loss["train"],
        "samples": {k: len(t) for k, t in texts.items()},
        "files": {k: str(Path(p).resolve()) for k, p in sets.items()},
    }


# ---------------------------------------------------------------------------------------------------
# The command


def run_ppl(ws, recipe, checkpoint: Path | None = None, *, run: str = "default",
            data: Sequence[Path] | None = None, contamination_sets: tuple[Path, Path, Path] | None = None,
            name: str = "ppl", show: bool = True, nproc: int = 1) -> Path:
    """Score a checkpoint into `eval/<run>/<name>/` (results.json, summary.md, manifest.json).

    `nproc` > 1 runs the same command as that many ranks (evaluate/parallel.py); the numbers are the
    same as one rank's. The model loads in `eval.dtype` (auto: bf16 on CUDA, fp32 on CPU)."""
    import contextlib

    from ..console import progress
    from ..layout import staging_dir, write_manifest
    from .common import load_checkpoint, resolve_checkpoint
    from .parallel import barrier, join, relaunch_eval, wants_relaunch

    cfg = recipe.eval
    checkpoint = resolve_checkpoint(ws, run, checkpoint)
    # cheap checks first: a missing file is refused before the model loads
    if data:
        source, inputs = "jsonl", jsonl_files(data)
    elif (ws.tokens / "manifest.json").exists():
        source, inputs = "tokens-val", [ws.tokens]
    else:
        raise InputError(f"no validation data: {ws.tokens} does not exist (run lm2 tokenize) and no --data "
                         "JSONL was given")
    for p in contamination_sets or ():
        jsonl_files([p])
    if wants_relaunch(nproc):
        command = ["ppl", str(checkpoint), "--name", name, *(f"--data={p}" for p in data or ())]
        command += ["--contamination", *map(str, contamination_sets)] if contamination_sets else []
        relaunch_eval(ws, recipe, run, nproc, command, name)  # rank 0 prints the table (on stderr)
        return ws.eval_dir(name, run)
    world = join()
    model, tok = load_checkpoint(checkpoint, cfg.rope_scaling, device=world.device, dtype=cfg.dtype)
    if source == "jsonl":
        docs = jsonl_docs(inputs, tok, cfg.ppl_max_tokens)
    else:
        docs = token_store_docs(ws.tokens, tok, cfg.ppl_max_tokens)
    # Scored windows never exceed the length the model was trained at (its max_position_embeddings).
    window = min(cfg.max_len, model.config.max_position_embeddings)
    total = sum(len(d.ids) for d in docs) // world.size  # this rank's share, roughly
    bar = progress("eval ppl (tokens)", total=total) if world.is_main else contextlib.nullcontext()
    with bar as task:
        nll = document_nll(model, docs, tok.bos_id, window, cfg.batch_size, task, world)
    results = {"checkpoint": str(checkpoint), "source": source, "window": window,
               "rope_scaling": model.config.rope_scaling, "dtype": str(next(model.parameters()).dtype)[6:],
               "ranks": world.size, **breakdown(docs, nll)}
    if contamination_sets:
        results["contamination"] = contamination(model, tok, *contamination_sets, window, cfg.batch_size, world)
        inputs = [*inputs, *contamination_sets]
    out = ws.eval_dir(name, run)
    if not world.is_main:
        barrier(world)  # rank 0 writes the artefact; the others wait until it has
        return out
    with staging_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(results))
        a = results["all"]
        write_manifest(tmp, "eval-ppl", config=cfg, inputs=[checkpoint, *inputs],
                       stats={"tokens": a["tokens"], "loss": a["loss"], "ppl": a["ppl"], "bpb": a["bpb"],
                              **({k: results["contamination"][k] for k in ("delta1", "delta2")}
                                 if contamination_sets else {})})
    barrier(world)
    if show:
        print_table(results)
    return out


def _rows(results: dict) -> list[tuple[str, dict]]:
    rows = [("all", results["all"])]
    for group in ("lang", "content_type", "split"):
        rows += [(f"{group}={k}", v) for k, v in results[group].items()]
    return rows


def summary_markdown(results: dict) -> str:
    lines = [f"# Perplexity — {results['checkpoint']}", "",
             "| group | docs | tokens | bytes | loss | ppl | bits/byte |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in _rows(results):
        lines.append(f"| {name} | {s['docs']} | {s['tokens']} | {s['bytes']} | {s['loss']:.4f} | "
                     f"{s['ppl']:.2f} | {s['bpb']:.4f} |")
    c = results.get("contamination")
    if c:
        lines += ["", "## Contamination (InternLM2 §5.4)", "",
                  "| L_train | L_test | L_ref | Δ1 = L_test − L_ref | Δ2 = L_test − L_train |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {c['L_train']:.4f} | {c['L_test']:.4f} | {c['L_ref']:.4f} | {c['delta1']:+.4f} | {c['delta2']:+.4f} |",
                  "", "Δ1 low or negative suggests test-set leakage; Δ2 high suggests overfitting the train split."]
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    from rich.table import Table

    from ..console import err

    table = Table(title=f"perplexity: {results['checkpoint']}")
    for col in ("group", "docs", "tokens", "loss", "ppl", "bits/byte"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for name, s in _rows(results):
        table.add_row(name, str(s["docs"]), str(s["tokens"]), f"{s['loss']:.4f}", f"{s['ppl']:.2f}", f"{s['bpb']:.4f}")
    err.print(table)
    c = results.get("contamination")
    if c:
        err.print(f"contamination: L_train {c['L_train']:.4f}  L_test {c['L_test']:.4f}  L_ref {c['L_ref']:.4f}  "
                  f"Δ1 {c['delta1']:+.4f}  Δ2 {c['delta2']:+.4f}", markup=False)
