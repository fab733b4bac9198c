"""lm2's tokenizers (SPEC §3).

* `runtime`: the interface every command uses (`Tokenizer`: encode/decode, the InternLM2 special ids,
  fingerprint, save/load) and `Tokenizer.load`, which picks the backend a folder holds;
* `bpe`: the tiktoken backend (cl100k offline, lm2's id layouts);
* `spm`: the SentencePiece backend (released InternLM2 `tokenizer.model`);
* `vocab`: `lm2 tokenize build-vocab` (pruned cl100k + Chinese BPE, the recipe's vocabulary arithmetic);
* `hf`: the HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat template).

The runtime names are imported here; the vocabulary builder and the HF writer load on first use, so
importing a tokenizer does not import what builds one (`vocab` reads `lm2cli.tokens`, which needs
only the runtime).
"""

from __future__ import annotations

import importlib

from .bpe import (
    CL100K_CACHE_KEY,
    CL100K_PAT,
    CL100K_SHA256,
    CL100K_URL,
    CONFIG_FILE,
    MIN_SPARES,
    RANKS_FILE,
    SPLIT_DIGITS_PAT,
    TiktokenTokenizer,
    bpe_parts,
    cl100k_file,
    dump_ranks,
    ensure_cl100k_offline,
    load_cl100k_ranks,
    parse_ranks,
    special_block,
)
from .runtime import (
    BOS,
    CHAT_TOKENS,
    EOS,
    IM_END,
    IM_START,
    REWARD_FROM_TOP,
    UNK,
    Tokenizer,
    scrub_surrogates,
)
from .spm import SentencePieceTokenizer

__all__ = [
    "BOS", "CHAT_TOKENS", "CL100K_CACHE_KEY", "CL100K_PAT", "CL100K_SHA256", "CL100K_URL", "CONFIG_FILE", "EOS",
    "IM_END", "IM_START", "MIN_SPARES", "RANKS_FILE", "REWARD_FROM_TOP", "SPLIT_DIGITS_PAT", "UNK",
    "SentencePieceTokenizer", "TiktokenTokenizer", "Tokenizer", "bpe_parts", "cl100k_file", "dump_ranks",
    "ensure_cl100k_offline", "load_cl100k_ranks", "parse_ranks", "scrub_surrogates", "special_block",
]

_LAZY = {
    "vocab": ("FIRST_BYTE_ID", "FIRST_MERGED_ID", "ZH_LANGS", "build_vocab", "check_arithmetic", "compression",
              "count_pretokens", "learn_bpe", "planned_vocab_size", "pretokenizer_pattern", "prune_cl100k",
              "resolve_workers", "run_build_vocab", "sample_by_lang", "_merge_word", "_HAN", "_NUMERIC"),
    "hf": ("hf_tokenizer_files", "chat_template", "bpe_merges"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if name == "prepared_files":
        from ..data.prepared import prepared_files

        return prepared_files
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
