"""`lm2 eval needle` / `lm2 needle`: needle-in-a-haystack grids and heatmaps (SPEC §9.2, report Fig. 13).

One sample hides a needle in a haystack at a token depth and asks for it back. Three needles:

* `passkey` — the landmark-attention/YaRN test: task line, the "grass is green" filler, the key line
  "The pass key is N. Remember it. N is the pass key." and "What is the pass key? The pass key is";
  the same strings as `synthetic.passkey_document`, so a model with passkey documents in its
  pretraining mix sees its own format.
* `en` — Kamradt's San Francisco needle in English prose, NeedleBench's English prompt.
* `zh` — InternLM2's needle 小明最喜欢的实习的地点就是上海人工智能实验室。 in Chinese prose, CDME's prompt.

Sample construction follows CDME: concatenate haystack tokens from shuffled documents, splice the
needle in at token `int(n·depth/100)` (passkey moves it back to the nearest word start, as the
synthetic documents do), add the instruction and the question. Unlike CDME, a cell's length counts
the whole prompt, instruction and question included, up to `length - length_buffer`: at lm2's
64–1024 lengths the instruction is a large share, and the length the model sees is what a context
test measures. Tokens are counted with the model's own tokenizer by default (a cell's length is then
exactly the positions the model sees); `token_counter: cl100k` counts with cl100k as CDME does (the
prompt is built in cl100k tokens, decoded, and re-encoded with the model's tokenizer).

Scores per sample: `exact` (passkey: the first integer of the answer equals the key, compared as
strings; en/zh: the needle's key phrase appears in the whitespace-stripped answer), `edit`
(OpenCompass's `100·(1 − Lev/max(len))` on whitespace-stripped strings, after NeedleBench's trim of
the prediction to 0.8–1.2× the reference), and `choice` (forced choice: the key's continuation has the
highest log-likelihood among the key and `choices` distractors; chance is 1/(choices+1)).

Writes `eval/<run>/needle-<mode>/`: results.jsonl (one line per sample), summary.json (grids per
metric), heatmap.png (the mode's main score: exact for passkey, edit for en/zh) and
heatmap-<metric>.png for the others, manifest.json (kind `eval-needle`).

Public API: `run_needle`, `build_sample`, `Haystack`, `TASKS`, `levenshtein`, `edit_score`,
`trim_prediction`, `exact_match`, `choice_logprobs`, `plot_heatmap`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

from ..config import NeedleConfig, Recipe
from ..errors import InputError
from ..layout import Workspace

METRICS = ("exact", "edit", "choice")
COLORS = ("#F0496E", "#EBB839", "#0CD79F")  # OpenCompass / report Fig. 13, over 0-100


class LengthTooShort(InputError):
    """A grid length cannot hold the needle's instruction, needle and question."""


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


# ---------------------------------------------------------------------------------------------------
# The needles


@dataclass(frozen=True)
class Task:
    mode: str
    header: str  # instruction before the document
    question: str  # after the document; the model's answer follows it
    needle: str  # "{key}" is the fill-in value
    answer: str  # forced-choice continuation and edit-score reference, "{key}" filled in
    key: str  # the fill-in value of the needle (passkey: drawn per sample)
    distractors: tuple[str, ...]  # alternative fill-ins for forced choice (passkey: drawn per sample)
    lang: str  # haystack documents to prefer
    word_start: bool  # splice only before a token that starts a word (the filler's sentences)

    def draw(self, rng: random.Random, k: int) -> tuple[str, list[str]]:
        """The sample's key and `k` distractors."""
        if self.mode == "passkey":
            key = rng.randint(1, 50000)  # landmark-attention's range
            # Distractors with as many digits as the key, so every continuation has the same tokens count.
            lo, hi = 10 ** (len(str(key)) - 1), min(10 ** len(str(key)) - 1, 50000)
            if hi - lo < 2 * k:
                lo, hi = 1, 50000
            others: set[int] = set()
            while len(others) < k:
                x = rng.randint(lo, hi)
                if x != key:
                    others.add(x)
            return str(key), [str(x) for x in sorted(others)]
        if k > len(self.distractors):
            raise InputError(f"eval.needle.choices={k}, but the {self.mode} needle has {len(self.distractors)} distractors")
        return self.key, rng.sample(list(self.distractors), k)


