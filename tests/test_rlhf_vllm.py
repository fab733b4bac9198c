"""The vLLM rollout backend (`rlhf.ppo.rollout_backend: vllm`, align/rollout.VllmRollout).

vLLM needs a CUDA GPU and is not installed here, so real vLLM is NOT run by these tests: they run the
backend against tests/fake_vllm, a stand-in that implements the few vLLM calls the backend makes the way
vLLM implements them (see its docstring) over transformers' AutoModelForCausalLM built from the folder
the backend writes. What they pin down: the missing-vLLM refusal (one line, before anything is built),
that the folder loads with trust_remote_code, that every actor parameter is pushed under a name the HF
InternLM2 model has and lands there unchanged (generation follows the actor after it changes), the
sampling parameters vLLM receives, the stop-token contract whatever vLLM puts in `token_ids`, and a tiny
`rlhf ppo` run end to end (under ZeRO-3, so each tensor is gathered for its push).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _rlhf import sft_workspace, tiny_model, tokenizer

from lm2cli.align.rollout import Lm2Rollout, VllmRollout, require_backend, response_ids, rollout_backend
from lm2cli.cli import main
from lm2cli.config import ConfigError, load_recipe
from lm2cli.errors import InputError, Lm2Error

pytestmark = pytest.mark.usefixtures("one_thread")

FAKE = Path(__file__).parent / "fake_vllm"
PROMPTS = [[1, 40, 41, 42], [1, 50, 51], [1, 60]]


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` finds the stand-in for this test only."""
    def drop():
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]

    drop()
    monkeypatch.syspath_prepend(str(FAKE))
    import vllm

    assert Path(vllm.__file__).is_relative_to(FAKE)
    vllm.ENGINES.clear()
    yield vllm
    drop()


def ppo_cfg(*sets):
    return load_recipe("tiny", ["rlhf.ppo.rollout_backend=vllm", "rlhf.ppo.max_new_tokens=6", *sets]).rlhf.ppo


