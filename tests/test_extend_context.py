"""lm2 extend-context: each RoPE method's config against SPEC §2.4 formulas, and the command end to end
(shared trainer, final/config.json, manifest) with the config actually driving the model afterwards."""

import dataclasses
import json
import math

import pytest
import torch
from _train_ws import build_tokens, workspace_with_tokens
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.config import ExtendContextConfig, ModelConfig
from lm2cli.errors import InputError
from lm2cli.extend_context import extended_model_config, resolve_config
from lm2cli.layout import write_manifest
from lm2cli.convert import load_model, read_config, save_model
from lm2cli.model import InternLM2, effective_rope_base, rope_cos_sin, rope_inv_freq

SRC = ModelConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, rope_theta=50_000.0)
D = SRC.head_dim  # 32


def _ext(method, seq_len=256, **kw):
    return extended_model_config(SRC, ExtendContextConfig(method=method, seq_len=seq_len, **kw))


# ---------------------------------------------------------------------------------------------------
# The config each method writes, against the formulas


def test_base_change_raises_theta_and_exports_dynamic_ntk_for_serving():
    cfg = _ext("base")
    assert (cfg.max_position_embeddings, cfg.rope_theta) == (256, 1_000_000.0)
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.0}  # SPEC §2.4 "Serving"
    # Inside the trained length the base is exactly 1e6; at 2x and 4x it follows SPEC's dynamic formula.
    assert effective_rope_base(cfg, 256) == 1_000_000.0
    for n in (512, 1024):
        assert effective_rope_base(cfg, n) == pytest.approx(1e6 * (2 * n / 256 - 1) ** (D / (D - 2)), rel=1e-12)
    inv, scale, m = rope_inv_freq(cfg, 200)
    assert torch.allclose(inv, 1.0 / 1e6 ** (torch.arange(0, D, 2, dtype=torch.float64) / D).float())
    assert (scale, m) == (1.0, 1.0)


def test_base_change_without_inference_scaling_and_with_a_chosen_theta():
    cfg = _ext("base", rope_theta=5e5, inference_rope_scaling=None)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None


def test_linear_interpolation_maps_position_f_times_p_onto_the_old_position_p():
    cfg = _ext("linear")
    assert cfg.rope_scaling == {"type": "linear", "factor": 4.0} and cfg.rope_theta == SRC.rope_theta
    old = rope_cos_sin(SRC, torch.arange(0, 64)[None], 64, torch.float32)
    new = rope_cos_sin(cfg, (4 * torch.arange(0, 64))[None], 256, torch.float32)
    assert torch.allclose(old[0], new[0], atol=1e-5) and torch.allclose(old[1], new[1], atol=1e-5)


def test_linear_on_a_linearly_scaled_input_composes_the_factors():
    src = dataclasses.replace(SRC, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = extended_model_config(src, ExtendContextConfig(method="linear", seq_len=128))
    assert cfg.rope_scaling == {"type": "linear", "factor": 4.0}


def test_dynamic_ntk_keeps_the_old_length_and_scales_the_base_past_it():
    cfg = _ext("dynamic", factor=2.0)
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}
    assert cfg.max_position_embeddings == 256 and cfg.rope_theta == SRC.rope_theta
    assert effective_rope_base(cfg, 64) == SRC.rope_theta
    for n in (65, 128, 256):
        assert effective_rope_base(cfg, n) == pytest.approx(5e4 * (2 * n / 64 - 1) ** (D / (D - 2)), rel=1e-12)


def test_yarn_interpolates_low_frequencies_and_keeps_high_ones():
    cfg = _ext("yarn")
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32.0, "beta_slow": 1.0}
    inv, _, mscale = rope_inv_freq(cfg, 256)
    base = 1.0 / SRC.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    assert inv[0] == pytest.approx(float(base[0]))  # highest frequency: extrapolated (kept)
    assert inv[-1] == pytest.approx(float(base[-1]) / 4)  # lowest: interpolated by f
    assert mscale == pytest.approx(0.1 * math.log(4) + 1)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(InputError, match="shorter than the input's context 64"):
        _ext("base", seq_len=32)
    with pytest.raises(InputError, match="--rope-theta sets the base of --method base"):
        resolve_config(ExtendContextConfig(), method="yarn", rope_theta=1e6)
    with pytest.raises(InputError, match="--method must be one of"):
        resolve_config(ExtendContextConfig(), method="ntk")


# ---------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("ectok"))


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokens):
    """A 'stage-1' checkpoint at context 64 with the shards' tokenizer."""
    from lm2cli.tokens import TokenStore

    tok = TokenStore(tokens).tokenizer()
    torch.manual_seed(0)
    m = InternLM2(dataclasses.replace(SRC, vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2))
    final = tmp_path_factory.mktemp("src") / "pretrain-stage1" / "final"
    save_model(m, final, tokenizer=tok)
    write_manifest(final, "checkpoint", stats={})
    return final


