"""The tokenizer interface every lm2 command codes against, and `Tokenizer.load`, which picks a backend.

A tokenizer is text <-> ids plus the InternLM2 roles: `bos_id` `eos_id` `pad_id` (= eos) `unk_id`,
`im_start_id` `im_end_id`, `stop_ids` (eos and `<|im_end|>`: chat turns end in `<|im_end|>`, P9) and
`reward_id` (the spare 17 ids below the top, InternLM2's 92527 = 92544 - 17). Callers never branch on
the backend:

* `bpe.TiktokenTokenizer`: lm2's own files (`lm2_tokenizer.json` + `tokenizer.tiktoken`), the default
  cl100k layout and vocabularies built by `lm2 tokenize build-vocab`;
* `spm.SentencePieceTokenizer`: a released InternLM2 folder (`tokenizer.model` + `tokenizer_config.json`).

Shared policies: `encode` never turns plain text into a special token; `allow_special=True` parses
special-token strings (hand-written templates only). Special tokens decode to their names.
`fingerprint` hashes what fixes the ids (the backend's own files), so re-saving a tokenizer with
other HF side files keeps it. `save` writes the backend's files plus the HF files (`hf.py`:
tokenizer.json, tokenizer_config.json with the chat template, special_tokens_map.json), so every
folder lm2 writes opens with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from ..layout import Workspace

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The last six ids of every InternLM2 vocabulary, in id order (92538..92543 in the released models).
CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", IM_END, IM_START)
REWARD_FROM_TOP = 17  # InternLM2: reward token 92527 = 92544 - 17 (`[UNUSED_TOKEN_130]`)


def scrub_surrogates(text: str) -> str:
    """Replace lone UTF-16 surrogates (unencodable in UTF-8) by U+FFFD; other text is returned as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def int_list(ids: Iterable[int]) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


class Tokenizer:
    """The interface (see the module docstring). Backends implement the methods that raise
    NotImplementedError and set `name`, `reward_token`, `info`, `_special`; the roles and I/O are shared."""

    name: str
    reward_token: str
    info: dict
    backend: str = ""

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer a folder carries: lm2's files first, else a released SentencePiece tokenizer."""
        from . import bpe, spm

        path = Path(path)
        if (path / bpe.CONFIG_FILE).is_file() or (path / bpe.RANKS_FILE).is_file():
            return bpe.TiktokenTokenizer.load(path)
        if (path / spm.MODEL_FILE).is_file():
            return spm.SentencePieceTokenizer.load(path)
        if (path / "tokenizer.json").is_file():
            raise InputError(f"{path} holds only a HF tokenizer.json; lm2 reads its own files "
                             f"({bpe.CONFIG_FILE} + {bpe.RANKS_FILE}) or a SentencePiece {spm.MODEL_FILE}")
        raise InputError(f"{path} holds no tokenizer (needs {bpe.CONFIG_FILE} + {bpe.RANKS_FILE}, "
                         f"or {spm.MODEL_FILE} + tokenizer_config.json)")

    @classmethod
    def default(cls) -> Tokenizer:
        """Full cl100k (ids equal tiktoken's) plus InternLM2 specials at 100256 and up."""
        from .bpe import default_tokenizer

        return default_tokenizer()

    @classmethod
    def from_workspace(cls, ws: Workspace) -> Tokenizer:
        """The workspace's built `tokenizer/` if there is one, else the default cl100k tokenizer."""
        if ws.tokenizer.exists():
            from ..layout import read_manifest

            read_manifest(ws.tokenizer, kinds=("tokenizer",), what="tokenizer")
            return Tokenizer.load(ws.tokenizer)
        return Tokenizer.default()

    # -- what a backend implements ----------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """An ordinary token's bytes; a special token's name, UTF-8 encoded."""
        raise NotImplementedError

    def token_to_id(self, token: str | bytes) -> int:
        """A special token's name, or an ordinary token's text/bytes, to its id (KeyError if absent)."""
        raise NotImplementedError

    _special: dict[str, int]  # name -> id of every special token, set by the backend

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """The backend's own saved form, file name -> contents (deterministic: no timestamps)."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict[str, bytes]:
        """What the fingerprint hashes: by default the backend's files."""
        return self.files()

    # -- shared behaviour --------------------------------------------------------------------------

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8, bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos, allow_special=allow_special) for t in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array (the shard writer's path)."""
        import numpy as np

        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Invalid UTF-8 (a sequence cut inside a character) decodes to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    @property
    def _special_ids(self) -> frozenset[int]:
        cached = self.__dict__.get("_special_id_set")
        if cached is None:
            cached = self.__dict__["_special_id_set"] = frozenset(self._special.values())
        return cached

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    @property
    def fingerprint(self) -> str:
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256()
            for name, data in sorted(self.fingerprint_parts().items()):
                h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
            cached = self.__dict__["_fingerprint"] = "sha256:" + h.hexdigest()
        return cached

    def hf_files(self) -> dict[str, bytes]:
        """tokenizer.json / tokenizer_config.json / special_tokens_map.json (and tokenizer.model for SPM)."""
        cached = self.__dict__.get("_hf_files")
        if cached is None:
            from .hf import hf_tokenizer_files

            cached = self.__dict__["_hf_files"] = hf_tokenizer_files(self)
        return dict(cached)

    def save(self, path: str | os.PathLike, hf: bool = True) -> Path:
        """The backend's files, and with `hf` the HF tokenizer files beside them (`load` reads it back)."""
        from ..layout import atomic_write_bytes

        path = Path(path)
        out = self.files()
        if hf:  # SPM: lm2's tokenizer_config.json (chat template added) replaces the released one
            out.update(self.hf_files())
        for name, data in out.items():
            atomic_write_bytes(path / name, data)
        return path

    # -- roles -------------------------------------------------------------------------------------

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
        return self._special[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special[IM_END]

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
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, {self.fingerprint[:19]})"
