import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.config import TrainConfig, load_recipe
from lm2cli.errors import InputError
from lm2cli.plan import (
    Layout,
    ModelShape,
    Workload,
    cluster,
    deepspeed_config,
    enumerate_plan,
    layouts,
    memory,
    model_state_bytes,
    plan_recipe,
    recipe_vocab,
    step_time,
    write_deepspeed_config,
    zero_shards,
)

GB = 1e9


def _shape(name: str) -> ModelShape:
    r = load_recipe(name)
    return ModelShape.from_config(r.model, recipe_vocab(r))


def _plan(*args):
    return CliRunner().invoke(app, ["plan", *args])


@pytest.mark.parametrize("name, total, non_embedding", [
    ("internlm2-1_8b", "1.889", "1.510"),
    ("internlm2-7b", "7.738", "6.980"),
    ("internlm2-20b", "19.861", "18.724"),
])
def test_param_counts_match_spec(name, total, non_embedding):
    shape = _shape(name)
    assert f"{shape.params / 1e9:.3f}" == total
    assert f"{shape.non_embedding_params / 1e9:.3f}" == non_embedding
    assert shape.params == sum(shape.tensors())


def test_param_count_matches_the_model_module():
    torch = pytest.importorskip("torch")  # noqa: F841
    from lm2cli.config import ModelConfig
    from lm2cli.model import InternLM2

    cfg = ModelConfig(vocab_size=1000)
    assert ModelShape.from_config(cfg).params == InternLM2(cfg).num_params()
    assert sorted(ModelShape.from_config(cfg).tensors()) == sorted(p.numel() for p in InternLM2(cfg).parameters())


def test_zero_paper_worked_example():
    # Rajbhandari et al. 2020, Fig. 1: Ψ = 7.5B, N_d = 64, K = 12 (mixed-precision Adam).
    psi, nd = 7.5e9, 64
    got = [model_state_bytes(psi, nd, stage) for stage in (0, 1, 2, 3)]
    assert got == [120 * GB, 31.40625 * GB, 16.640625 * GB, 1.875 * GB]
    assert [f"{g / GB:.3g}" for g in got] == ["120", "31.4", "16.6", "1.88"]  # as the paper prints them


def test_planner_memory_uses_the_paper_shards_for_params_and_optimizer():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 64, "bf16")
    phi = work.model.params
    for stage in (0, 1, 2, 3):
        mem = memory(work, Layout(64, stage, 1, 1))
        sp, sg, so = zero_shards(stage, 64)
        assert mem.params == 2 * phi / sp
        assert mem.optimizer == 12 * phi / so
        assert mem.grads >= 2 * phi / sg  # DeepSpeed's fp32 gradient copy at the step comes on top
        paper = model_state_bytes(phi, 64, stage)
        assert mem.params + mem.optimizer + 2 * phi / sg == pytest.approx(paper)


def test_more_sharding_means_less_model_state_memory():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 64, "bf16")
    for precision in ("bf16", "fp32"):
        w = Workload(work.model, 4096, 4096 * 64, precision)
        states = [memory(w, Layout(64, s, 1, 1)).model_states for s in (0, 1, 2, 3)]
        assert states == sorted(states, reverse=True) and len(set(states)) == 4


def test_checkpointing_cuts_activation_memory_and_costs_a_forward():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 8, "bf16")
    cl = cluster(8, 8, "A100-80")
    plain, ckpt = Layout(8, 1, 1, 1), Layout(8, 1, 1, 1, checkpointing=True)
    assert memory(work, ckpt).activations < memory(work, plain).activations / 5
    assert step_time(work, ckpt, cl).compute == pytest.approx(step_time(work, plain, cl).compute * 4 / 3)
    assert memory(work, Layout(8, 1, 2, 1)).activations == pytest.approx(2 * memory(work, plain).activations)