def steer(model, token: int) -> None:
    """Make `token` the model's overwhelming choice after any input: attention and MLP outputs zeroed (the
    residual stream is the embedding), every embedding the same vector, the output head reading it."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        v = torch.randn(model.config.hidden_size)
        model.model.tok_embeddings.weight.copy_(v.expand_as(model.model.tok_embeddings.weight))
        model.output.weight.zero_()
        model.output.weight[token] = 50 * v / v.norm()


def engine_of(model):
    return SimpleNamespace(module=model, zero_stage=0)


def assert_same_weights(llm, model) -> None:
    served = dict(llm.llm_engine.model_executor.driver_worker.model_runner.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(served[name], p.detach()), name


@pytest.mark.timeout(60)
def test_vllm_backend_is_refused_in_one_line_before_anything_runs_without_vllm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    with pytest.raises(InputError, match=r"pip install 'lm2\[vllm\]'"):
        require_backend(ppo_cfg())
    assert isinstance(rollout_backend(load_recipe("tiny").rlhf.ppo, tokenizer()), Lm2Rollout)  # lm2: no vLLM needed
    with pytest.raises(ConfigError, match="must be one of lm2, vllm"):
        load_recipe("tiny", ["rlhf.ppo.rollout_backend=sglang"])
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        ppo_cfg("rlhf.ppo.vllm_gpu_memory_utilization=0")

    # The command refuses first (the workspace has no SFT model either: that error would come later) ...
    ws = tmp_path / "ws"
    monkeypatch.setattr(sys, "argv", ["lm2", "rlhf", "ppo", "--workdir", str(ws), "--set",
                                      "rlhf.ppo.rollout_backend=vllm"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "lm2[vllm]" in err, err
    # ... and its dry run lists the refusal among the reasons the run could not start.
    monkeypatch.setattr(sys, "argv", ["lm2", "rlhf", "ppo", "--dry-run", "--json", "--workdir", str(ws), "--set",
                                      "rlhf.ppo.rollout_backend=vllm"])
    with pytest.raises(SystemExit) as e:
        main()
    report = json.loads(capsys.readouterr().out)
    assert e.value.code == 2 and any("lm2[vllm]" in p for p in report["problems"]), report["problems"]


@pytest.mark.timeout(120)
def test_each_phase_pushes_the_actor_into_vllm_and_generation_follows_it(fake_vllm):
    tok = tokenizer()
    model = tiny_model(tok)
    cfg = ppo_cfg("rlhf.ppo.temperature=0.7", "rlhf.ppo.top_p=0.9", "rlhf.ppo.top_k=5")
    backend = rollout_backend(cfg, tok)
    assert isinstance(backend, VllmRollout)

    with backend.phase(engine_of(model)):
        first = backend.generate(PROMPTS, seed=11)
    (llm,) = fake_vllm.ENGINES
    assert llm.init_kwargs == {"model": str(backend.folder), "tokenizer": None, "skip_tokenizer_init": True,
                               "trust_remote_code": True, "dtype": "float32", "seed": cfg.seed,
                               "gpu_memory_utilization": 0.3, "enable_sleep_mode": True,
                               "max_model_len": cfg.max_prompt_len + cfg.max_new_tokens, "load_format": "dummy",
                               "distributed_executor_backend": "external_launcher"}
    # The folder loaded (AutoConfig with trust_remote_code: lm2's shipped code); every actor tensor was
    # pushed once, under a name the HF InternLM2 model has, and is there unchanged (the engine started
    # from dummy weights, so nothing else could have put it there).
    pushed = llm.llm_engine.model_executor.driver_worker.model_runner.model.pushes
    assert pushed == [[n for n, _ in model.named_parameters()]]
    assert_same_weights(llm, model)
    assert llm.sleeping == 1 and llm.prefix_cache_resets == 1  # asleep between phases
    for i, (ids, sp) in enumerate(llm.requests):
        assert ids == PROMPTS[i]
        assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed, sp.detokenize) == (0.7, 0.9, 5, 6, 11 + i,
                                                                                                False)
        assert set(sp.stop_token_ids) == set(tok.stop_ids)
    assert all(1 <= len(r) <= 6 for r in first)

    # The actor changes (as a PPO update would): the next phase generates from the new weights.
    word = tok.encode("the")[0]
    steer(model, word)
    with backend.phase(engine_of(model)):
        second = backend.generate(PROMPTS, seed=11)
    assert len(fake_vllm.ENGINES) == 1  # one engine for the run, weights pushed per phase
    assert_same_weights(llm, model)
    assert second == [[word] * 6] * len(PROMPTS) != first
    assert llm.prefix_cache_resets == 2

    # top_k 0 (lm2's "off") reaches vLLM as -1, which every vLLM version reads as off.
    off = rollout_backend(ppo_cfg("rlhf.ppo.vllm_sleep=false"), tok)
    with off.phase(engine_of(model)):
        off.generate(PROMPTS[:1], seed=3)
    assert fake_vllm.ENGINES[-1].requests[0][1].top_k == -1 and not fake_vllm.ENGINES[-1].sleeping


@pytest.mark.timeout(120)
def test_a_sampled_stop_token_is_the_last_token_whatever_vllm_puts_in_token_ids(fake_vllm, monkeypatch):
    tok = tokenizer()
    for stop in tok.stop_ids:  # </s> reaches vLLM through stop_token_ids and generation_config.json alike
        model = tiny_model(tok)
        steer(model, stop)
        for drop in (False, True):  # vLLM keeps it in token_ids; a version that dropped it changes nothing
            monkeypatch.setattr(fake_vllm.LLM, "drop_stop_token_ids", drop)
            for max_new in (6, 1):  # sampled as the max_tokens-th token, vLLM finishes with "length"
                backend = rollout_backend(ppo_cfg(f"rlhf.ppo.max_new_tokens={max_new}"), tok)
                with backend.phase(engine_of(model)):
                    assert backend.generate(PROMPTS, seed=0) == [[stop]] * len(PROMPTS)

    out = lambda ids, finish, reason=None: SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=reason)
    stops, eos = tuple(tok.stop_ids), tok.eos_id
    assert response_ids(out([5, 6], "stop", tok.im_end_id), stops, eos) == [5, 6, tok.im_end_id]
    assert response_ids(out([5, 6], "stop"), stops, eos) == [5, 6, eos]  # the model's EOS: stop_reason None
    assert response_ids(out([5, eos, 7], "stop"), stops, eos) == [5, eos]
    assert response_ids(out([5, 6], "length"), stops, eos) == [5, 6]
    with pytest.raises(Lm2Error, match="abort"):
        response_ids(out([5], "abort"), stops, eos)


@pytest.mark.timeout(300)
def test_tiny_ppo_runs_end_to_end_on_the_vllm_backend(fake_vllm, tmp_path):
    from lm2cli.align.reward_model import RewardModel, save_reward_model
    from lm2cli.align.run import run_ppo
    from lm2cli.convert import load_model
    from lm2cli.layout import write_manifest

    ws = sft_workspace(tmp_path / "ws")
    tok = tokenizer()
    rm = RewardModel(tiny_model(tok, seed=1))
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    reward = tmp_path / "rm"
    save_reward_model(rm, reward, tok, {"reward_id": tok.reward_id, "conditions": {}, "use_conditions": True})
    write_manifest(reward, "checkpoint", config=rm.config, stage="rlhf-reward")

    # ZeRO-3 on one CPU rank: every tensor is gathered for its push; critic_warmup 0 so the actor moves.
    sets = ["rlhf.ppo.rollout_backend=vllm", "rlhf.ppo.iterations=2", "rlhf.ppo.critic_warmup=0",
            "rlhf.ppo.prompts_per_iteration=4", "rlhf.ppo.generate_batch_size=2", "rlhf.ppo.max_new_tokens=8",
            "rlhf.ppo.save_every=1", "rlhf.ppo.sharding=full", "rlhf.ppo.actor_lr=1e-3"]
    pdir = run_ppo(ws, load_recipe("tiny", sets), reward=reward, ptx="none")

    rows = [json.loads(x) for x in (pdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all("policy_loss" in r for r in rows)
    samples = [json.loads(x) for x in (pdir / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(1 <= s["tokens"] <= 8 for s in samples)
    (llm,) = fake_vllm.ENGINES
    assert llm.prefix_cache_resets == 2 and llm.sleeping == 1
    # Iteration 2 sampled from the actor as iteration 1's update left it (its checkpoint), not the SFT model.
    after_one = load_model(pdir / "checkpoints" / "step-00000001")
    assert_same_weights(llm, after_one)
    sft = load_model(ws.stage_dir("sft") / "final")
    assert not torch.equal(sft.output.weight, after_one.output.weight)
