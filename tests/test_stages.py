"""stages.py: which model folder a command reads, and what it records about it."""

from __future__ import annotations

import json

import pytest

from lm2cli.config import ModelConfig
from lm2cli.errors import InputError, WrongArtefact
from lm2cli.layout import Workspace, write_manifest
from lm2cli.stages import (GENERATIVE_STAGES, PRETRAIN_STAGES, latest_pretrained, model_input,
                           previous_stage_model, resolve_model, would_read)


def _checkpoint(folder, layers=2):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    write_manifest(folder, "checkpoint")
    return folder


def _stage(ws, name, run="default"):
    final = _checkpoint(ws.stage_dir(name, run) / "final")
    write_manifest(final.parent, name)
    return final


def test_a_stage_folder_means_its_final_checkpoint(tmp_path):
    ws = Workspace(tmp_path)
    final = _stage(ws, "pretrain-stage1")
    got = model_input(final.parent)
    assert got.path == final.resolve() and got.kind == "checkpoint" and got.stage == "pretrain-stage1"
    assert got.fingerprint.startswith("sha256:") and got.manifest["kind"] == "checkpoint"
    assert got.config().num_hidden_layers == 2


def test_a_step_checkpoint_knows_its_stage(tmp_path):
    step = _checkpoint(Workspace(tmp_path).stage_dir("sft") / "checkpoints" / "step-00000010")
    assert model_input(step).stage == "sft"


def test_an_hf_folder_without_a_manifest_is_read_with_a_content_fingerprint(tmp_path):
    hf = tmp_path / "internlm2-chat-1_8b"
    _checkpoint(hf)
    (hf / "manifest.json").unlink()
    got = model_input(hf)
    assert got.kind == "hf" and got.manifest is None and got.stage is None
    assert got.fingerprint and got.fingerprint.startswith("sha256:")
    (hf / "config.json").write_text((hf / "config.json").read_text().replace('"vocab_size": 640', '"vocab_size": 641'))
    assert model_input(hf).fingerprint != got.fingerprint


def test_anything_else_is_refused_by_name(tmp_path):
    ws = Workspace(tmp_path)
    write_manifest(ws.tokens, "tokens")
    with pytest.raises(WrongArtefact, match="'tokens' artefact; expected 'checkpoint'"):
        model_input(ws.tokens)
    with pytest.raises(InputError, match="--from .*nope does not exist"):
        model_input(tmp_path / "nope")
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    with pytest.raises(WrongArtefact, match="not an lm2 artefact .* nor an HF model folder"):
        model_input(tmp_path / "pairs.jsonl", what="--reward")
    write_manifest(ws.stage_dir("sft"), "sft")  # a stage that never finished
    with pytest.raises(InputError, match="unfinished sft \\(no final/\\)"):
        model_input(ws.stage_dir("sft"))


def test_defaults_follow_the_pipeline(tmp_path):
    ws = Workspace(tmp_path)
    with pytest.raises(InputError, match="no finished pretrain-stage1 .* `lm2 pretrain --stage 1` first"):
        previous_stage_model(ws, "default", 2, None)
    assert would_read(ws, "default", None, PRETRAIN_STAGES) == ws.stage_dir("pretrain-stage3") / "final"
    s1 = _stage(ws, "pretrain-stage1")
    assert previous_stage_model(ws, "default", 1, None) is None
    assert previous_stage_model(ws, "default", 2, None).path == s1.resolve()
    with pytest.raises(InputError, match="no finished pretrain-stage2"):
        previous_stage_model(ws, "default", 3, None)
    s2 = _stage(ws, "pretrain-stage2")
    assert latest_pretrained(ws, "default", None).path == s2.resolve()
    assert would_read(ws, "default", None, PRETRAIN_STAGES) == s2
    _stage(ws, "rlhf-reward")  # never the default model to generate with
    assert resolve_model(ws, "default", None, stages=GENERATIVE_STAGES, missing="-").path == s2.resolve()
    with pytest.raises(InputError, match="--from is for stages 2 and 3"):
        previous_stage_model(ws, "default", 1, s1)
    with pytest.raises(InputError, match="nothing here"):
        resolve_model(ws, "other", None, stages=PRETRAIN_STAGES, missing="nothing here")