def test_hpz_trades_memory_for_in_node_gathers():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 1024, "bf16")
    cl = cluster(1024, 8, "A100-80")
    z3, hpz = Layout(1024, 3, 1, 1), Layout(1024, 3, 1, 1, hpz=8)
    assert memory(work, hpz).params > memory(work, z3).params
    assert step_time(work, hpz, cl).comm < step_time(work, z3, cl).comm


def test_crossing_nodes_costs_more_than_staying_in_one():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 16, "bf16")
    one_node = step_time(work, Layout(16, 1, 1, 1), cluster(16, 16, "A100-80"))
    two_nodes = step_time(work, Layout(16, 1, 1, 1), cluster(16, 8, "A100-80"))
    assert two_nodes.comm > one_node.comm


def test_7b_on_8x80gb_needs_zero():
    plan = plan_recipe(load_recipe("internlm2-7b"), cluster(8, 8, "A100-80"))
    fitting_stages = {c.layout.zero_stage for c in plan.fitting}
    assert fitting_stages == {1, 2, 3}
    assert all(c.kind == "oom" for c in plan.candidates if c.layout.zero_stage == 0)
    assert plan.best().layout.zero_stage >= 1


def test_candidates_are_sorted_fitting_first_by_step_time():
    plan = plan_recipe(load_recipe("internlm2-7b"), cluster(64, 8, "H100-80"))
    fits = [c.fits for c in plan.candidates]
    assert fits == sorted(fits, reverse=True)
    steps = [c.time.step for c in plan.fitting]
    assert steps == sorted(steps)


def test_unreachable_batch_is_named():
    work = Workload(_shape("internlm2-7b"), 4096, 5_000_000, "bf16")
    cands = enumerate_plan(work, cluster(1024, 8, "A100-80"))
    assert cands and all(c.kind == "batch" for c in cands)
    assert "not reachable" in cands[0].reason


def test_bad_cluster_inputs_raise_input_error():
    with pytest.raises(InputError, match="at least 1"):
        cluster(0, 8, "A100-80")
    with pytest.raises(InputError, match="unknown GPU preset 'B300'"):
        cluster(8, 8, "B300")
    with pytest.raises(InputError, match="--gpu-memory"):
        cluster(8, 8, peak_tflops=100, intra_bw=100, inter_bw=10)
    with pytest.raises(InputError, match="whole number of nodes"):
        cluster(12, 8, "A100-80")


def test_deepspeed_config_is_valid_for_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    train = TrainConfig(precision="bf16", grad_clip=1.0)
    for layout in (Layout(1, 0, 2, 4), Layout(1, 2, 1, 1), Layout(1, 3, 1, 8, checkpointing=True)):
        ds = DeepSpeedConfig(deepspeed_config(layout, train))  # world size 1 outside a launcher
        # bf16 accumulates gradients in fp32, which deepspeed 0.19.8 does only under ZeRO: stage 0 runs as 1
        assert ds.zero_optimization_stage == max(1, layout.zero_stage)
        assert ds.grad_accum_dtype == "fp32"
        assert ds.train_micro_batch_size_per_gpu == layout.micro_batch
        assert ds.gradient_accumulation_steps == layout.grad_accum
        assert ds.bfloat16_config.enabled
    cfg = deepspeed_config(Layout(1024, 3, 1, 1, hpz=8), train)
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])  # rejects unknown keys
    assert zero.zero_hpz_partition_size == 8 and zero.stage == 3
    assert cfg["train_batch_size"] == 1024


def test_write_deepspeed_config_round_trips(tmp_path):
    plan = plan_recipe(load_recipe("internlm2-7b"), cluster(8, 8, "A100-80"))
    best = plan.best()
    path = write_deepspeed_config(best, TrainConfig(precision="bf16"), tmp_path / "run" / "deepspeed.json")
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] == best.layout.zero_stage
    assert cfg["train_batch_size"] * 4096 == best.layout.tokens(4096)


