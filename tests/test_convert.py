"""convert.py: lm2 models out to transformers (InternLM2 remote code, Llama) and llama.cpp (GGUF), and
released-style HF folders in (sharded bf16 safetensors, released config.json, pickles refused)."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle

import numpy as np
import pytest
import regex
import torch

from lm2cli.config import ModelConfig, TokenizerConfig
from lm2cli.convert import (
    GGUF_NAMES,
    GGUF_QKV,
    INDEX,
    WQKV,
    bpe_vocab,
    export_checkpoint,
    gguf_permute,
    gguf_unpermute,
    load_model,
    read_config,
    save_model,
    split_wqkv,
)
from lm2cli.errors import InputError
from lm2cli.model import InternLM2

TEXT = ("The quick brown fox jumps over the lazy dog 12345 times. def f(x):\n    return x * 2  # code\n"
        "今天天气很好，我们去公园散步。北京是中国的首都，上海是一座大城市。一加一等于二。") * 3


@functools.lru_cache(maxsize=1)
def tokenizer():
    from lm2cli.tokenizer import build_vocab, count_pretokens, pretokenizer_pattern

    cfg = TokenizerConfig(n_en=600, n_zh=40, n_spare=17)
    tok, _ = build_vocab(cfg, count_pretokens([TEXT], pretokenizer_pattern(cfg)))
    return tok


def tiny(seed: int = 0, **overrides) -> InternLM2:
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return InternLM2(dataclasses.replace(cfg, **overrides)).eval()


def _hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


# ---------------------------------------------------------------------------------------------------
# Out: a final/ folder runs in transformers


ROPES = {
    "plain": {},
    # dynamic NTK from 32 tokens on, in a model whose context is 64 (extend-context --method dynamic)
    "dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}},
    "linear": {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 10000.0},
}
YARN = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_final_folder_gives_lm2_logits_in_transformers(tmp_path, rope):
    m = tiny(**ROPES[rope])
    save_model(m, tmp_path / "final", tokenizer=tokenizer())
    raw = json.loads((tmp_path / "final" / "config.json").read_text())
    assert raw["architectures"] == ["InternLM2ForCausalLM"] and raw["model_type"] == "internlm2"
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert raw["rope_scaling"] in (None, {"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 2.0})
    gen = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer().eos_id, tokenizer().im_end_id]
    assert read_config(tmp_path / "final")[0] == m.config  # lm2 reads back exactly what it wrote

    hf = _hf_load(tmp_path / "final")
    assert hf.config.rope_scaling == raw["rope_scaling"]  # not rewritten by transformers 5
    ids = torch.randint(0, m.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - m(ids)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.timeout(180)
def test_transformers_generate_matches_lm2_greedy_with_and_without_cache(tmp_path):
    from lm2cli.generate import generate

    m = tiny(seed=3)
    save_model(m, tmp_path / "final", tokenizer=tokenizer())
    hf = _hf_load(tmp_path / "final")
    tok = tokenizer()
    texts = ["The quick brown fox", "北京是中国的首都，上海"]
    prompts = [tok.encode(t, bos=True) for t in texts]
    from transformers import AutoTokenizer  # the folder's HF tokenizer gives the same prompt ids

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "final"))
    assert [hf_tok(t)["input_ids"] for t in texts] == prompts
    ours = generate(m, prompts, max_new_tokens=12, stop_ids=[])
    for prompt, want in zip(prompts, ours):
        x = torch.tensor([prompt])
        with torch.no_grad():
            cached = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, len(prompt):]
            plain = hf.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=False)[0, len(prompt):]
        assert cached.tolist() == want
        assert plain.tolist() == want
    # a left-padded batch (attention mask) decodes each row as alone
    width = max(map(len, prompts))
    batch = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_id)
    assert [row[width:].tolist() for row in out] == ours
    # what transformers saves (say after fine-tuning there) comes back into lm2 unchanged
    hf.save_pretrained(str(tmp_path / "hf-saved"))
    back = load_model(tmp_path / "hf-saved")
    assert back.config == m.config and all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())


def test_dynamic_threshold_travels_in_the_released_form(tmp_path):
    m = tiny(**ROPES["dynamic"])
    save_model(m, tmp_path / "final")
    raw = json.loads((tmp_path / "final" / "config.json").read_text())
    # the released class reads the threshold from max_position_embeddings; lm2's context rides beside it
    assert raw["max_position_embeddings"] == 32 and raw["lm2_max_position_embeddings"] == 64
    assert load_model(tmp_path / "final").config == m.config


def test_yarn_is_refused_for_internlm2_but_exported_as_llama(tmp_path):
    m = tiny(rope_scaling=YARN)
    save_model(m, tmp_path / "final", tokenizer=tokenizer())  # a final/ still saves, readable by lm2
    assert not (tmp_path / "final" / "modeling_internlm2.py").exists()
    assert load_model(tmp_path / "final").config == m.config
    with pytest.raises(InputError, match="YaRN RoPE has no InternLM2 config form"):
        export_checkpoint(tmp_path / "final", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_checkpoint(tmp_path / "final", tmp_path / "llama", fmt="llama")
    raw = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "yarn"
    assert load_model(tmp_path / "llama").config.rope_scaling == YARN


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rope", ["plain", "dynamic", "yarn"])
def test_llama_export_carries_tokenizer_and_matches_transformers(tmp_path, rope):
    from transformers import LlamaForCausalLM

    m = tiny(seed=5, **({"rope_scaling": YARN} if rope == "yarn" else ROPES[rope]))
    save_model(m, tmp_path / "final", tokenizer=tokenizer())
    export_checkpoint(tmp_path / "final", tmp_path / "llama", fmt="llama")
    files = {p.name for p in (tmp_path / "llama").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "lm2_tokenizer.json", "tokenizer.json",
            "tokenizer_config.json", "manifest.json"} <= files
    assert load_model(tmp_path / "llama").config == m.config
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama")).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # 60 tokens: past the dynamic threshold (32) and YaRN's original context
        assert (hf(ids).logits - m(ids)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------------
# In: released-style folders


def test_sharded_bf16_folder_round_trip(tmp_path):
    m = tiny(seed=7)
    save_model(m, tmp_path / "rel", tokenizer=tokenizer(), dtype=torch.bfloat16, max_shard_size="100KB")
    index = json.loads((tmp_path / "rel" / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "rel" / "model.safetensors").exists()
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    cast = tiny(seed=7).to(torch.bfloat16).float()
    again = load_model(tmp_path / "rel")  # CPU default: fp32
    assert again.model.norm.weight.dtype == torch.float32
    for k, v in cast.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(ids), cast(ids))
    kept = load_model(tmp_path / "rel", dtype=torch.bfloat16)
    assert kept.output.weight.dtype == torch.bfloat16
    import transformers
    from transformers import AutoModelForCausalLM  # the same shards through lm2's shipped modeling code

    fp32 = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rel"), trust_remote_code=True, **fp32)
    with torch.no_grad():
        assert (hf(ids).logits - cast(ids)).abs().max().item() <= 1e-4

    (tmp_path / "rel" / shards[1]).unlink()
    with pytest.raises(InputError, match="incomplete download"):
        load_model(tmp_path / "rel")


def test_released_config_forms_are_read(tmp_path):
    m = tiny(seed=1)
    save_model(m, tmp_path / "rel", dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "rel" / "config.json").read_text())
    # the released internlm2-chat-7b config's extra keys, and the rope form transformers 5 writes
    raw.update(rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.5, "rope_theta": 1e6},
               rope_theta=None, pretraining_tp=1, attn_implementation="eager", eos_token_id=[2])
    (tmp_path / "rel" / "config.json").write_text(json.dumps(raw))
    cfg, kind = read_config(tmp_path / "rel")
    assert kind == "internlm2" and cfg.rope_theta == 1e6 and cfg.rope_scaling == {"type": "dynamic", "factor": 2.5}
    assert cfg.eos_token_id == 2
    # an early chat mirror: InternLM2's architecture under InternLM's model_type and config class
    raw.update(model_type="internlm", auto_map={"AutoConfig": "configuration_internlm.InternLMConfig"})
    (tmp_path / "rel" / "config.json").write_text(json.dumps(raw))
    assert read_config(tmp_path / "rel")[1] == "internlm2"
    raw.update(architectures=["InternLMForCausalLM"])  # InternLM 1: biases, separate q/k/v
    (tmp_path / "rel" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="'internlm' model .InternLMForCausalLM"):
        read_config(tmp_path / "rel")
    raw.update(architectures=["InternLM2ForCausalLM"], bias=True)
    (tmp_path / "rel" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="bias"):
        read_config(tmp_path / "rel")


class _Boom:
    """Unpickling this would create the marker file: the test proves lm2 never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_by_name_never_loaded(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*never loads.*save_pretrained"):
        load_model(tmp_path / "bin")
    assert not marker.exists()


def test_manifestless_folder_gets_a_content_fingerprint(tmp_path):
    from lm2cli.layout import describe_input

    m = tiny()
    save_model(m, tmp_path / "rel", dtype=torch.bfloat16)
    first = describe_input(tmp_path / "rel")
    assert first["fingerprint"].startswith("sha256:") and "kind" not in first
    save_model(tiny(seed=9), tmp_path / "rel", dtype=torch.bfloat16)
    assert describe_input(tmp_path / "rel")["fingerprint"] != first["fingerprint"]


# ---------------------------------------------------------------------------------------------------
# GGUF


def _gguf_fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        out[name] = field.contents()
    return out


def _bpe_with_merges(piece: str, merges: dict[tuple[str, str], int]) -> list[str]:
    """llama.cpp's BPE: repeatedly join the adjacent pair with the lowest merge rank."""
    parts = list(piece)
    while len(parts) > 1:
        ranked = [(merges.get((parts[j], parts[j + 1]), 1 << 30), j) for j in range(len(parts) - 1)]
        r, j = min(ranked)
        if r == 1 << 30:
            break
        parts[j:j + 2] = [parts[j] + parts[j + 1]]
    return parts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_gguf_export_reads_back_tensor_by_tensor_with_vocab_and_merges(tmp_path, dtype):
    import gguf

    from lm2cli.tokenizer.hf import bytes_to_unicode

    tok = tokenizer()
    m = tiny(seed=11, rope_scaling={"type": "linear", "factor": 2.0})
    save_model(m, tmp_path / "final", tokenizer=tok)
    out = export_checkpoint(tmp_path / "final", tmp_path / "m.gguf", fmt="gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(out))
    f = _gguf_fields(reader)
    cfg = m.config
    assert f["general.architecture"] == "internlm2"
    assert f["internlm2.context_length"] == cfg.max_position_embeddings
    assert f["internlm2.block_count"] == 2 and f["internlm2.embedding_length"] == 64
    assert f["internlm2.attention.head_count"] == 4 and f["internlm2.attention.head_count_kv"] == 2
    assert f["internlm2.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["internlm2.rope.scaling.type"] == "linear" and f["internlm2.rope.scaling.factor"] == 2.0
    assert f["internlm2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)

    # every tensor, under llama.cpp's names, with q/k un-permuted back to lm2's rows
    state = m.state_dict()
    want = {}
    for i in range(cfg.num_hidden_layers):
        q, k, v = split_wqkv(state[WQKV.format(i=i)], cfg)
        for name, t in zip(GGUF_QKV, (gguf_permute(q, 4), gguf_permute(k, 2), v)):
            want[name.format(i=i)] = t
    for name, t in state.items():
        if "wqkv" not in name:
            tmpl = name.replace(f".{name.split('.')[2]}.", ".{i}.", 1) if name.startswith("model.layers.") else name
            want[GGUF_NAMES[tmpl].format(i=name.split(".")[2] if "{i}" in tmpl else 0)] = t
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        ref = want[name].float()
        if dtype == "bf16" and ref.ndim == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            ref = ref.to(torch.bfloat16).float()
            data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        else:
            data = torch.from_numpy(np.array(t.data, dtype=np.float32))
        data = data.reshape(ref.shape)
        assert torch.equal(data, ref), name
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = 4 if "attn_q" in name else 2
            q_or_k = split_wqkv(state[WQKV.format(i=int(name.split(".")[1]))], cfg)[0 if heads == 4 else 1]
            assert torch.equal(gguf_unpermute(data, heads), q_or_k.float() if dtype == "f32" else
                               q_or_k.to(torch.bfloat16).float())

    # vocabulary: GPT-2 byte strings at lm2's ids, specials, merges reproducing lm2's ids
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"  # split digits
    assert len(tokens) == cfg.vocab_size
    assert tokens[tok.im_start_id] == "<|im_start|>" and tokens[tok.eos_id] == "</s>"
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id and f["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert f["tokenizer.ggml.eot_token_id"] == tok.im_end_id
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.im_end_id] == gguf.TokenType.CONTROL and types[tok.encode(" fox")[0]] == gguf.TokenType.NORMAL
    to_str = bytes_to_unicode()
    merges = {tuple(mg.split(" ")): r for r, mg in enumerate(f["tokenizer.ggml.merges"])}
    ids_of = {t: i for i, t in enumerate(tokens)}
    for piece in regex.findall(tok.pat_str, TEXT + " 2024年 Hello, World! x=[1,2,3]"):
        pb = piece.encode()
        gguf_ids = [ids_of[p] for p in _bpe_with_merges("".join(to_str[b] for b in pb), merges)]
        assert gguf_ids == tok.encode(piece), piece


def test_gguf_names_agree_with_gguf_tensor_map():
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.INTERNLM2, 2)
    for ours, theirs in GGUF_NAMES.items():
        hf_name = ours.format(i=1)
        assert tmap.get_name(hf_name, try_suffixes=(".weight",)) == theirs.format(i=1), ours


def test_gguf_pre_tokenizer_for_full_cl100k_is_dbrx():
    from lm2cli.convert import gguf_pre_tokenizer
    from lm2cli.tokenizer import Tokenizer

    assert gguf_pre_tokenizer(Tokenizer.default()) == "dbrx"


def test_bpe_vocab_merges_are_the_tokenizer_json_merges():
    tok = tokenizer()
    tokens, _, merges = bpe_vocab(tok, tok.vocab_size + 5)  # model vocab padded past the tokenizer's
    hf = json.loads(tok.hf_files()["tokenizer.json"])
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in hf["model"]["merges"]]
    assert tokens[-1] == f"[PAD{tok.vocab_size + 4}]"


@pytest.mark.timeout(180)
def test_gguf_of_a_released_sentencepiece_folder(tmp_path):
    import gguf
    from _released import VOCAB, released_folder, train_spm

    folder = released_folder(tmp_path / "rel", train_spm(tmp_path / "spm"))
    out = export_checkpoint(folder, tmp_path / "rel.gguf", fmt="gguf", dtype="f16")
    f = _gguf_fields(gguf.GGUFReader(str(out)))
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == VOCAB
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert tokens[VOCAB - 1] == "<|im_start|>" and types[VOCAB - 1] == gguf.TokenType.CONTROL
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE
    assert types[VOCAB - 17] == gguf.TokenType.UNUSED  # the reward spare, [UNUSED_TOKEN_130] in InternLM2
    assert f["tokenizer.ggml.add_space_prefix"] is False
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.eot_token_id"] == VOCAB - 2
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # and back out in its own layout: bf16 shards, the SentencePiece files, the same weights
    again = export_checkpoint(folder, tmp_path / "again", dtype="bf16", max_shard_size="200KB")
    assert (again / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert (again / INDEX).is_file() and (again / "modeling_internlm2.py").is_file()
    a, b = load_model(folder).state_dict(), load_model(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(120)
def test_cli_export_gguf_and_bad_arguments(tmp_path):
    import subprocess
    import sys

    save_model(tiny(), tmp_path / "final", tokenizer=tokenizer())

    def lm2(*args):
        return subprocess.run([sys.executable, "-m", "lm2cli.cli", "export", str(tmp_path / "final"), *args],
                              check=False, capture_output=True, text=True)

    ok = lm2("--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "f16", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["out"] == str(tmp_path / "m.gguf") and (tmp_path / "m.gguf").stat().st_size > 0
    bad = lm2("--format", "gguf", "--out", str(tmp_path / "x.gguf"), "--dtype", "int4")
    assert bad.returncode == 2 and "unknown dtype 'int4'" in bad.stderr and not (tmp_path / "x.gguf").exists()
    with pytest.raises(InputError, match="unknown export format 'onnx'"):
        export_checkpoint(tmp_path / "final", tmp_path / "x", fmt="onnx")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def _ggml_forward(tensors: dict[str, torch.Tensor], ids: list[int], n_head: int, n_kv: int, base: float,
                  eps: float) -> torch.Tensor:
    """llama.cpp's internlm2 graph from the GGUF's tensors, written out: RoPE in GGML's "norm" mode
    (adjacent pairs (2i, 2i+1) rotate together), GQA head h reading KV head h // (n_head / n_kv)."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # [T, heads, d]
        t, _, d = x.shape
        theta = torch.arange(t, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = theta.cos().float()[:, None], theta.sin().float()[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).reshape(x.shape)

    h = tensors["token_embd.weight"][ids]
    t = len(ids)
    for i in range(sum(1 for k in tensors if k.endswith("attn_q.weight"))):
        p = f"blk.{i}."
        x = rms(h, tensors[p + "attn_norm.weight"])
        q = rope((x @ tensors[p + "attn_q.weight"].T).view(t, n_head, -1))
        k = rope((x @ tensors[p + "attn_k.weight"].T).view(t, n_kv, -1))
        v = (x @ tensors[p + "attn_v.weight"].T).view(t, n_kv, -1)
        k, v = (z.repeat_interleave(n_head // n_kv, dim=1) for z in (k, v))
        att = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        h = h + torch.einsum("hqk,khd->qhd", att, v).reshape(t, -1) @ tensors[p + "attn_output.weight"].T
        x = rms(h, tensors[p + "ffn_norm.weight"])
        gate, up = x @ tensors[p + "ffn_gate.weight"].T, x @ tensors[p + "ffn_up.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ tensors[p + "ffn_down.weight"].T
    return rms(h, tensors["output_norm.weight"]) @ tensors["output.weight"].T


def test_gguf_tensors_in_llama_cpp_rope_convention_give_lm2_logits(tmp_path):
    """The q/k permutation is right for llama.cpp's RoPE, not merely invertible: its graph, run on the
    GGUF's tensors, reproduces lm2's logits."""
    import gguf

    m = tiny(seed=13)
    save_model(m, tmp_path / "final", tokenizer=tokenizer())
    out = export_checkpoint(tmp_path / "final", tmp_path / "m.gguf", fmt="gguf")
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in gguf.GGUFReader(str(out)).tensors}
    ids = tokenizer().encode("The quick brown fox jumps over the lazy dog 12345 times.", bos=True)
    cfg = m.config
    ref = _ggml_forward(tensors, ids, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta,
                        cfg.rms_norm_eps)
    with torch.no_grad():
        assert (ref - m(torch.tensor([ids]))[0]).abs().max().item() <= 1e-4
