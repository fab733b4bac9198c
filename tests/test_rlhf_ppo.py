"""PPO: per-token alignment of rollouts, KL and gradients, and a tiny RM + PPO run end to end."""

import copy
import json
import sys

import pytest
import torch

from _rlhf import arithmetic_pairs, sft_workspace, tiny_model, tokenizer
from lm2cli.align import losses as L
from lm2cli.align.gold import gold_checks, gold_reward
from lm2cli.align.ppo import PromptSampler, build_rollout, repetition, response_logprobs, state_hash
from lm2cli.align.run import run_ppo, run_reward
from lm2cli.cli import main
from lm2cli.config import load_recipe
from lm2cli.convert import load_model


def _rollout():
    prompts = [[1, 40, 41, 42], [1, 50, 51]]
    responses = [[60, 61, 62, 2], [70]]
    return build_rollout(prompts, responses, pad_id=2), prompts, responses


def test_rollout_indexes_each_response_token_at_the_position_that_predicts_it():
    model = tiny_model(tokenizer()).eval()
    ro, prompts, responses = _rollout()
    assert ro.mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    got = response_logprobs(model, ro)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        full = torch.log_softmax(model(torch.tensor([p + r])), -1)[0]
        want = [full[len(p) - 1 + i, tok].item() for i, tok in enumerate(r)]
        assert got[b, :len(r)].tolist() == pytest.approx(want, abs=1e-5)


def test_kl_is_zero_for_identical_policies():
    model = tiny_model(tokenizer()).eval()
    ref = copy.deepcopy(model)
    ro, _, _ = _rollout()
    with torch.no_grad():
        logp, ref_logp = response_logprobs(model, ro), response_logprobs(ref, ro)
    rewards, kl = L.shaped_rewards(logp, ref_logp, torch.tensor([1.0, -2.0]), ro.mask, kl_coef=0.01)
    assert torch.count_nonzero(kl) == 0
    assert rewards.tolist() == [[0, 0, 0, 1.0], [-2.0, 0, 0, 0]]


def test_zero_advantage_gives_zero_gradient_to_the_actor():
    model = tiny_model(tokenizer())
    ro, _, _ = _rollout()
    logp = response_logprobs(model, ro)
    loss, st = L.policy_loss(logp, logp.detach(), torch.zeros_like(logp), ro.mask)
    loss.backward()
    assert st["ratio"] == 1.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_prompt_sampler_cycles_and_resumes():
    s = PromptSampler(5, 3, seed=1)
    seen = [s.next() for _ in range(4)]
    flat = [i for b in seen for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    t = PromptSampler(5, 3, seed=1)
    t.next()
    u = PromptSampler(5, 3, seed=1)
    u.load_state_dict(t.state_dict())
    assert [u.next() for _ in range(3)] == seen[1:]


def test_gold_reward_checks():
    gold = {"answer": "7", "style": "brief"}
    assert gold_reward(gold, "7") == 1.0
    assert gold_reward(gold, "We compute 3 + 4 = 7. The answer is 7.") == 0.0
    assert gold_reward({"answer": "7", "style": "detailed"}, "We compute 3 + 4 = 7. The answer is 7.") == 1.0
    assert gold_checks({"answer": "-3", "max_words": 2}, "It is -3 , surely") == {"answer": True, "max_words": False}
    assert gold_reward(None, "x") is None
    assert repetition([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 7)
    assert repetition([1, 2, 3, 4]) == 0.0


@pytest.mark.slow
def test_tiny_reward_model_and_ppo_end_to_end(tmp_path, monkeypatch, capsys):
    ws = sft_workspace(tmp_path / "ws")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_pairs(40)))
    recipe = load_recipe("tiny", ["rlhf.reward.train.lr=1e-3", "rlhf.reward.tokens_per_batch=1024",
                                  "rlhf.reward.train.seq_len=128", "rlhf.reward.held_out_fraction=0.2"])
    rdir = run_reward(ws, recipe, data=pairs)
    rman = json.loads((rdir / "manifest.json").read_text())
    assert rman["kind"] == "rlhf-reward"
    assert set(rman["stats"]["eval"]["per_condition"]) == {"brief", "detailed"}
    assert (rdir / "final" / "reward_head.safetensors").is_file()
    assert json.loads((rdir / "final" / "manifest.json").read_text())["kind"] == "checkpoint"

    sft_final = ws.stage_dir("sft") / "final"
    ref_hash = state_hash(load_model(sft_final))
    overrides = ["rlhf.ppo.iterations=3", "rlhf.ppo.critic_warmup=1", "rlhf.ppo.prompts_per_iteration=4",
                 "rlhf.ppo.max_new_tokens=8", "rlhf.ppo.save_every=2", "rlhf.ppo.minibatches=2",
                 "rlhf.ppo.ptx_batch_size=2", "rlhf.ppo.ptx_seq_len=64"]
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                                 {"role": "assistant", "content": "4"}]}) + "\n")
    pdir = run_ppo(ws, load_recipe("tiny", overrides), ptx=str(sft_data))
    rows = [json.loads(x) for x in (pdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert [r["phase"] for r in rows] == ["critic-warmup", "ppo", "ppo"]
    for r in rows:
        assert {"reward_mean", "kl", "response_len", "value_loss", "gold_mean"} <= set(r)
        assert any(k.startswith("reward/") for k in r)
    for r in rows[1:]:
        assert r["first_ratio"] == pytest.approx(1.0, abs=1e-5) and "ptx_loss" in r and "policy_loss" in r
    assert len((pdir / "rollouts.jsonl").read_text().splitlines()) == 3 * 4
    man = json.loads((pdir / "manifest.json").read_text())
    assert man["kind"] == "rlhf-ppo" and man["stats"]["reference_sha256"] == ref_hash
    assert state_hash(load_model(sft_final)) == ref_hash
    assert (pdir / "checkpoints" / "step-00000002" / "DONE").exists()
    assert (pdir / "critic" / "checkpoints" / "step-00000002" / "reward_head.safetensors").exists()
    load_model(pdir / "final")

    # One more iteration resumes from the last whole checkpoint instead of starting over.
    run_ppo(ws, load_recipe("tiny", overrides[1:] + ["rlhf.ppo.iterations=4"]), ptx=str(sft_data))
    rows = [json.loads(x) for x in (pdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]

    # Wrong kinds are refused with one line and exit code 2.
    capsys.readouterr()
    for args, message in ((["ppo", "--reward", str(sft_final)], "no reward head"),
                          (["ppo", "--from", str(rdir / "final")], "is a reward model"),
                          (["reward", "--from", str(tmp_path / "pairs.jsonl")], "not an lm2 artefact"),
                          (["reward", "--data", str(tmp_path / "nope.jsonl")], "does not exist")):
        monkeypatch.setattr(sys, "argv", ["lm2", "rlhf", *args, "--workdir", str(ws.root)])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
