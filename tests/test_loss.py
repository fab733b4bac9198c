"""The loss: chunked head + cross-entropy equals the plain path, and a step's gradient is one big batch's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lm2cli.config import ModelConfig, TrainConfig
from lm2cli.model import InternLM2
from lm2cli.train.loss import linear_cross_entropy

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _labels(n, vocab, keep, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < keep, y, -100)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_loss_and_gradients_equal_the_plain_path(chunk):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(50, 16, generator=g), torch.randn(40, 16, generator=g)
    y = _labels(50, 40, 0.7, 1)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    plain = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    plain.backward(torch.tensor(0.37))
    hc, wc = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = linear_cross_entropy(hc, wc, y, chunk=chunk)
    got.backward(torch.tensor(0.37))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hc.grad, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wc.grad, w.grad, rtol=1e-5, atol=1e-6)


def _ce_grads(h0, w0, y, loss_of):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss = loss_of(h, w)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def test_bf16_chunks_are_as_accurate_as_the_plain_bf16_path():
    g = torch.Generator().manual_seed(2)
    h0, w0 = torch.randn(64, 32, generator=g).bfloat16(), (0.2 * torch.randn(80, 32, generator=g)).bfloat16()
    y = _labels(64, 80, 0.8, 3)
    exact = _ce_grads(h0.double(), w0.double(), y, lambda h, w: F.cross_entropy(h @ w.t(), y, reduction="sum"))
    plain = _ce_grads(h0, w0, y, lambda h, w: F.cross_entropy((h @ w.t()).float(), y, reduction="sum"))
    chunked = _ce_grads(h0, w0, y, lambda h, w: linear_cross_entropy(h, w, y, chunk=9))
    for want, base, got in zip(exact, plain, chunked):  # loss, d/dhidden, d/dweight (bf16 for bf16 inputs)
        err_plain, err_chunked = (base - want).abs().max().item(), (got - want).abs().max().item()
        assert err_chunked <= 1.5 * err_plain + 1e-4, (err_chunked, err_plain)


def test_no_logits_sized_tensor_is_kept_for_backward():
    n, v = 256, 512
    h = torch.randn(n, 16, requires_grad=True)
    w = torch.randn(v, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(h, w, _labels(n, v, 1.0, 4), chunk=32)
    assert kept and max(kept) < n * v / 8  # hidden, weight, labels, one log-sum-exp per token


def test_model_loss_from_labels_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = InternLM2(CFG)
    ids = torch.randint(0, 96, (2, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    y = _labels(48, 96, 0.6, 5).view(2, 24)
    logits = model(ids, position_ids=pos)
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = model(ids, position_ids=pos, labels=y)
    total.backward()
    torch.testing.assert_close(total, F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(model.parameters(), want):
        torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-6)


def test_lm_loss_of_a_batch_without_targets_is_zero_not_nan():
    from lm2cli.train.loop import lm_loss

    model = InternLM2(CFG)
    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.full((1, 8), -100)}
    loss, _ = lm_loss(model, batch)
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------------
# Token-normalised accumulation: k micro-batches × r ranks give one big batch's gradient.

K, ROWS, T = 3, 2, 12


def _all_micro_batches(world: int) -> list[dict]:
    """world × K micro-batches of packed rows, each with a different share of labelled tokens."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(world * K):
        ids = torch.randint(0, CFG.vocab_size, (ROWS, T), generator=g)
        keep = [0.95, 0.2, 0.6, 0.4, 0.8, 0.1][i % 6]
        labels = _labels(ROWS * T, CFG.vocab_size, keep, 100 + i).view(ROWS, T)
        pos = torch.cat([torch.arange(5), torch.arange(T - 5)]).expand(ROWS, T)
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def _one_big_batch_gradients(world: int) -> dict:
    """The reference: plain cross-entropy, mean over every labelled token of all world × K micro-batches;
    gradients flattened per optimizer parameter group, the order DeepSpeed flattens them in."""
    from lm2cli.train.engine import param_groups

    torch.manual_seed(0)
    model = InternLM2(CFG)
    batches = _all_micro_batches(world)
    logits = model(torch.cat([b["input_ids"] for b in batches]), position_ids=torch.cat([b["position_ids"] for b in batches]))
    labels = torch.cat([b["labels"] for b in batches])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    groups = [torch.cat([p.grad.flatten() for p in g["params"]]) for g in param_groups(model, 0.1)]
    return {"loss": loss.item(), "groups": groups}


