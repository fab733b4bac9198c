"""The generation engine: greedy KV-cache decoding against full recomputation, batching, stops, sampling."""

import pytest
import torch

from lm2cli.config import ModelConfig
from lm2cli.errors import InputError
from lm2cli.generate import default_stop_ids, generate, score_logprobs
from lm2cli.model import InternLM2

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Matrices this small gain nothing from intra-op threads, and lose a lot on a shared, busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = InternLM2(CFG).eval()
    # A larger init spreads the logits, so argmax decisions are far from ties and runs vary by prompt.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    return m


def _prompts(n, seed=1, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, CFG.vocab_size - 6, (k,), generator=g).tolist() for k in lens]


def _argmax_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_argmax_by_full_recomputation(model):
    prompts = _prompts(3)
    out = generate(model, prompts, 12, stop_ids=(), batch_size=1)
    assert out == [_argmax_by_recomputation(model, p, 12) for p in prompts]
    assert len({tuple(o) for o in out}) > 1  # the prompts matter: not a constant output


def test_left_padded_batches_equal_one_by_one(model):
    prompts = _prompts(7, seed=2)
    assert len({len(p) for p in prompts}) > 2
    one = generate(model, prompts, 10, stop_ids=(), batch_size=1)
    assert generate(model, prompts, 10, stop_ids=(), batch_size=4) == one
    assert generate(model, prompts, 10, stop_ids=(), batch_size=16) == one


def test_stop_ids_end_rows_and_are_excluded_unless_asked(model):
    prompts = _prompts(5, seed=3)
    free = generate(model, prompts, 10, stop_ids=())
    # Stop each row on a token it actually emits: the output must end just before its first occurrence.
    stop = free[0][4]
    cut = generate(model, prompts, 10, stop_ids=(stop,), batch_size=2)
    with_stop = generate(model, prompts, 10, stop_ids=(stop,), batch_size=2, include_stop=True)
    for f, c, w in zip(free, cut, with_stop):
        k = f.index(stop) if stop in f else len(f)
        assert c == f[:k]
        assert w == f[:k + 1]
    assert len(cut[0]) <= 4


def test_default_stops_are_eos_and_im_end(model):
    assert default_stop_ids(model) == (2, CFG.vocab_size - 2)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    prompts = _prompts(4, seed=4)
    kw = dict(temperature=1.0, top_p=0.9, top_k=20, stop_ids=(), batch_size=2)
    a = generate(model, prompts, 16, seed=7, **kw)
    assert a == generate(model, prompts, 16, seed=7, **kw)
    assert a != generate(model, prompts, 16, seed=8, **kw)


def test_top_k_one_is_greedy_and_tiny_top_p_is_greedy(model):
    prompts = _prompts(3, seed=5)
    greedy = generate(model, prompts, 8, stop_ids=())
    assert generate(model, prompts, 8, temperature=1.3, top_k=1, seed=0, stop_ids=()) == greedy
    assert generate(model, prompts, 8, temperature=1.3, top_p=1e-6, seed=0, stop_ids=()) == greedy


def test_results_keep_input_order_and_handle_zero_tokens(model):
    prompts = _prompts(5, seed=6)
    out = generate(model, prompts, 6, stop_ids=(), batch_size=2)
    assert out[3] == generate(model, [prompts[3]], 6, stop_ids=())[0]
    assert generate(model, prompts, 0) == [[] for _ in prompts]


def test_bad_arguments_are_input_errors(model):
    with pytest.raises(InputError, match="empty"):
        generate(model, [[]], 4)
    with pytest.raises(InputError, match="top_p"):
        generate(model, [[1]], 4, top_p=0.0)


def test_score_logprobs_match_log_softmax_with_left_padding(model):
    prompts = _prompts(2, seed=7, lo=6, hi=10)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    lp = score_logprobs(model, ids, mask, chunk=3)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            ref = model(torch.tensor([p]))[0].log_softmax(-1)
            want = ref[:-1].gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
            torch.testing.assert_close(lp[r, width - len(p):], want, rtol=1e-4, atol=1e-4)
