"""Needle samples: the needles (`TASKS`), the haystacks they hide in, and the prompts (`build_sample`).

Sample construction follows CDME: concatenate haystack tokens from shuffled documents, splice the
needle in at token `int(n·depth/100)` (passkey moves it back to the nearest word start, as the
synthetic documents do), add the instruction and the question. A cell's length counts the whole
prompt, instruction, question and (for chat models) the chat template's tokens included, up to
`length - length_buffer`.

Templates. `raw` is the prompt as plain text after `<s>` (base models). `chat` wraps the same text as
one user turn and the generation prompt, exactly as `chat.render(messages, add_generation_prompt=True)`
renders it and `chat.encode_prompt` tokenizes it (what SFT trained on; OpenCompass applies the model's
meta template the same way); the forced-choice continuations then start the assistant's answer.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...errors import InputError
from ...layout import Workspace


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
    from ...synthetic import PASSKEY_QUESTION, PASSKEY_TASK

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
    from ... import synthetic

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
    from ...config import ConfigError, examples_dir

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
    template: str = "raw"  # raw | chat


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
    bos_id: int | None = None,
    template: str = "raw",
) -> Sample:
    """One prompt of `length - buffer` counting tokens with the needle at `depth` percent of its haystack.

    `counter is model_tok` builds the prompt directly in model tokens; otherwise it is built in the
    counter's tokens, decoded and re-encoded with `model_tok` (CDME's cl100k parity). `template="chat"`
    makes the text one user turn of `model_tok`'s chat template (`chat_prompt`), its tokens counted.
    """
    rng = random.Random(f"needle/{seed}/{task.mode}/{length}/{depth}/{repeat}")
    key, distractors = task.draw(rng, n_choices)
    same = counter is model_tok
    chat = template == "chat"
    bos = [bos_id] if (same and bos_id is not None and not chat) else []
    wrap, before = chat_overhead(model_tok) if chat else (0, 0)
    head, tail = counter.encode(task.header), counter.encode(task.question)
    needle = counter.encode(task.needle.format(key=key))
    n_ctx = length - buffer - len(bos) - wrap - len(head) - len(needle) - len(tail)
    if n_ctx < 0:
        raise LengthTooShort(f"length {length} is too short for the {task.mode} needle: its instruction, needle and "
                         f"question take {length - buffer - n_ctx} tokens; use lengths >= {length - n_ctx}")
    ctx = haystack.take(counter, n_ctx, rng)
    at = int(n_ctx * depth / 100)
    if task.word_start:
        at = _word_start(counter, ctx, at)
    ids = bos + head + ctx[:at] + needle + ctx[at:] + tail
    needle_at = len(bos) + before + len(head) + at
    if chat:
        ids = chat_prompt(model_tok, counter.decode(ids))
        counted = len(ids) if same else wrap + len(head) + n_ctx + len(needle) + len(tail)
    elif not same:
        ids = ([bos_id] if bos_id is not None else []) + list(model_tok.encode(counter.decode(ids)))
        counted = len(bos) + len(head) + n_ctx + len(needle) + len(tail)
    else:
        counted = len(ids)
    # In a chat the continuation starts the assistant's turn, right after "<|im_start|>assistant\n".
    answers = [task.answer.format(key=k) for k in (key, *distractors)]
    return Sample(length=length, depth=depth, repeat=repeat, ids=ids, counted=counted, context=n_ctx,
                  needle_at=needle_at, needle_len=len(needle),
                  key=key, reference=task.needle.format(key=key) if task.mode != "passkey" else key,
                  choices=[a.lstrip() for a in answers] if chat else answers, template=template)


def chat_messages(text: str) -> list[dict]:
    """The needle prompt as a conversation: one user turn (NeedleBench / OpenCompass's HUMAN round)."""
    return [{"role": "user", "content": text}]


def chat_prompt(tok, text: str) -> list[int]:
    """`text` as a user turn plus the generation prompt, tokenized as SFT tokenizes conversations; it
    decodes to `chat.render(chat_messages(text), add_generation_prompt=True)`."""
    from ...chat import encode_prompt

    return encode_prompt(tok, chat_messages(text))


def chat_overhead(tok) -> tuple[int, int]:
    """(tokens the chat template adds around a user turn's text, of which before it)."""
    from ...chat import encode_prompt

    probe = "x"
    full, body = encode_prompt(tok, chat_messages(probe)), tok.encode(probe)
    start = next(i for i in range(len(full)) if full[i:i + len(body)] == body)
    return len(full) - len(body), start


def _word_start(enc: Encoder, ctx: list[int], at: int) -> int:
    """Move `at` back to a token that starts a word, so the spliced needle joins text as whole words."""
    while 0 < at < len(ctx) and not enc.decode([ctx[at]]).startswith((" ", "\n")):
        at -= 1
    return at