def _accumulated_gradients(sharding: str = "full-replica", out_dir: Path | None = None) -> dict:
    """Run on every rank: one `train_step` over this rank's K micro-batches; the gradients the optimizer
    sees, flattened per parameter group (under ZeRO-2 each rank's fp32 shard of the group)."""
    from lm2cli.train.engine import Engine, init_distributed
    from lm2cli.train.loop import lm_loss, train_step

    dist = init_distributed()
    torch.manual_seed(0)
    cfg = TrainConfig(micro_batch_size=ROWS, grad_accum=K, grad_clip=0.0, max_steps=1, seq_len=T, sharding=sharding)
    engine = Engine(InternLM2(CFG), cfg, 1, dist)
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.extend(
        torch.cat([p.grad.detach().flatten() for p in g["params"]]) for g in opt.param_groups))
    try:
        micro = _all_micro_batches(dist.world)[dist.rank * K:(dist.rank + 1) * K]
        loss, _, _ = train_step(engine, micro, lm_loss, dist)
    finally:
        hook.remove()
    result = {"loss": float(loss), "groups": seen}
    if out_dir is not None:
        torch.save(result, out_dir / f"rank{dist.rank}.pt")
    return result


def _assert_same(got: dict, want: dict):
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)  # the logged loss: the mean per token
    assert len(got["groups"]) == len(want["groups"])
    for g, w in zip(got["groups"], want["groups"]):
        assert torch.all(g[w.numel():] == 0)  # DeepSpeed pads a group to a multiple of the ranks
        torch.testing.assert_close(g[:w.numel()], w, rtol=1e-4, atol=1e-6)


def test_micro_batches_with_unequal_token_counts_give_one_big_batch_gradient():
    _assert_same(_accumulated_gradients(), _one_big_batch_gradients(1))


@pytest.mark.slow  # two DeepSpeed ranks: 30-40 s on the loaded 2-core machine
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sharding", ["full-replica", "partial"])  # ZeRO-0: all-reduce; ZeRO-2: reduce-scatter
def test_two_ranks_times_micro_batches_give_one_big_batch_gradient(tmp_path, sharding):
    from lm2cli.train.engine import clean_env, free_port

    port, here = free_port(), str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; import test_loss; "
            f"test_loss._accumulated_gradients({sharding!r}, Path({str(tmp_path)!r}))")
    procs = []
    for rank in range(2):
        env = {**clean_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=280)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["loss"] == ranks[1]["loss"]
    if sharding == "partial":  # each rank holds its shard of every group, in rank order
        ranks[0]["groups"] = [torch.cat(shards) for shards in zip(ranks[0]["groups"], ranks[1]["groups"])]
    _assert_same(ranks[0], _one_big_batch_gradients(2))


# ---------------------------------------------------------------------------------------------------
# bf16 runs: fp32 master weights, gradients accumulated in fp32


def test_bf16_deepspeed_config_accumulates_in_fp32_under_zero():
    from lm2cli.train.engine import deepspeed_config

    for sharding, stage in [("full-replica", 1), ("partial", 2), ("full", 3)]:
        ds = deepspeed_config(TrainConfig(precision="bf16", sharding=sharding), 2)
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["bf16"]["enabled"]
        assert ds["zero_optimization"]["stage"] == stage  # 0.19.8 has no fp32 accumulation without ZeRO
    fp32 = deepspeed_config(TrainConfig(precision="fp32"), 2)
    assert "data_types" not in fp32 and fp32["zero_optimization"]["stage"] == 0


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4))

    def forward(self, scale: float):
        return (self.w.float() * scale).sum()


@pytest.mark.parametrize("sharding, fp32_accum", [("full-replica", True), ("partial", True), ("full", True),
                                                  ("partial", False)])
def test_bf16_gradients_accumulate_in_fp32_into_fp32_master_weights(sharding, fp32_accum):
    # 8 micro-steps: one gradient of 1/8, seven of 2^-13 (after DeepSpeed's 1/8). In bf16 (8-bit mantissa)
    # 2^-13 is under half an ulp of 1/8 and vanishes; accumulated in fp32 the seven add up.
    from lm2cli.train.engine import Engine, deepspeed_config, init_distributed

    dist = init_distributed()
    cfg = TrainConfig(micro_batch_size=1, grad_accum=8, grad_clip=0.0, precision="bf16", sharding=sharding, max_steps=1)
    ds = deepspeed_config(cfg, dist.world)
    if not fp32_accum:  # the old config, as the control: DeepSpeed's default accumulates in the model dtype
        del ds["data_types"]
    engine = Engine(_Scaled(), cfg, 1, dist, ds)
    assert engine.module.w.dtype == torch.bfloat16
    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.extend((p.dtype, p.grad.clone()) for g in opt.param_groups for p in g["params"]))
    try:
        for scale in [1.0] + [2.0**-10] * 7:
            engine.backward(engine.model(scale))
            engine.step()
    finally:
        hook.remove()
    ((dtype, grad),) = seen
    assert dtype == torch.float32  # the optimizer updates fp32 master weights
    got = grad.flatten()[:16]
    if fp32_accum:  # ZeRO-1 all-reduces the fp32 sum in bf16 at the boundary: within one bf16 rounding
        want = 0.125 + 7 * 2.0**-13
        assert torch.all((got - want).abs() <= want * 2.0**-9), got
    else:
        assert torch.all(got == 0.125), got
