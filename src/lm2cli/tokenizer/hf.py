"""HF tokenizer files for any lm2 tokenizer: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`.

`hf_tokenizer_files(tok)` is what `Tokenizer.save` writes beside the backend's own files, so a folder
lm2 writes opens with `transformers.AutoTokenizer` (a `PreTrainedTokenizerFast`, no remote code) and
gives lm2's ids exactly:

* tiktoken backend: byte-level BPE. Vocabulary = lm2's ids (bytes in GPT-2's byte-to-unicode
  alphabet); merges = *every* split of a token into two tokens, ordered by the token's rank. tiktoken
  merges whichever adjacent pair concatenates to the lowest-ranked token, whatever the pair; listing
  only one "parent" pair per token (what a naive conversion does) misses the rare merge tiktoken
  makes through another split.
  `ignore_merges` mirrors tiktoken's whole-piece shortcut. The pre-tokenizer is lm2's own pattern
  (split digits or cl100k's), with cl100k's `\\p{N}{1,3}+` written `\\p{N}{1,3}`: HF's regex engine
  (Oniguruma) reads `{1,3}+` as "one or more runs of 1-3", an unbounded digit run.
* SentencePiece backend: SentencePiece BPE as HF's BPE with byte fallback (the same every-split merges,
  by piece score), spaces as `▁`, the dummy prefix where the model adds one, no pre-tokenizer;
  `tokenizer.model` is copied too.

Merges are written "left right" (a space cannot occur inside either form's pieces), which every
`tokenizers` release reads. Special tokens are `added_tokens` at their explicit ids (and in the
vocabulary, so HF keeps those ids).
The chat template is `lm2cli.chat.JINJA_TEMPLATE`, which renders byte-identically to `chat.render`: BOS,
then per message `<|im_start|>{role}[ name={name}]\\n{content}<|im_end|>\\n`, then
`<|im_start|>assistant\\n` with `add_generation_prompt`.
"""

from __future__ import annotations

import functools
import json

from ..chat import JINJA_TEMPLATE as CHAT_TEMPLATE
from ..errors import Lm2Error
from .runtime import BOS, CHAT_TOKENS, EOS, IM_END, UNK, Tokenizer

MODEL_MAX_LENGTH = 1_000_000_000_000_000_019_884_624_838_656  # HF's "no limit" (VERY_LARGE_INTEGER)


def chat_template() -> str:
    return CHAT_TEMPLATE


def hf_pattern(pat_str: str) -> str:
    r"""A tiktoken pattern as HF's Split pre-tokenizer must read it (`\p{N}{1,3}+` -> `\p{N}{1,3}`).

    Only the digit rule changes meaning in Oniguruma; the other possessive quantifiers (`?+` `++`
    `*+`) are possessive there too."""
    return pat_str.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (ByteLevel's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def every_split_merges(vocab: dict, priority: dict) -> list[tuple]:
    """(left, right) for every way a token splits into two tokens, ordered by the token's priority
    (lower merges first): BPE that merges any adjacent pair forming a token, as tiktoken and
    SentencePiece do."""
    merges = []
    for token, p in priority.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                merges.append((p, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def bpe_merges(tok) -> list[tuple[bytes, bytes]]:
    """A tiktoken tokenizer's merges as byte pairs (every split, by rank): for tokenizer.json and GGUF."""
    ranks = tok._ranks
    multi = {t: r for t, r in ranks.items() if len(t) > 1}
    return every_split_merges(ranks, multi)


# ---------------------------------------------------------------------------------------------------


def hf_tokenizer_files(tok: Tokenizer) -> dict[str, bytes]:
    """file name -> contents; see the module docstring."""
    if tok.backend == "tiktoken":
        out = {"tokenizer.json": _dump(_tiktoken_json(tok))}
    elif tok.backend == "sentencepiece":
        out = {"tokenizer.model": tok.model_bytes}
        spm_json = _spm_json(tok)
        if spm_json is not None:
            out["tokenizer.json"] = _dump(spm_json)
    else:
        raise Lm2Error(f"no HF tokenizer files for a {tok.backend or type(tok).__name__} tokenizer")
    out["tokenizer_config.json"] = _dump(_tokenizer_config(tok, fast="tokenizer.json" in out), indent=2)
    out["special_tokens_map.json"] = _dump(_special_tokens_map(tok), indent=2)
    return out


def _dump(obj, indent: int | None = None) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def _added_tokens(tok: Tokenizer) -> list[dict]:
    return [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for name, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]


def _bos_post_processor(tok: Tokenizer) -> dict:
    """`add_bos_token=True`: `tokenizer(text)` gives `<s>` + ids, as InternLM2's tokenizers do."""
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [tok.bos_id], "tokens": [BOS]}}}