def test_cli_json_is_sorted_by_step_time():
    res = _plan("--recipe", "internlm2-7b", "--gpus", "16", "--gpu", "H100-80", "--json")
    assert res.exit_code == 0, res.output
    cands = json.loads(res.stdout)
    fitting = [c for c in cands if c["fits"]]
    assert fitting and cands[: len(fitting)] == fitting
    assert [c["time_s"]["step"] for c in fitting] == sorted(c["time_s"]["step"] for c in fitting)
    first = fitting[0]
    parts = ("params", "grads", "optimizer", "activations", "logits", "buffers", "runtime", "fragmentation")
    assert sum(first["memory_gib"][k] for k in parts) == pytest.approx(first["memory_gib"]["total"], abs=0.01)
    assert first["memory_gib"]["total"] <= first["memory_gib"]["capacity"]
    assert all(c["reason"] for c in cands[len(fitting):])


def test_cli_table_names_the_best_and_the_rejected():
    res = _plan("--recipe", "internlm2-7b", "--gpus", "8", "--gpu", "A100-80", "--top", "2")
    assert res.exit_code == 0, res.output
    assert "ZeRO-1 mb 1×122" in res.stdout and "out of memory" in res.stdout
    assert "ZeRO-0" not in res.stdout  # a bf16 run accumulates gradients in fp32, which needs ZeRO >= 1


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "8", "--gpu", "B300"], "unknown GPU preset"),
    (["--gpus", "1", "--gpu", "A100-40", "--recipe", "internlm2-20b"], "no layout fits"),
    (["--gpus", "8", "--gpu", "A100-80", "--zero", "4"], "--zero takes 0, 1, 2 or 3"),
])
def test_cli_bad_inputs_raise_one_line_input_errors(args, needle):
    res = _plan("--recipe", "internlm2-7b", *args)
    assert isinstance(res.exception, InputError) and res.exception.exit_code == 2
    assert needle in str(res.exception) and "\n" not in str(res.exception)


def test_cli_zero_gpus_prints_one_line_and_exits_2():
    p = subprocess.run([sys.executable, "-m", "lm2cli.cli", "plan", "--recipe", "internlm2-7b", "--gpus", "0",
                        "--gpu", "A100-80"], capture_output=True, text=True, check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0] == "lm2: error: --gpus must be at least 1, got 0"


def test_memory_counts_the_attention_path_and_the_chunked_loss():
    from lm2cli.plan import LOGITS_CHUNK, loss_bytes

    shape = _shape("internlm2-7b")
    linear = Workload(shape, 32768, 32768 * 8, "bf16")
    dense = Workload(shape, 32768, 32768 * 8, "bf16", flash_attention=False)
    lay = Layout(8, 3, 1, 1, checkpointing=True)
    # The dense fallback keeps the B×T×T mask (1 GiB per row at 32k) and the SPEC's score term.
    assert memory(dense, lay).activations - memory(linear, lay).activations > 32768**2
    # The loss holds one chunk of logits (2 + 4 + 4 bytes per value) and the head's fp32 weight gradient,
    # not B×T×V (32k × 92,544 × 10 B = 28 GiB): about 2.2 GiB whatever the sequence length.
    chunk = LOGITS_CHUNK // shape.vocab
    assert loss_bytes(linear, lay) == chunk * shape.vocab * 10 + 4 * shape.vocab * shape.hidden + 4 * 32768
    assert loss_bytes(linear, lay) < 2.5 * 2**30


def test_plan_chunk_matches_the_loss_module():
    pytest.importorskip("torch")
    from lm2cli.plan import LOGITS_CHUNK
    from lm2cli.train import loss

    assert LOGITS_CHUNK == loss.LOGITS_CHUNK


def test_bf16_gradients_are_fp32_in_the_memory_model():
    work = Workload(_shape("internlm2-7b"), 4096, 4096 * 64, "bf16")
    phi = work.model.params
    assert memory(work, Layout(64, 1, 1, 1)).grads == 4 * phi  # BF16_Optimizer's full fp32 buffer
    assert memory(work, Layout(64, 2, 1, 1)).grads == 4 * phi / 64
    assert all(lay.zero_stage >= 1 for lay, _ in layouts(work, cluster(64, 8, "A100-80")))
