"""The planner's model-state memory against what DeepSpeed allocates, measured on 2 CPU ranks."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "plan_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("plan_memory_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_model_states_within_15_percent_on_two_ranks(stage, monkeypatch):
    # What an earlier in-process lm2 run leaves in os.environ (a lone rank of a world of one): the
    # launched ranks must still form a world of two.
    monkeypatch.setenv("LM2_SOLO_RANK", "1")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    bench = _bench()
    ranks = bench.launch(stage, world=2, recipe="tiny", seq_len=64, micro_batch=2, steps=2, timeout=600, profile=False)  # generous: a loaded 2-core box
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        row = bench.compare(r, "tiny", seq_len=64, micro_batch=2)
        assert row["ratio_model_states"] == pytest.approx(1.0, abs=0.15), row
        for part in ("params", "grads", "optimizer"):  # each part, not only their sum
            assert row["measured"][part] == pytest.approx(row["est"][part], rel=0.15), (part, row)