def _extend(ws, source, *args):
    steps = ["--set", "extend_context.train.max_steps=2", "--set", "extend_context.train.micro_batch_size=1",
             "--set", "extend_context.train.eval_batches=1"]
    res = CliRunner().invoke(app, ["extend-context", "--workdir", str(ws.root), "--from", str(source), "--seq-len",
                                   "256", *steps, *args, "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.stdout[res.stdout.index("{"):])


@pytest.mark.parametrize("method", ["base", "linear", "dynamic", "yarn"])
def test_extend_context_trains_and_writes_the_methods_config(method, tokens, source, tmp_path):
    ws = workspace_with_tokens(tokens, tmp_path / "ws")
    out = _extend(ws, source, "--method", method)
    stage = ws.stage_dir("extend-context")
    saved = read_config(stage / "final")[0]  # config.json holds the released form; read_config maps it back
    want = extended_model_config(load_model(source).config, ExtendContextConfig(method=method, seq_len=256))
    for key in ("max_position_embeddings", "rope_theta", "rope_scaling"):
        assert getattr(saved, key) == getattr(want, key), key
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["kind"] == "extend-context" and manifest["stats"]["steps"] == 2
    assert manifest["extend_context"]["method"] == method and manifest["extend_context"]["old_context"] == 64
    assert out["new_context"] == 256 and (stage / "final" / "manifest.json").exists()
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in rows if "loss" in m]  # fit logs the starting eval loss at step 0
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)


def test_dynamic_checkpoint_recomputes_the_base_per_call(tokens, source, tmp_path):
    """The saved config drives the model with no flags: a call of T > 64 tokens runs at the SPEC base for T,
    and a short call afterwards is exactly the unscaled model (no enlarged base left over, P5)."""
    ws = workspace_with_tokens(tokens, tmp_path / "ws")
    _extend(ws, source, "--method", "dynamic", "--factor", "2")
    final = ws.stage_dir("extend-context") / "final"
    model = load_model(final)
    long_ids = torch.randint(3, 200, (1, 200), generator=torch.Generator().manual_seed(0))
    short_ids = long_ids[:, :50]
    d = model.config.head_dim
    fixed_base = 5e4 * (2 * 200 / 64 - 1) ** (d / (d - 2))
    with torch.no_grad():
        long_logits = model(long_ids)
        short_after = model(short_ids)
        ref_long = load_model(final, rope_scaling=None, rope_theta=fixed_base)(long_ids)
        ref_short = load_model(final, rope_scaling=None)(short_ids)
    assert torch.equal(long_logits, ref_long)
    assert torch.equal(short_after, ref_short)


def test_default_source_is_the_runs_latest_pretraining_final_and_resume_refuses_another_setting(tokens, source,
                                                                                                tmp_path):
    import shutil

    ws = workspace_with_tokens(tokens, tmp_path / "ws")
    shutil.copytree(source, ws.stage_dir("pretrain-stage1") / "final")
    res = CliRunner().invoke(app, ["extend-context", "--workdir", str(ws.root), "--seq-len", "128",
                                   "--set", "extend_context.train.max_steps=1", "--set",
                                   "extend_context.train.micro_batch_size=1"])
    assert res.exit_code == 0, res.output
    assert json.loads((ws.stage_dir("extend-context") / "final" / "config.json").read_text())["rope_theta"] == 1e6
    res = CliRunner().invoke(app, ["extend-context", "--workdir", str(ws.root), "--seq-len", "128", "--method",
                                   "linear", "--set", "extend_context.train.max_steps=2"])
    assert res.exit_code != 0 and "--resume never" in str(res.exception)


def test_extend_context_without_a_source_fails_with_one_line(tmp_path):
    res = CliRunner().invoke(app, ["extend-context", "--workdir", str(tmp_path / "empty")])
    assert res.exit_code != 0 and "no finished pretraining stage" in str(res.exception)


def test_recipe_section_validates():
    from lm2cli.config import ConfigError, load_recipe

    r = load_recipe("tiny", ["extend_context.seq_len=2048"])
    assert r.extend_context.train.seq_len == 2048 and r.extend_context.method == "base"
    with pytest.raises(ConfigError, match="method"):
        load_recipe("tiny", ["extend_context.method=ntk"])
    with pytest.raises(ConfigError, match="inference_rope_scaling"):
        load_recipe("tiny", ["extend_context.inference_rope_scaling={type: ntk}"])
