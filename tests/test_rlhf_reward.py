"""The conditional reward model: its inputs, where the score is read, batching, accuracy, its folder."""

import json

import pytest
import torch

from _rlhf import arithmetic_pairs, tiny_model, tokenizer
from lm2cli.align.records import Pair, load_records, parse_pair, rm_prefix, rm_sequence, with_reward_token
from lm2cli.align.reward_model import (PairStream, RewardModel, encode_pair, evaluate, load_reward_model, pair_batches,
                                       right_pad, save_reward_model, split_held_out, token_budget_groups, encode_pairs)
from lm2cli.errors import WrongArtefact
from lm2cli.convert import save_model

CONDS = {"default": "", "brief": "Answer with the result only.", "detailed": "Show the working."}


def _rm(seed=0):
    torch.manual_seed(seed)
    rm = RewardModel(tiny_model(tokenizer(), seed)).eval()
    with torch.no_grad():
        rm.head.weight.normal_()  # zero-initialised heads score everything 0; spread them for these tests
    return rm


def _pairs(n=40):
    return [parse_pair(r, CONDS, i + 1) for i, r in enumerate(arithmetic_pairs(n))]


def test_reward_token_appended_exactly_once():
    tok = tokenizer()
    prefix = rm_prefix(tok, [{"role": "user", "content": "What is 2 + 3?"}], "")
    # Even a response that spells the reward token as text gets the id only from the appending.
    seq = rm_sequence(tok, prefix, tok.encode(f"5 {tok.reward_token}"))
    assert seq[-1] == tok.reward_id and seq.count(tok.reward_id) == 1
    assert with_reward_token(seq, tok.reward_id) == seq
    assert with_reward_token([1, 2], tok.reward_id) == [1, 2, tok.reward_id]
    # The response closes its turn before the reward token: ... <|im_end|> \n <reward>.
    nl = tok.encode("\n")
    assert seq[-2 - len(nl):-1] == [tok.im_end_id] + nl


def test_generated_stop_token_is_replaced_by_the_turn_closing():
    tok = tokenizer()
    prefix = rm_prefix(tok, [{"role": "user", "content": "Hi"}], "")
    body = tok.encode("hello")
    assert rm_sequence(tok, prefix, body + [tok.im_end_id]) == rm_sequence(tok, prefix, body)
    assert rm_sequence(tok, prefix, body + [tok.eos_id]) == rm_sequence(tok, prefix, body)


def test_score_read_at_last_non_pad_token():
    tok, rm = tokenizer(), _rm()
    seqs = [list(range(5, 10)), list(range(20, 29)), list(range(40, 47))]
    alone = [rm.values(torch.tensor([s]))[0, -1].item() for s in seqs]
    for pad in (tok.pad_id, 7, tok.reward_id):
        ids, lengths = right_pad(seqs, pad)
        scores = rm(ids, lengths)
        assert scores.tolist() == pytest.approx(alone, abs=1e-5)
    # The last column of a short row is padding: reading it would give another number.
    ids, lengths = right_pad(seqs, tok.pad_id)
    assert abs(rm.values(ids)[0, -1].item() - alone[0]) > 1e-4


def test_condition_prompt_is_the_rm_system_turn():
    tok = tokenizer()
    pair = Pair("brief", [{"role": "user", "content": "What is 1 + 2?"}], "3", "We compute 1 + 2 = 3.")
    with_cond = encode_pair(tok, pair, CONDS, 512)
    without = encode_pair(tok, pair, CONDS, 512, use_condition=False)
    default = encode_pair(tok, Pair("default", pair.prompt, "3", "4"), CONDS, 512)
    text = tok.decode(with_cond.chosen)
    assert "<|im_start|>system\nAnswer with the result only.<|im_end|>" in text
    assert "system" not in tok.decode(without.chosen) and "system" not in tok.decode(default.chosen)
    assert with_cond.chosen[len(with_cond.chosen) - len(without.chosen) + 1:] == without.chosen[1:]  # after <s>
    # A prompt that already opens with the condition's system turn does not get it twice.
    own = Pair("brief", [{"role": "system", "content": CONDS["brief"]}] + pair.prompt, "3", "4")
    assert tok.decode(encode_pair(tok, own, CONDS, 512).chosen).count("<|im_start|>system") == 1


def test_token_budget_batches_cover_each_pair_once():
    tok = tokenizer()
    enc, _ = encode_pairs(tok, _pairs(30), CONDS, 512)
    budget = 600
    groups = token_budget_groups(enc, budget)
    assert len(groups) > 2
    for g in groups:
        assert len(g) == 1 or 2 * len(g) * max(p.width for p in g) <= budget
    batches = pair_batches(enc, budget, tok.pad_id, seed=3)
    assert sum(len(b["conditions"]) for b in batches) == len(enc)
    b = batches[0]
    n = len(b["conditions"])
    assert b["input_ids"].shape[0] == 2 * n and b["input_ids"].shape[1] == int(b["lengths"].max())


def test_pair_stream_resumes_on_the_next_batch():
    tok = tokenizer()
    enc, _ = encode_pairs(tok, _pairs(30), CONDS, 512)
    a = PairStream(enc, 600, tok.pad_id, seed=1)
    first = [next(a) for _ in range(a.batches_per_epoch() + 2)]  # crosses into the second epoch
    b = PairStream(enc, 600, tok.pad_id, seed=1)
    for _ in range(3):
        next(b)
    state = json.loads(json.dumps(b.state_dict()))
    c = PairStream(enc, 600, tok.pad_id, seed=1)
    c.load_state_dict(state)
    for want in first[3:]:
        assert torch.equal(next(c)["input_ids"], want["input_ids"])