def _with_specials(vocab: dict[str, int], tok: Tokenizer) -> dict[str, int]:
    for name, i in tok.special_tokens.items():
        if vocab.get(name, i) != i:
            raise Lm2Error(f"special token {name!r} is also ordinary token {vocab[name]}; HF cannot hold both")
        vocab[name] = i
    return dict(sorted(vocab.items(), key=lambda x: x[1]))


def _tiktoken_json(tok) -> dict:
    b2u = bytes_to_unicode()
    text = {t: "".join(b2u[b] for b in t) for t in tok._ranks}
    vocab = {text[t]: r for t, r in tok._ranks.items()}
    merges = [f"{text[a]} {text[b]}" for a, b in bpe_merges(tok)]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tok),
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": hf_pattern(tok.pat_str)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": _bos_post_processor(tok),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": _with_specials(vocab, tok), "merges": merges},
    }


def _spm_json(tok) -> dict | None:
    """None where HF cannot mirror the model: a normaliser other than identity, or whitespace folding."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from .spm import BYTE, NORMAL, USER_DEFINED

    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2 or spec.name not in ("identity", "") or spec.remove_extra_whitespaces:
        return None
    specials = {i: name for name, i in tok.special_tokens.items()}
    vocab: dict[str, int] = {}
    priority: dict[str, tuple] = {}
    for i, p in enumerate(proto.pieces):
        if i in specials:
            continue
        vocab[p.piece] = i
        if p.type in (NORMAL, USER_DEFINED) and len(p.piece) > 1:
            priority[p.piece] = (-p.score, i)  # SentencePiece merges the highest-scoring piece first
        elif p.type not in (NORMAL, BYTE, USER_DEFINED):
            continue
    pairs = every_split_merges(vocab, priority)
    if any(" " in a or " " in b for a, b in pairs):
        return None  # a piece with a raw space cannot be written in the "left right" merge form
    merges = [f"{a} {b}" for a, b in pairs]
    normalizers = ([{"type": "Prepend", "prepend": "\u2581"}] if spec.add_dummy_prefix else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tok),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": _bos_post_processor(tok),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": _with_specials(vocab, tok), "merges": merges},
    }


def _tokenizer_config(tok: Tokenizer, fast: bool) -> dict:
    """InternLM2's released tokenizer_config.json fields, with the chat template and lm2's class."""
    base = dict(tok.config) if tok.backend == "sentencepiece" else {}
    for key in ("auto_map", "tokenizer_file"):  # remote code lm2 does not ship; the fast file is ours
        base.pop(key, None)
    base.update({
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in _added_tokens(tok)},
        "additional_special_tokens": [t for t in reversed(CHAT_TOKENS)],
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast" if fast else base.get("tokenizer_class", "InternLM2Tokenizer"),
        "lm2": {"fingerprint": tok.fingerprint, "backend": tok.backend, "reward_token": tok.reward_token,
                "stop_tokens": [EOS, IM_END]},
    })
    return dict(sorted(base.items()))


def _special_tokens_map(tok: Tokenizer) -> dict:
    return {"additional_special_tokens": list(reversed(CHAT_TOKENS)), "bos_token": BOS, "eos_token": EOS,
            "pad_token": EOS, "unk_token": UNK}
