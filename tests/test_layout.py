import json

import pytest

from lm2cli import __version__
from lm2cli.errors import InputError, WrongArtefact
from lm2cli.layout import (
    Workspace,
    fingerprint,
    read_manifest,
    resolve_workdir,
    staging_dir,
    write_manifest,
)


def test_workdir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LM2_WORKDIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_workdir() == tmp_path / "lm2-work"
    monkeypatch.setenv("LM2_WORKDIR", str(tmp_path / "env"))
    assert resolve_workdir() == tmp_path / "env"
    assert resolve_workdir(tmp_path / "flag") == tmp_path / "flag"


def test_standard_paths(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.prepared == tmp_path / "data" / "prepared"
    assert ws.tokens == tmp_path / "data" / "tokens"
    assert ws.tokenizer == tmp_path / "tokenizer"
    assert ws.stage_dir("pretrain-stage2", "exp1") == tmp_path / "runs" / "exp1" / "pretrain-stage2"
    assert ws.eval_dir("needle-passkey", "exp1") == tmp_path / "eval" / "exp1" / "needle-passkey"
    with pytest.raises(InputError):
        ws.stage_dir("pretrain-stage9")
    with pytest.raises(InputError):
        ws.run_dir("../escape")


def test_manifest_fields_and_lineage(tmp_path):
    a = tmp_path / "a"
    write_manifest(a, "prepared", config={"x": 1}, stats={"kept": 3})
    b = tmp_path / "b"
    m = write_manifest(b, "tokens", config={}, inputs=[a], stats={"tokens": 10})
    assert m["kind"] == "tokens" and m["lm2_version"] == __version__ and m["created"]
    assert m["inputs"][0]["kind"] == "prepared"
    assert m["inputs"][0]["fingerprint"] == fingerprint(a)
    on_disk = json.loads((b / "manifest.json").read_text())
    assert on_disk["stats"] == {"tokens": 10}


def test_wrong_kind_is_refused_by_name(tmp_path):
    a = tmp_path / "tokens"
    write_manifest(a, "tokens")
    assert read_manifest(a, ["tokens"])["kind"] == "tokens"
    with pytest.raises(WrongArtefact, match=r"is a 'tokens' artefact; expected 'checkpoint'"):
        read_manifest(a, ["checkpoint"], what="model")
    with pytest.raises(WrongArtefact, match="not an lm2 artefact"):
        (tmp_path / "plain").mkdir()
        read_manifest(tmp_path / "plain", ["tokens"])
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "missing", ["tokens"])


def test_staging_dir_leaves_nothing_on_crash(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with staging_dir(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert (final / "whole.bin").read_bytes() == b"y"


def test_latest_model_follows_pipeline_order(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.latest_model() is None
    write_manifest(ws.stage_dir("pretrain-stage1") / "final", "checkpoint")
    write_manifest(ws.stage_dir("sft") / "final", "checkpoint")
    assert ws.latest_model() == ws.stage_dir("sft") / "final"
    assert ws.latest_model(stages=["pretrain-stage1", "pretrain-stage2"]) == ws.stage_dir("pretrain-stage1") / "final"
