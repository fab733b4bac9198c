"""Offline stand-ins for a released InternLM2 folder (internlm2-chat-7b's layout, scaled down).

* `train_spm(dir)`: a SentencePiece BPE model trained with the `sentencepiece` library on the examples'
  text (examples/corpus, examples/sft), laid out like InternLM2's `tokenizer.model`: `<unk>` `<s>` `</s>`
  at 0/1/2, byte fallback `<0x00>`..`<0xFF>` at 3..258, identity normaliser, no dummy prefix, split
  digits, then the learned pieces, then `N_SPARE` user-defined `[UNUSED_TOKEN_k]` pieces at the top of
  a `VOCAB`-id vocabulary. As in the released `tokenizer_config.json`, `added_tokens_decoder` renames the
  last six to `<|plugin|>` .. `<|im_start|>` (InternLM2: 92538..92543 of 92544; here 2042..2047 of
  2048) and the reward token is the spare 17 below the top (`[UNUSED_TOKEN_130]`, as 92527).
* `released_folder(dir)`: that tokenizer beside a random-initialised tiny InternLM2 saved through lm2's
  own HF writer (`lm2cli.convert.save_model`) sharded in bf16, with the released tokenizer_config.json
  (InternLM2Tokenizer, remote code) and no lm2 manifest.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048
N_SPARE = 147
CHAT_NAMES = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
RELEASED_CHAT_TEMPLATE = (  # internlm2-chat's own (no names): lm2 writes a richer one that renders the same here
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


def example_texts(limit_bytes: int = 1_500_000) -> list[str]:
    """Text of the bundled examples: corpus documents (JSONL `text`, HTML/markdown/code as is) and the
    SFT conversations' contents, in a fixed order."""
    out, size = [], 0

    def add(text: str) -> None:
        nonlocal size
        if text.strip() and size < limit_bytes:
            out.append(text)
            size += len(text.encode("utf-8"))

    for path in sorted((ROOT / "examples" / "corpus").rglob("*")):
        if path.suffix in (".bin", ".zst") or not path.is_file() or "malformed" in path.parts:
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8", "replace")
        if ".jsonl" in path.name:
            for line in io.StringIO(text):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    add(rec["text"])
        else:
            add(text)
    for path in sorted((ROOT / "examples" / "sft").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines()[:2000]:
            add("\n".join(m["content"] for m in json.loads(line)["messages"]))
    return out


def released_tokenizer_config() -> dict:
    n = VOCAB
    decoder = {str(i): name for i, name in enumerate(("<unk>", "<s>", "</s>"))}
    decoder.update({str(n - 6 + k): name for k, name in enumerate(CHAT_NAMES)})
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {i: {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for i, c in decoder.items()},
        "additional_special_tokens": list(reversed(CHAT_NAMES)),
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "chat_template": RELEASED_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def train_spm(out: Path, texts: list[str] | None = None) -> Path:
    """tokenizer.model + tokenizer_config.json in `out` (see the module docstring); returns `out`."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = texts if texts is not None else example_texts()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for text in texts for t in text.split("\n") if t.strip()),
        model_writer=buf, model_type="bpe", vocab_size=VOCAB - N_SPARE, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, max_sentence_length=1 << 16,
        train_extremely_large_corpus=False, minloglevel=2, hard_vocab_limit=True)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for k in range(N_SPARE):  # the released model's spares: user-defined pieces at the top ids
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"[UNUSED_TOKEN_{k}]", 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    assert len(proto.pieces) == VOCAB
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    (out / "tokenizer_config.json").write_text(json.dumps(released_tokenizer_config(), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": list(reversed(CHAT_NAMES)), "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    return out


_SESSION: dict[str, Path] = {}


def session_spm(tmp_path_factory) -> Path:
    """`train_spm` once per test session (pytest's session-wide `tmp_path_factory`), shared by modules."""
    if "spm" not in _SESSION:
        _SESSION["spm"] = train_spm(tmp_path_factory.mktemp("released-spm"))
    return _SESSION["spm"]


def released_folder(out: Path, spm_dir: Path, seed: int = 0, max_shard_size: int = 200_000) -> Path:
    """A released-style InternLM2 folder: sharded bf16 safetensors + index, config.json, tokenizer.model,
    tokenizer_config.json; nothing lm2-specific."""
    import shutil

    import torch

    from lm2cli.config import ModelConfig
    from lm2cli.convert import save_model
    from lm2cli.model import InternLM2

    torch.manual_seed(seed)
    model = InternLM2(ModelConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY))
    save_model(model, out, dtype=torch.bfloat16, max_shard_size=max_shard_size)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(Path(spm_dir) / name, Path(out) / name)
    gen = {"bos_token_id": 1, "eos_token_id": [2, VOCAB - 2], "pad_token_id": 2}
    (Path(out) / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(out)