def test_held_out_split_is_stratified_and_disjoint():
    tok = tokenizer()
    enc, _ = encode_pairs(tok, _pairs(40), CONDS, 512)
    train, held = split_held_out(enc, 0.1, seed=0)
    assert {p.condition for p in held} == {"brief", "detailed"}
    assert len(train) + len(held) == len(enc)
    assert not {p.line for p in train} & {p.line for p in held}


def test_bad_records_are_kept_with_a_reason(tmp_path):
    good = arithmetic_pairs(1)[0]
    lines = [json.dumps(good), "{not json", json.dumps({**good, "condition": "nope"}),
             json.dumps({**good, "chosen": ""}), json.dumps({**good, "rejected": good["chosen"]}),
             json.dumps({**good, "prompt": [{"role": "assistant", "content": "x"}]}),
             json.dumps({**good, "prompt": "What is 1 + 1?", "condition": None})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kept, rejected = load_records(path, parse_pair, CONDS)
    assert [p.line for p in kept] == [1, 7]
    assert kept[1].prompt == [{"role": "user", "content": "What is 1 + 1?"}] and kept[1].condition == "default"
    assert [(r["line"], r["reason"]) for r in rejected] == [
        (2, "invalid-json"), (3, "unknown-condition"), (4, "empty-chosen"), (5, "identical-responses"),
        (6, "prompt-ends-with-assistant")]


def test_evaluate_reports_accuracy_per_condition():
    class LengthScorer(torch.nn.Module):  # scores a sequence by its length: prefers the detailed answer
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, lengths):
            return lengths.float() + self.w

    tok = tokenizer()
    enc, _ = encode_pairs(tok, _pairs(20), CONDS, 512)
    ev = evaluate(LengthScorer(), pair_batches(enc, 4096, tok.pad_id))
    assert ev["per_condition"]["brief"]["accuracy"] == 0.0
    assert ev["per_condition"]["detailed"]["accuracy"] == 1.0
    assert ev["accuracy"] == 0.5 and ev["pairs"] == 20


def test_reward_folder_round_trip_and_plain_checkpoint_refused(tmp_path):
    tok, rm = tokenizer(), _rm(1)
    save_reward_model(rm, tmp_path / "rm", tok, {"reward_id": tok.reward_id, "conditions": CONDS})
    back, info = load_reward_model(tmp_path / "rm")
    ids = torch.tensor([list(range(3, 20))])
    assert torch.equal(back.values(ids), rm.values(ids))
    assert info["conditions"] == CONDS
    save_model(tiny_model(tok), tmp_path / "plain", tokenizer=tok)
    with pytest.raises(WrongArtefact, match="no reward_head"):
        load_reward_model(tmp_path / "plain")


def test_zero_initialised_head_scores_zero():
    rm = RewardModel(tiny_model(tokenizer()))
    assert torch.count_nonzero(rm.values(torch.tensor([[1, 5, 9]]))) == 0
    assert not rm.backbone.output.weight.requires_grad


def test_critic_is_the_reward_backbone_with_a_zero_value_head(tmp_path):
    """PPO's critic (align/models.py, head="zero") shares the trained RM's backbone but not its head
    (SPEC §8.3: critic <- RM without its head); head="trained" rebuilds the RM itself."""
    from lm2cli.align.models import reward_model
    from lm2cli.config import TrainConfig
    from lm2cli.train.engine import init_distributed

    tok, rm = tokenizer(), _rm(2)
    save_reward_model(rm, tmp_path / "rm", tok, {"reward_id": tok.reward_id, "conditions": CONDS})
    dist, cfg = init_distributed(), TrainConfig(seq_len=64, micro_batch_size=1)
    critic = reward_model(tmp_path / "rm", cfg, dist, 64, tok, head="zero")
    again = reward_model(tmp_path / "rm", cfg, dist, 64, tok, head="trained")
    ids = torch.tensor([list(range(3, 20))])
    with torch.no_grad():
        assert torch.count_nonzero(critic(ids)) == 0
        assert torch.allclose(again(ids), rm.values(ids), atol=1e-5)
        assert torch.allclose(critic.backbone(ids, return_hidden=True), rm.backbone(ids, return_hidden=True), atol=1e-5)
    assert critic.head.weight.requires_grad and not critic.backbone.output.weight.requires_grad


@pytest.mark.parametrize("world", [1, 2, 3])
def test_pair_stream_deals_every_pair_once_per_epoch_over_the_ranks(world):
    """Epochs group a fresh shuffle by token budget, so their batch counts differ; the ranks together
    still see every pair exactly once per epoch, in the 1-rank order."""
    import random

    from lm2cli.align.reward_model import EncodedPair

    rng = random.Random(0)
    enc = [EncodedPair([i + 1] * rng.randint(4, 60), [i + 2] * rng.randint(4, 60), "brief", i) for i in range(60)]
    one = PairStream(enc, 300, 0, seed=4)
    lengths = [one._length(e) for e in range(3)]
    assert len(set(lengths)) > 1  # the case that matters: epochs of different batch counts
    total = sum(lengths)
    ranks = [PairStream(enc, 300, 0, seed=4, rank=r, world=world) for r in range(world)]
    got = []
    for _ in range(total // world):
        got += [next(s)["input_ids"] for s in ranks]
    want = [next(one)["input_ids"] for _ in range(len(got))]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    seen = sum(len(b) // 2 for b in want[:lengths[0]])
    assert seen == len(enc)
