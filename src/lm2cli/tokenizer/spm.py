"""The SentencePiece backend: released InternLM2 tokenizers (`tokenizer.model` + `tokenizer_config.json`).

The released file is a SentencePiece BPE model with byte fallback (`<0x00>`..`<0xFF>` at ids 3..258),
`<unk>` `<s>` `</s>` at 0/1/2 and spare pieces `[UNUSED_TOKEN_k]` at the top. `tokenizer_config.json`'s
`added_tokens_decoder` renames the last six spares to the chat tokens (`<|plugin|>` 92538 ..
`<|im_start|>` 92543); the model file itself keeps the old names, and a folder without that map
(early chat releases, whose template wrote `[UNUSED_TOKEN_146]`) gets the same names by position.
Special tokens here are the control, unknown and user-defined pieces, every `[UNUSED_TOKEN_k]` and
whatever `added_tokens_decoder` names; the reward token is the one 17 ids below the top (92527,
`[UNUSED_TOKEN_130]`).

Ordinary text goes through SentencePiece unchanged (its normaliser, byte fallback, split digits);
special tokens are only parsed with `allow_special=True`, as in the tiktoken backend: SentencePiece
itself matches user-defined pieces (the released spares) inside any text, so plain text holding such
a name gets it spelled in byte pieces instead. Decoding maps
pieces to bytes (`▁` is a space, byte pieces their byte), dropping the dummy-prefix space when the
model adds one, so `decode(encode(t)) == t` for text the model's normaliser leaves alone.

Fingerprint: the model file plus the special-token names and ids, so a folder re-saved with lm2's
tokenizer_config.json (chat template added) keeps its fingerprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

from ..errors import InputError
from .runtime import BOS, CHAT_TOKENS, EOS, REWARD_FROM_TOP, UNK, Tokenizer, int_list, scrub_surrogates

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
_UNUSED = regex.compile(r"\[UNUSED_TOKEN_\d+\]")
_BYTE = regex.compile(r"<0x([0-9A-Fa-f]{2})>")
# sentencepiece_model.proto ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _token_content(value) -> str | None:
    """tokenizer_config's `bos_token` etc.: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"

    def __init__(self, model: bytes, config: dict | None = None, name: str = "sentencepiece",
                 config_bytes: bytes | None = None):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self._model = model
        self._config = dict(config or {})
        self._config_bytes = config_bytes
        self.name = name
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        proto = pb.ModelProto()
        proto.ParseFromString(model)
        self.proto_spec = {"model_type": int(proto.trainer_spec.model_type),
                           "add_dummy_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
                           "normalizer": proto.normalizer_spec.name,
                           "byte_fallback": bool(proto.trainer_spec.byte_fallback),
                           "split_digits": bool(proto.trainer_spec.split_digits)}
        renamed = {int(i): _token_content(t) for i, t in (self._config.get("added_tokens_decoder") or {}).items()}
        n = len(proto.pieces)
        top = range(n - len(CHAT_TOKENS), n)
        if not set(CHAT_TOKENS) & set(renamed.values()) and all(_UNUSED.fullmatch(proto.pieces[i].piece) for i in top):
            # early internlm2-chat releases: no added_tokens_decoder, the chat tokens are the top six spares
            renamed.update(zip(top, CHAT_TOKENS))
        self._pieces: list[bytes] = []
        self._special = {}
        for i, p in enumerate(proto.pieces):
            text = renamed.get(i) or p.piece
            if i in renamed or p.type in (UNKNOWN, CONTROL, USER_DEFINED) or _UNUSED.fullmatch(p.piece):
                self._special[text] = i
                self._pieces.append(text.encode("utf-8"))
            elif p.type == BYTE:
                self._pieces.append(bytes([int(_BYTE.fullmatch(p.piece).group(1), 16)]))
            else:
                self._pieces.append(p.piece.replace("\u2581", " ").encode("utf-8"))
        # SentencePiece matches user-defined pieces (the released spares) inside plain text; lm2 spells
        # such text in byte pieces instead, so plain text never yields a special token.
        self._user_defined = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == USER_DEFINED}
        self._user_ids = frozenset(self._user_defined.values())
        self._byte_ids = {int(_BYTE.fullmatch(p.piece).group(1), 16): i for i, p in enumerate(proto.pieces)
                          if p.type == BYTE}
        self.reward_token = proto.pieces[n - REWARD_FROM_TOP].piece if n > REWARD_FROM_TOP else ""
        self.reward_token = renamed.get(n - REWARD_FROM_TOP) or self.reward_token
        self._special.setdefault(self.reward_token, n - REWARD_FROM_TOP)
        missing = [t for t in (UNK, BOS, EOS, *CHAT_TOKENS) if t not in self._special]
        if missing:
            raise InputError(f"SentencePiece tokenizer {name}: special tokens {missing} are missing "
                             f"(InternLM2 names them in {CONFIG_FILE}'s added_tokens_decoder)")
        self._special_re = regex.compile("|".join(regex.escape(t) for t in sorted(self._special, key=len, reverse=True)))
        self.info = {"layout": "sentencepiece", **self.proto_spec}

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        model_path, cfg_path = path / MODEL_FILE, path / CONFIG_FILE
        if not model_path.is_file():
            raise InputError(f"{path} holds no SentencePiece {MODEL_FILE}")
        cfg, raw = {}, None
        if cfg_path.is_file():
            raw = cfg_path.read_bytes()
            try:
                cfg = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{cfg_path} is not valid JSON: {e}") from None
        try:
            return cls(model_path.read_bytes(), cfg, name=f"spm-{path.name}", config_bytes=raw)
        except RuntimeError as e:  # sentencepiece's own parse errors
            raise InputError(f"{model_path} is not a SentencePiece model: {e}") from None

    # -- files -------------------------------------------------------------------------------------

    @property
    def model_bytes(self) -> bytes:
        return self._model

    @property
    def config(self) -> dict:
        return dict(self._config)

    def files(self) -> dict[str, bytes]:
        out = {MODEL_FILE: self._model}
        if self._config_bytes is not None:
            out[CONFIG_FILE] = self._config_bytes
        return out

    def fingerprint_parts(self) -> dict[str, bytes]:
        specials = json.dumps(sorted(self._special.items(), key=lambda x: x[1]), ensure_ascii=False).encode()
        return {MODEL_FILE: self._model, "special_tokens": specials}

    # -- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        text = scrub_surrogates(text)
        if not allow_special:
            return self._wrap(self._plain(text, self._sp.encode(text)), bos, eos)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self._sp.encode(text[pos:m.start()])
            ids.append(self._special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._sp.encode(text[pos:])
        return self._wrap(ids, bos, eos)

    def _plain(self, text: str, ids: list[int]) -> list[int]:
        """`ids` (SentencePiece's encoding of `text`) with user-defined pieces spelled in bytes."""
        if not self._user_ids.intersection(ids) or len(self._byte_ids) < 256:
            return ids
        out: list[int] = []
        pos = 0
        pattern = regex.compile("|".join(regex.escape(t) for t in sorted(self._user_defined, key=len, reverse=True)))
        for m in pattern.finditer(text):
            out += self._sp.encode(text[pos:m.start()]) if m.start() > pos else []
            out += [self._byte_ids[b] for b in m.group().encode("utf-8")]
            pos = m.end()
        return out + (self._sp.encode(text[pos:]) if pos < len(text) else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8, bos: bool = False, eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        if allow_special:
            return super().encode_batch(texts, num_threads, bos, eos, allow_special)
        texts = [scrub_surrogates(t) for t in texts]
        out = [self._plain(t, ids) for t, ids in zip(texts, self._sp.encode(texts, num_threads=num_threads))]
        return [self._wrap(ids, bos, eos) for ids in out] if (bos or eos) else out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = int_list(ids)
        data = b"".join(self._pieces[i] for i in ids)
        if self.proto_spec["add_dummy_prefix"] and ids and not self.is_special(ids[0]) and data.startswith(b" "):
            data = data[1:]
        return data

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[int(token_id)]

    def token_to_id(self, token: str | bytes) -> int:
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        if token in self._special:
            return self._special[token]
        i = self._sp.piece_to_id(token.replace(" ", "\u2581"))
        if i == self._sp.unk_id() or self.is_special(i):
            raise KeyError(f"{token!r} is not a token of {self.name}")
        return i

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()
