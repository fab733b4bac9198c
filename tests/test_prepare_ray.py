"""`lm2 prepare/tokenize --engine ray` on a real two-node Ray cluster on loopback: the same artefacts as the
local engine, a Ray worker killed mid-task is survived, and a killed driver resumes with nothing lost.

The cluster is `ray start --head` plus a second `ray start --address` node on this machine, one CPU each,
a small object store and a private --temp-dir. Ray 2.60's `ray start --head` turns on token auth, which a
second node cannot join without the token: the test cluster runs with RAY_AUTH_MODE=disabled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from lm2cli.config import examples_dir  # noqa: E402
from lm2cli.data.pipeline import iter_kept, iter_rejected  # noqa: E402

BIN = Path(sys.executable).parent
SUBSET = ("web", "mixed", "papers", "malformed")  # a third of the examples, every kind of record and reject
SETS = ["--set", "prepare.task_mb=0.15", "--set", "prepare.dedup.memory_budget_mb=0.2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    temp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]

    def stop():
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=_env(), capture_output=True, timeout=120)

    request.addfinalizer(stop)
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", f"--temp-dir={temp}", *common],
                   env=_env(), check=True, capture_output=True, timeout=300)
    subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", *common],
                   env=_env(), check=True, capture_output=True, timeout=300)
    return {"address": f"127.0.0.1:{port}", "temp": temp}


@pytest.fixture(scope="module")
def inputs() -> list[str]:
    return [str(examples_dir() / "corpus" / d) for d in SUBSET]


def lm2(*args, timeout=900, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "lm2"), *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"lm2 {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def records(workdir: Path) -> tuple[list[str], list[str]]:
    prepared = workdir / "data" / "prepared"
    dump = lambda it: sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in it)  # noqa: E731
    return dump(iter_kept(prepared)), dump(iter_rejected(prepared))


def engine_free_stats(workdir: Path) -> dict:
    stats = json.loads((workdir / "data" / "prepared" / "manifest.json").read_text())["stats"]
    for key in ("seconds", "resources"):
        stats.pop(key)
    stats["dedup"].pop("seconds")
    return stats


def shard_bytes(workdir: Path) -> dict:
    tokens = workdir / "data" / "tokens"
    return {str(p.relative_to(tokens)): p.read_bytes() for p in sorted(tokens.rglob("*")) if p.suffix in (".bin", ".idx")}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, inputs) -> Path:
    work = tmp_path_factory.mktemp("local")
    lm2("prepare", *inputs, "--workdir", work, "-j", "2", *SETS)
    lm2("tokenize", "--workdir", work, "-j", "2")
    return work


def _ray_workers(cluster: dict, title: str) -> list[int]:
    """Pids of this cluster's Ray workers currently running a task named `title`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not cmd.startswith(f"ray::{title}"):
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if str(cluster["temp"]) in parent:  # a worker of our raylets, not of some other Ray on the machine
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ray_engine_writes_what_the_local_engine_writes(cluster, local_run, inputs, tmp_path):
    work = tmp_path / "ray"
    lm2("prepare", *inputs, "--workdir", work, "--engine", "ray", "--ray-address", cluster["address"], *SETS)
    assert records(work) == records(local_run)
    assert engine_free_stats(work) == engine_free_stats(local_run)
    stats = json.loads((work / "data" / "prepared" / "manifest.json").read_text())["stats"]
    assert stats["resources"]["engine"] == "ray" and stats["resources"]["workers"] == 2
    assert stats["dedup"]["partitions"]["band"] > 1  # the small budget made dedup partition its work
    assert all(v > 0 for v in stats["resources"]["peak_rss_mb"].values())

    lm2("tokenize", "--workdir", work, "--engine", "ray", "--ray-address", cluster["address"])
    assert shard_bytes(work) == shard_bytes(local_run) != {}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_ray_worker_killed_mid_task_is_retried(cluster, local_run, inputs, tmp_path):
    work = tmp_path / "ray-kill"
    proc = subprocess.Popen([str(BIN / "lm2"), "prepare", *inputs, "--workdir", str(work), "--engine", "ray",
                             "--ray-address", cluster["address"], *SETS],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        deadline = time.time() + 600
        while not killed and proc.poll() is None and time.time() < deadline:
            for pid in _ray_workers(cluster, "run_phase_a"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, "the run finished before a worker could be killed"
    assert proc.returncode == 0, err[-3000:]
    assert records(work) == records(local_run)
    assert engine_free_stats(work) == engine_free_stats(local_run)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_killed_ray_driver_resumes_without_losing_or_doubling_records(cluster, local_run, inputs, tmp_path):
    work = tmp_path / "ray-resume"
    args = [str(BIN / "lm2"), "prepare", *inputs, "--workdir", str(work), "--engine", "ray",
            "--ray-address", cluster["address"], *SETS]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = work / "data" / "prepared" / ".work" / "a"
    try:
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and len(list(markers.glob("done-*.json"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = len(list(markers.glob("done-*.json")))
    assert 2 <= done_before and not (work / "data" / "prepared" / "manifest.json").exists()
    out = lm2(*args[1:])
    assert "already through" in out.stderr  # it resumed instead of starting over
    assert records(work) == records(local_run)
    assert engine_free_stats(work) == engine_free_stats(local_run)


@pytest.mark.timeout(120)
def test_no_cluster_at_the_address_is_one_clear_error_within_seconds():
    from lm2cli.data.executors import RayExecutor
    from lm2cli.errors import InputError

    port = _free_port()  # nothing listens there
    t0 = time.time()
    with pytest.raises(InputError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        RayExecutor(f"127.0.0.1:{port}")
    assert time.time() - t0 < 60
