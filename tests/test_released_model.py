"""A released-style InternLM2 folder (tests/_released.py: SentencePiece tokenizer.model + tokenizer_config.json,
sharded bf16 safetensors, no lm2 manifest) runs in every lm2 command that takes a model, unchanged:
generate, chat, sft --from, eval ppl, eval needle, eval opencompass, tokenize --tokenizer, pretrain --from,
extend-context --from, rlhf reward, rlhf ppo; its logits are the bf16 weights' logits; SFT from it exports back
to the same layout with the SentencePiece tokenizer carried, and reloads."""

from __future__ import annotations

import io
import json

import pytest
import torch
from _released import TINY, VOCAB, released_folder, session_spm
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def released(tmp_path_factory):
    spm = session_spm(tmp_path_factory)
    return released_folder(tmp_path_factory.mktemp("released") / "internlm2-tiny", spm)


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(folder):
    from lm2cli.convert import load_model

    return load_model(folder).eval()


def _greedy(model, ids: list[int], n: int, stops=()) -> list[int]:
    """The plain greedy reference: full forward per token, no KV cache."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
    return out


def test_folder_is_released_style(released):
    names = {p.name for p in released.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "config.json", "model.safetensors.index.json"} <= names
    assert "manifest.json" not in names and "lm2_tokenizer.json" not in names
    assert len([n for n in names if n.startswith("model-0") and n.endswith(".safetensors")]) >= 2
    assert json.loads((released / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tok = Tokenizer.load(released)
    assert tok.backend == "sentencepiece" and tok.im_start_id == VOCAB - 1 and tok.stop_ids == [2, VOCAB - 2]


def test_logits_after_load_are_the_bf16_weights_logits(released):
    from lm2cli.config import ModelConfig
    from lm2cli.model import InternLM2

    torch.manual_seed(0)  # the fixture's seed: the same random init, then rounded to bf16 as saved
    ref = InternLM2(ModelConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY))
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    model = _load(released)
    ids = torch.tensor([Tokenizer.load(released).encode("书生·浦语 InternLM2 1234", bos=True)])
    with torch.no_grad():
        assert torch.equal(model(ids), ref.eval()(ids))


def test_generate_and_chat_run_on_the_released_tokenizer(released, tmp_path):
    from lm2cli.chat import encode_prompt
    from lm2cli.generate import run_chat

    tok, model = Tokenizer.load(released), _load(released)
    prompts = [{"messages": [{"role": "user", "content": "你好，介绍一下你自己"}]}, {"prompt": "The quick brown"}]
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
    res = CliRunner().invoke(app, ["generate", str(released), "-i", str(src), "-o", str(dst), "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    starts = [encode_prompt(tok, prompts[0]["messages"]), tok.encode(prompts[1]["prompt"], bos=True)]
    for row, ids in zip(rows, starts):
        want = _greedy(model, ids, 6, tok.stop_ids)
        assert row["completion"] == tok.decode([i for i in want if i not in tok.stop_ids])
    out = io.StringIO()
    replies = run_chat(released, temperature=0.0, max_new_tokens=5, stdin=io.StringIO("hello\n/exit\n"), stdout=out,
                       device="cpu")
    want = _greedy(model, encode_prompt(tok, [{"role": "user", "content": "hello"}]), 5, tok.stop_ids)
    assert replies == 1 and out.getvalue() == tok.decode([i for i in want if i not in tok.stop_ids]) + "\n"


def test_eval_ppl_and_needle_run(released, tmp_path):
    ws = tmp_path / "ws"
    data = tmp_path / "ppl.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"text": "今天天气很好，我们一起去公园散步吧！" * 4, "lang": "zh", "content_type": "web"},
        {"text": "The quick brown fox jumps over the lazy dog. " * 4, "lang": "en", "content_type": "web"}]))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "ppl", str(released), "--workdir", str(ws), "--recipe", "tiny", "--data", str(data),
                              "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads((ws / "eval" / "default" / "ppl" / "results.json").read_text())
    assert "zh" in json.dumps(results) and "en" in json.dumps(results)
    res = runner.invoke(app, ["eval", "needle", str(released), "--workdir", str(ws), "--recipe", "tiny", "--lengths",
                              "64,128", "--depths", "0,100", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.timeout(600)
def test_sft_from_the_released_folder_exports_back_to_its_layout(released, tmp_path):
    from lm2cli.config import load_recipe
    from lm2cli.convert import export_checkpoint
    from lm2cli.layout import Workspace
    from lm2cli.sft import run_sft

    rows = [{"messages": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]}
            for a in range(8) for b in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("tiny", ["sft.max_len=64", "sft.train.micro_batch_size=4", "sft.train.epochs=0.5",
                                  "sft.train.save_every=100", "sft.train.eval_every=100", "sft.train.eval_batches=1"])
    stage = run_sft(Workspace.at(tmp_path / "ws"), recipe, data=data, eval_data=data, from_=released)
    final = stage / "final"
    tok = Tokenizer.load(released)
    assert Tokenizer.load(final).fingerprint == tok.fingerprint  # the SentencePiece tokenizer is carried
    out = export_checkpoint(final, tmp_path / "export", "internlm2", dtype="bf16", max_shard_size=200_000)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.startswith("model-0")]) >= 2
    assert (out / "tokenizer.model").read_bytes() == (released / "tokenizer.model").read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = Tokenizer.load(out)
    assert again.backend == "sentencepiece" and again.fingerprint == tok.fingerprint
    trained, reloaded = _load(final), _load(out)
    trained.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in trained.state_dict().items()})
    ids = torch.tensor([tok.encode("3 + 2 = ?", bos=True)])
    with torch.no_grad():
        assert torch.equal(reloaded(ids), trained(ids))
        assert not torch.equal(reloaded(ids), _load(released)(ids))  # it did train


@pytest.mark.timeout(600)
def test_tokenize_pretrain_and_reward_model_from_the_released_folder(released, tmp_path):
    from _tok_corpus import records, write_prepared

    from lm2cli.layout import Workspace, read_manifest

    ws = Workspace(tmp_path / "ws")
    write_prepared(ws.prepared, records(seed=1, n_zh=60, n_en=30, n_code=10, n_mixed=10))
    runner = CliRunner()
    common = ["--workdir", str(ws.root), "--recipe", "tiny"]
    res = runner.invoke(app, ["tokenize", "--workdir", str(ws.root), "--tokenizer", str(released), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert read_manifest(ws.tokens)["tokenizer"]["fingerprint"] == Tokenizer.load(released).fingerprint
    res = runner.invoke(app, ["pretrain", "--stage", "2", *common, "--from", str(released),
                              "--set", "pretrain.stage2.max_steps=2", "--set", "pretrain.stage2.seq_len=128"])
    assert res.exit_code == 0, res.output
    assert Tokenizer.load(ws.stage_dir("pretrain-stage2") / "final").backend == "sentencepiece"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"condition": "default", "prompt": [{"role": "user", "content": f"{a} + 1?"}],
                                         "chosen": str(a + 1), "rejected": str(a + 2)}) + "\n" for a in range(24)))
    res = runner.invoke(app, ["rlhf", "reward", *common, "--from", str(released), "--data", str(pairs),
                              "--set", "rlhf.reward.train.epochs=0.2"])
    assert res.exit_code == 0, res.output
    assert Tokenizer.load(ws.stage_dir("rlhf-reward") / "final").reward_id == VOCAB - 17
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"condition": "default", "prompt": [{"role": "user", "content": f"{a} + 1?"}]})
                               + "\n" for a in range(8)))
    res = runner.invoke(app, ["rlhf", "ppo", *common, "--from", str(released), "--data", str(prompts),
                              "--reward", str(ws.stage_dir("rlhf-reward") / "final"),
                              *[x for s in ("iterations=2", "critic_warmup=1", "prompts_per_iteration=4",
                                            "max_new_tokens=6", "minibatches=2", "ptx_coef=0")
                                for x in ("--set", f"rlhf.ppo.{s}")]])
    assert res.exit_code == 0, res.output
    assert Tokenizer.load(ws.stage_dir("rlhf-ppo") / "final").backend == "sentencepiece"
    res = runner.invoke(app, ["extend-context", *common, "--from", str(released), "--method", "base",
                              "--seq-len", "1024", "--rope-theta", "1e6", "--set", "extend_context.train.max_steps=2"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((ws.stage_dir("extend-context") / "final" / "config.json").read_text())
    assert (cfg["max_position_embeddings"], cfg["rope_theta"]) == (1024, 1e6)
    assert read_manifest(ws.stage_dir("extend-context"))["inputs"]


def test_eval_opencompass_runs(released, tmp_path):
    from lm2cli.config import examples_dir

    res = CliRunner().invoke(app, ["eval", "opencompass", str(released), "--workdir", str(tmp_path / "ws"), "--recipe",
                                   "tiny", "-d", str(examples_dir() / "eval" / "en_mcq.jsonl")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ws" / "eval" / "default" / "opencompass" / "summary.json").read_text())
    assert "en_mcq" in json.dumps(summary)