def _passkey_task() -> Task:
    from ..synthetic import PASSKEY_QUESTION, PASSKEY_TASK

    return Task(
        mode="passkey",
        header=PASSKEY_TASK,
        question=" " + PASSKEY_QUESTION,
        needle=" The pass key is {key}. Remember it. {key} is the pass key.",
        answer=" {key}.",
        key="",
        distractors=(),
        lang="en",
        word_start=True,
    )


_EN_QUESTION = ("What is the best thing to do in San Francisco? "
                "Please answer in the format 'The best thing to do in San Francisco is ________.'")
_ZH_QUESTION = "小明最喜欢的实习地点是哪里？请按照“小明最喜欢的实习地点就是________。”的格式回答。"

TASKS: dict[str, Task] = {
    "passkey": _passkey_task(),
    "en": Task(
        mode="en",
        header=("You are an intelligent AI assistant skilled in answering user questions.\n"
                "Please keep your answers concise and clear. Do not talk about irrelevant topics or repeat "
                "your answers.\nThe document given to you by the user is"),
        question=f"\n\nNow, the question is: {_EN_QUESTION}\n",
        needle="\nThe best thing to do in San Francisco is {key}.\n",
        answer="The best thing to do in San Francisco is {key}.",
        key="eat a sandwich and sit in Dolores Park on a sunny day",
        distractors=("ride a cable car up Nob Hill at sunset", "walk across the Golden Gate Bridge in the fog",
                     "eat dim sum in Chinatown on a rainy afternoon", "watch the sea lions at Pier 39 in the morning",
                     "take a ferry to Alcatraz Island on a clear day", "cycle through Golden Gate Park after lunch",
                     "read in a cafe in the Mission on a quiet evening", "climb Twin Peaks for the view at dawn"),
        lang="en",
        word_start=False,
    ),
    "zh": Task(
        mode="zh",
        header="你是一个善于回答用户问题的智能AI助手\n请保持你的回答简洁清楚。不要说和下面文档中的无关的话，或重复你的回答\n用户现在给你的文档是",
        question=f"\n\n现在请问：{_ZH_QUESTION}\n",
        needle="\n小明最喜欢的实习的地点就是{key}。\n",
        answer="小明最喜欢的实习地点就是{key}。",
        key="上海人工智能实验室",
        distractors=("北京大学图书馆", "杭州西湖博物馆", "深圳科技园区", "南京长江大桥", "成都熊猫基地",
                     "广州图书馆", "苏州工业园区", "武汉光谷软件园"),
        lang="zh",
        word_start=False,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Haystacks


class Haystack:
    """Documents to cut haystacks from, tokenized lazily (and once) with the counting tokenizer."""

    def __init__(self, docs: list[str], source: str):
        if not docs:
            raise InputError(f"haystack {source} holds no text")
        self.docs, self.source = docs, source
        self._tokens: dict[tuple[int, int], list[int]] = {}

    def take(self, enc: Encoder, n: int, rng: random.Random) -> list[int]:
        """`n` tokens from the documents in a shuffled order (cycling through them if they run out)."""
        out: list[int] = []
        while len(out) < n:
            for i in rng.sample(range(len(self.docs)), len(self.docs)):
                out.extend(self._encoded(enc, i))
                if len(out) >= n:
                    break
        return out[:n]

    def _encoded(self, enc: Encoder, i: int) -> list[int]:
        key = (id(enc), i)
        if key not in self._tokens:
            self._tokens[key] = list(enc.encode(self.docs[i]))
        return self._tokens[key]


def filler_haystack(mode: str, n_docs: int = 64, seed: int = 0) -> Haystack:
    """passkey: the classic filler paragraph; en/zh: synthetic prose (no corpus needed)."""
    from .. import synthetic

    if mode == "passkey":
        unit = " " + synthetic.PASSKEY_FILLER.strip()  # every piece starts with a space: clean token joins
        return Haystack([unit], "filler")
    rng = random.Random(seed)
    make = synthetic.zh_document if mode == "zh" else synthetic.en_document
    return Haystack([make(rng) for _ in range(n_docs)], f"filler ({mode} synthetic prose)")


_HAN = re.compile(r"[\u4e00-\u9fff]")
MAX_HAYSTACK_CHARS = 4 << 20


def read_corpus(paths: Iterable[Path], lang: str, max_chars: int = MAX_HAYSTACK_CHARS) -> list[str]:
    """`text` of JSONL records (or whole .txt/.md files), preferring documents in `lang`."""
    matching, other, total = [], [], 0
    for path in paths:
        for text, doc_lang in _read_texts(path):
            if not text.strip():
                continue
            doc_lang = doc_lang or ("zh" if len(_HAN.findall(text[:2000])) > 0.2 * min(len(text), 2000) else "en")
            (matching if doc_lang == lang else other).append(text)
            total += len(text)
            if total >= max_chars:
                return matching or other
    return matching or other


def _read_texts(path: Path):
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a haystack only needs text; a broken line is not worth failing the eval
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    yield rec["text"], rec.get("lang")
    elif path.suffix in (".txt", ".md"):
        yield path.read_text(encoding="utf-8", errors="replace"), None


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt", ".md") and p.is_file())


def resolve_haystack(ws: Workspace, mode: str, source: str = "auto", seed: int = 0) -> Haystack:
    """`source`: a file/folder of JSONL/text, `filler`, or `auto` — passkey: the filler; en/zh: the
    workspace's prepared data, else the bundled examples corpus, else synthetic prose."""
    if source == "filler" or (source == "auto" and mode == "passkey"):
        return filler_haystack(mode, seed=seed)
    if source != "auto":
        path = Path(source)
        if not path.exists():
            raise InputError(f"haystack {path} does not exist")
        return Haystack(read_corpus(_corpus_files(path), TASKS[mode].lang), str(path))
    from ..config import ConfigError, examples_dir

    candidates = [ws.prepared / "kept"]
    try:
        candidates.append(examples_dir() / "corpus")
    except ConfigError:
        pass
    for folder in candidates:
        if folder.is_dir():
            docs = read_corpus(_corpus_files(folder), TASKS[mode].lang)
            if docs:
                return Haystack(docs, str(folder))
    return filler_haystack(mode, seed=seed)


# ---------------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    length: int
    depth: float
    repeat: int
    ids: list[int]  # the prompt in the model's tokens (BOS first)
    counted: int  # the prompt's length in counting tokens (BOS included with the model counter)
    context: int  # haystack tokens (counting tokens)
    needle_at: int  # counting-token index of the needle's first token in the prompt
    needle_len: int
    key: str
    reference: str  # the answer the edit score compares with (CDME: the needle itself)
    choices: list[str]  # forced-choice continuations; choices[0] is right


def build_sample(
    task: Task,
    haystack: Haystack,
    counter: Encoder,
    model_tok: Encoder,
    length: int,
    depth: float,
    repeat: int,
    *,
    seed: int = 0,
    buffer: int = 0,
    n_choices: int = 4,
    bos_id: Optional[int] = None,
) -> Sample:
    """One prompt of `length - buffer` counting tokens with the needle at `depth` percent of its haystack.

    `counter is model_tok` builds the prompt directly in model tokens; otherwise it is built in the
    counter's tokens, decoded and re-encoded with `model_tok` (CDME's cl100k parity).
    """
    rng = random.Random(f"needle/{seed}/{task.mode}/{length}/{depth}/{repeat}")
    key, distractors = task.draw(rng, n_choices)
    same = counter is model_tok
    bos = [bos_id] if (same and bos_id is not None) else []
    head, tail = counter.encode(task.header), counter.encode(task.question)
    needle = counter.encode(task.needle.format(key=key))
    n_ctx = length - buffer - len(bos) - len(head) - len(needle) - len(tail)
    if n_ctx < 0:
        raise LengthTooShort(f"length {length} is too short for the {task.mode} needle: its instruction, needle and "
                         f"question take {length - buffer - n_ctx} tokens; use lengths >= {length - n_ctx}")
    ctx = haystack.take(counter, n_ctx, rng)
    at = int(n_ctx * depth / 100)
    if task.word_start:
        at = _word_start(counter, ctx, at)
    ids = bos + head + ctx[:at] + needle + ctx[at:] + tail
    needle_at = len(bos) + len(head) + at
    if not same:
        ids = ([bos_id] if bos_id is not None else []) + list(model_tok.encode(counter.decode(ids)))
        counted = len(bos) + len(head) + n_ctx + len(needle) + len(tail)
    else:
        counted = len(ids)
    answer = task.answer.format(key=key)
    return Sample(length=length, depth=depth, repeat=repeat, ids=ids, counted=counted, context=n_ctx,
                  needle_at=needle_at, needle_len=len(needle),
                  key=key, reference=task.needle.format(key=key) if task.mode != "passkey" else key,
                  choices=[answer] + [task.answer.format(key=d) for d in distractors])


def _word_start(enc: Encoder, ctx: list[int], at: int) -> int:
    """Move `at` back to a token that starts a word, so the spliced needle joins text as whole words."""
    while 0 < at < len(ctx) and not enc.decode([ctx[at]]).startswith((" ", "\n")):
        at -= 1
    return at


# ---------------------------------------------------------------------------------------------------
# Scores


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def trim_prediction(prediction: str, reference: str) -> str:
    """NeedleBench's trim: keep at most 1.2x the reference, ending at the reference's last character
    when it appears past 0.8x (so trailing chatter does not count against a right answer)."""
    l08, l12 = int(0.8 * len(reference)), int(1.2 * len(reference))
    out = prediction[:l12]
    if len(out) > l08 and reference and reference[-1] in out[l08:]:
        out = out[: l08 + out[l08:].index(reference[-1]) + 1]
    return out


def edit_score(prediction: str, reference: str, trim: bool = True) -> float:
    """OpenCompass CDME: 100·(1 − Lev(pred, ref)/max(|pred|, |ref|)) on whitespace-stripped strings."""
    pred, ref = re.sub(r"\s+", "", prediction), re.sub(r"\s+", "", reference)
    if trim:
        pred = trim_prediction(pred, ref)
    longest = max(len(pred), len(ref))
    return 100.0 * (1 - levenshtein(pred, ref) / longest) if longest else 100.0


def exact_match(mode: str, prediction: str, key: str) -> bool:
    if mode == "passkey":
        m = re.search(r"\d+", prediction)
        return bool(m) and m.group(0) == key  # strings: cl100k chunks digits in threes (SPEC §9.2)
    norm = lambda s: re.sub(r"\s+", "", s).lower()  # noqa: E731
    return norm(key) in norm(prediction)


def choice_logprobs(model, prompt: Sequence[int], continuations: Sequence[Sequence[int]], pad_id: int = 0) -> list[float]:
    """Sum of log p(continuation | prompt) for each continuation, in one right-padded batch.

    Right padding needs no mask: under causal attention no real token sees a later pad.
    """
    import torch

    device = next(model.parameters()).device
    n = len(prompt)
    width = n + max(len(c) for c in continuations)
    rows = [list(prompt) + list(c) + [pad_id] * (width - n - len(c)) for c in continuations]
    with torch.inference_mode():
        hidden = model(torch.tensor(rows, device=device), return_hidden=True)
        out = []
        for r, c in enumerate(continuations):
            logp = model.output(hidden[r, n - 1 : n - 1 + len(c)]).float().log_softmax(-1)
            out.append(float(logp.gather(-1, torch.tensor(list(c), device=device)[:, None]).sum()))
    return out


# ---------------------------------------------------------------------------------------------------
# Grids, heatmap, table


def grids(records: list[dict], lengths: list[int], depths: list[float]) -> dict[str, list[list[Optional[float]]]]:
    """metric -> [depth][length] mean over repeats, in 0-100."""
    out = {}
    for metric in METRICS:
        cells: dict[tuple, list[float]] = {}
        for r in records:
            cells.setdefault((r["depth"], r["length"]), []).append(float(r[metric]) * (1 if metric == "edit" else 100))
        out[metric] = [[_mean(cells.get((d, n))) for n in lengths] for d in depths]
    return out


def _mean(xs: Optional[list[float]]) -> Optional[float]:
    return round(sum(xs) / len(xs), 2) if xs else None


def needle_cmap():
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("needle", list(COLORS))


def plot_heatmap(grid: list[list[Optional[float]]], lengths: list[int], depths: list[float], path: Path,
                 title: str, trained_length: Optional[int] = None, label: str = "score") -> Path:
    """Lengths on x, depth on y (0 at the top), 0-100 on the report's red-yellow-green scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cmap = needle_cmap()
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(lengths) + 2.5), max(3.5, 0.38 * len(depths) + 1.8)))
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    if len(lengths) * len(depths) <= 400:
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=7, color="#222222")
    if trained_length is not None:
        inside = sum(1 for n in lengths if n <= trained_length)
        if 0 < inside < len(lengths):
            ax.axvline(inside - 0.5, color="white", linestyle="--", linewidth=1.5)
            ax.text(inside - 0.55, len(depths) - 0.6, f"trained length {_fmt_len(trained_length)}", fontsize=7,
                    rotation=90, ha="right", va="bottom", color="white")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt_len(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 and n % 1000 == 0 else str(n)


def print_table(grid: list[list[Optional[float]]], lengths: list[int], depths: list[float], title: str) -> None:
    from rich.table import Table

    from ..console import out

    table = Table(title=title, show_lines=False)
    table.add_column("depth %", justify="right")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for d, row in zip(depths, grid):
        table.add_row(f"{d:g}", *[_cell(v) for v in row])
    cols = list(zip(*grid)) if grid else []
    table.add_row("mean", *[_cell(_mean([v for v in col if v is not None])) for col in cols], style="bold")
    out.print(table)


def _cell(v: Optional[float]) -> str:
    if v is None:
        return "-"
    colour = "red" if v < 33.4 else "yellow" if v < 66.7 else "green"
    return f"[{colour}]{v:.0f}[/{colour}]"


# ---------------------------------------------------------------------------------------------------
# The command


def resolve_config(base: NeedleConfig, **overrides) -> NeedleConfig:
    """The recipe's `eval.needle` with the command-line overrides that were given (None = not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return dataclasses.replace(base, **given)
    except TypeError as e:
        raise InputError(str(e)) from None


def _counter(cfg: NeedleConfig, model_tok):
    if cfg.token_counter == "model":
        return model_tok
    from ..tokenizer import Tokenizer

    return Tokenizer.default()  # cl100k ids, as CDME counts with tiktoken's gpt-4 encoding


def _rope_overrides(cfg: NeedleConfig, eval_default: Optional[dict] = None) -> dict:
    """--rope-scaling, else eval.needle.rope_scaling, else eval.rope_scaling, else the checkpoint's own."""
    if cfg.rope_scaling is None:
        return {"rope_scaling": dict(eval_default)} if eval_default else {}
    if cfg.rope_scaling == "none":
        return {"rope_scaling": None}
    return {"rope_scaling": {"type": cfg.rope_scaling, "factor": float(cfg.factor)}}


def default_name(cfg: NeedleConfig) -> str:
    name = f"needle-{cfg.mode}"
    if cfg.rope_scaling and cfg.rope_scaling != "none":
        name += f"-{cfg.rope_scaling}{cfg.factor:g}"
    return name


def run_needle(
    ws: Workspace,
    recipe: Recipe,
    run: str = "default",
    checkpoint: Optional[Path] = None,
    *,
    mode: Optional[str] = None,
    lengths: Optional[list[int]] = None,
    depths: Optional[list[float]] = None,
    repeats: Optional[int] = None,
    rope_scaling: Optional[str] = None,
    factor: Optional[float] = None,
    haystack: Optional[str] = None,
    name: Optional[str] = None,
    json_out: bool = False,
) -> Path:
    """Run the grid on a checkpoint and write eval/<run>/<name>/; returns that folder."""
    import time

    import torch

    from ..console import log, print_json, progress, warn
    from ..layout import atomic_write_text, staging_dir, write_manifest
    from ..convert import load_model
    from .common import load_tokenizer, resolve_checkpoint

    cfg = resolve_config(recipe.eval.needle, mode=mode, lengths=lengths, depths=depths, repeats=repeats,
                         rope_scaling=rope_scaling, factor=factor, haystack=haystack)
    path = resolve_checkpoint(ws, run, checkpoint)
    out_dir = ws.eval_dir(name or default_name(cfg), run)
    tok = load_tokenizer(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, device=device, **_rope_overrides(cfg, recipe.eval.rope_scaling))
    mcfg = model.config
    trained = int(mcfg.max_position_embeddings)  # extend-context writes the length it trained at here
    task = TASKS[cfg.mode]
    counter = _counter(cfg, tok)
    hay = resolve_haystack(ws, cfg.mode, cfg.haystack, seed=cfg.seed)
    log(f"needle {cfg.mode}: {path} ({_rope_desc(mcfg)}), haystack {hay.source}, "
        f"{len(cfg.lengths)} lengths x {len(cfg.depths)} depths x {cfg.repeats} repeats")

    t0 = time.perf_counter()
    records: list[dict] = []
    skipped: list[int] = []
    with progress("needle", total=len(cfg.lengths) * len(cfg.depths) * cfg.repeats) as bar:
        for length in cfg.lengths:
            try:
                samples = [build_sample(task, hay, counter, tok, length, d, r, seed=cfg.seed,
                                        buffer=cfg.length_buffer, n_choices=cfg.choices, bos_id=tok.bos_id)
                           for d in cfg.depths for r in range(cfg.repeats)]
            except LengthTooShort as e:
                warn(f"{e}; skipping that length")
                skipped.append(length)
                bar.advance(len(cfg.depths) * cfg.repeats)
                continue
            records.extend(_score_samples(model, tok, task, samples, cfg, recipe.eval.batch_size, bar))
    if not records:
        raise InputError(f"no grid length fits the {cfg.mode} needle's prompt; use longer eval.needle.lengths")

    lengths = [n for n in cfg.lengths if n not in skipped]
    grid = grids(records, lengths, cfg.depths)
    main = "exact" if cfg.mode == "passkey" else "edit"
    summary = _summary(cfg, lengths, path, mcfg, trained, hay, grid, records, main, time.perf_counter() - t0)
    summary["skipped_lengths"] = skipped
    title = f"{cfg.mode} needle · {path.parent.name + '/' if path.name == 'final' else ''}{path.name} · {_rope_desc(mcfg)}"
    with staging_dir(out_dir) as tmp:
        atomic_write_text(tmp / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        for metric in METRICS:
            fname = "heatmap.png" if metric == main else f"heatmap-{metric}.png"
            plot_heatmap(grid[metric], lengths, cfg.depths, tmp / fname,
                         f"{title}\n{_METRIC_LABEL[metric]} (mean {summary['mean'][metric]:.1f})",
                         trained_length=trained, label=_METRIC_LABEL[metric])
        write_manifest(tmp, "eval-needle", config=cfg, inputs=[path],
                       stats={"mean": summary["mean"], "main_metric": main, "samples": len(records),
                              "seconds": summary["seconds"]},
                       model=summary["model"])
    if json_out:
        print_json({"out": str(out_dir), **{k: summary[k] for k in ("mode", "main_metric", "mean", "by_length")}})
    else:
        print_table(grid[main], lengths, cfg.depths, f"{title} — {_METRIC_LABEL[main]}")
        log(f"wrote {out_dir} (mean {main} {summary['mean'][main]:.1f}, forced choice "
            f"{summary['mean']['choice']:.1f}, chance {100 / (cfg.choices + 1):.0f})")
    return out_dir


_METRIC_LABEL = {"exact": "exact match %", "edit": "edit-distance score", "choice": "forced choice %"}


def _rope_desc(cfg) -> str:
    rs = cfg.rope_scaling
    scaling = f", {rs['type']} x{float(rs.get('factor', 1)):g}" if rs else ""
    return f"RoPE base {cfg.rope_theta:g}{scaling}, trained {cfg.max_position_embeddings}"


def _score_samples(model, tok, task: Task, samples: list[Sample], cfg: NeedleConfig, batch_size: int, bar) -> list[dict]:
    from ..generate import generate

    answers = generate(model, [s.ids for s in samples], cfg.max_new_tokens, stop_ids=tok.stop_ids,
                       batch_size=batch_size, pad_id=tok.pad_id)
    records = []
    for s, ans in zip(samples, answers):
        pred = tok.decode(ans)
        lp = choice_logprobs(model, s.ids, [tok.encode(c) for c in s.choices], pad_id=tok.pad_id)
        records.append({
            "mode": task.mode, "length": s.length, "depth": s.depth, "repeat": s.repeat,
            "prompt_tokens": len(s.ids), "counted_tokens": s.counted, "needle_at": s.needle_at,
            "key": s.key, "prediction": pred,
            "exact": int(exact_match(task.mode, pred, s.key)),
            "edit": round(edit_score(pred, s.reference, trim=cfg.trim), 2),
            "choice": int(lp[0] > max(lp[1:])),
            "choice_logprobs": [round(x, 3) for x in lp],
        })
        bar.advance(1)
    return records


def _summary(cfg, lengths, path, mcfg, trained, hay, grid, records, main, seconds) -> dict:
    def mean_of(rs, metric):
        vals = [float(r[metric]) * (1 if metric == "edit" else 100) for r in rs]
        return round(sum(vals) / len(vals), 2) if vals else None

    inside = [r for r in records if r["length"] <= trained]
    beyond = [r for r in records if r["length"] > trained]
    return {
        "mode": cfg.mode,
        "checkpoint": str(path),
        "model": {"rope_theta": mcfg.rope_theta, "rope_scaling": mcfg.rope_scaling,
                  "max_position_embeddings": mcfg.max_position_embeddings, "trained_length": trained},
        "haystack": hay.source,
        "token_counter": cfg.token_counter,
        "lengths": lengths,
        "depths": cfg.depths,
        "repeats": cfg.repeats,
        "choices": cfg.choices,
        "main_metric": main,
        "mean": {m: mean_of(records, m) for m in METRICS},
        "mean_within_trained_length": {m: mean_of(inside, m) for m in METRICS} if inside else None,
        "mean_beyond_trained_length": {m: mean_of(beyond, m) for m in METRICS} if beyond else None,
        "by_length": {str(n): {m: mean_of([r for r in records if r["length"] == n], m) for m in METRICS}
                      for n in lengths},
        "grids": grid,
        "seconds": round(seconds, 1),
    }
