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


# ---------------------------------------------------------------------------------------------------
# The workspace lock


def _hold_lock(path, shared: bool = False):
    """A child process that takes the lock, says so, and sleeps until killed."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom pathlib import Path\nfrom lm2cli.layout import artefact_lock\n"
            f"with artefact_lock(Path({str(path)!r}), 'lm2 prepare --test', shared={shared}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_gets_one_line_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    import socket

    from lm2cli.layout import artefact_lock

    target = tmp_path / "data" / "prepared"
    holder = _hold_lock(target)
    try:
        with pytest.raises(InputError) as e:
            with artefact_lock(target, "lm2 prepare again"):
                pass
        msg = str(e.value)
        assert "\n" not in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "lm2 prepare --test" in msg
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (tmp_path / "data" / ".prepared.lock").exists()
    with artefact_lock(target, "lm2 prepare"):  # the kernel freed the dead holder's lock
        pass
    assert not (tmp_path / "data" / ".prepared.lock").exists()


def test_shared_holders_coexist_and_exclude_an_exclusive_writer(tmp_path):
    from lm2cli.layout import artefact_lock

    target = tmp_path / "data" / "prepared"
    holder = _hold_lock(target, shared=True)
    try:
        with artefact_lock(target, "lm2 prepare --shard 1/2", shared=True):
            with pytest.raises(InputError, match="being written by another lm2 command"):
                with artefact_lock(target, "lm2 prepare"):
                    pass
    finally:
        holder.kill()
        holder.wait()


def test_two_prepare_commands_into_one_workspace(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    ws = Workspace(tmp_path / "ws")
    holder = _hold_lock(ws.prepared)
    try:
        lm2 = Path(sys.executable).parent / "lm2"
        proc = subprocess.run([str(lm2), "prepare", "--workdir", str(ws.root)], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, COLUMNS="300"))
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not ws.prepared.exists()  # the refused command touched nothing
