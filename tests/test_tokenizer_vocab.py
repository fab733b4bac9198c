"""build-vocab's arithmetic and its bounded counting (tokenizer/vocab.py): every InternLM2 recipe lands on
exactly 92,544 ids, a recipe that cannot is refused before any text is read, and the Chinese counts come
from a seeded sample with a bounded number of distinct pre-tokens."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter

import pytest
from _tok_corpus import records, write_prepared
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.config import TokenizerConfig, load_recipe, to_dict
from lm2cli.errors import InputError
from lm2cli.layout import Workspace
from lm2cli.tokenizer import (
    CHAT_TOKENS,
    build_vocab,
    count_pretokens,
    planned_vocab_size,
    pretokenizer_pattern,
)
from lm2cli.tokenizer import vocab as V

RECIPES = ("internlm2-1_8b", "internlm2-7b", "internlm2-20b")


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_numbers_add_up_to_the_model_vocabulary(name):
    r = load_recipe(name)
    t = r.tokenizer
    assert r.model.vocab_size == 92544 == 723 * 128
    assert 3 + t.n_en + t.n_zh + t.n_spare == planned_vocab_size(t) == r.model.vocab_size
    V.check_arithmetic(t, r.model.vocab_size)  # does not raise


def test_report_numbers_are_refused_before_reading_text(tmp_path):
    ws = Workspace(tmp_path / "ws")
    write_prepared(ws.prepared, records(seed=2, n_zh=4, n_en=2, n_code=1, n_mixed=1))
    res = CliRunner().invoke(app, ["tokenize", "build-vocab", "--workdir", str(ws.root), "--recipe", "internlm2-7b",
                                   "--set", "tokenizer.n_zh=32397"])
    assert isinstance(res.exception, InputError)  # lm2's main() turns it into one line and exit 2
    msg = str(res.exception)
    assert "\n" not in msg and "92551" in msg and "92544" in msg and "n_zh=32390" in msg
    assert not ws.tokenizer.exists()


def test_too_little_chinese_text_is_refused_naming_both_sizes():
    cfg = TokenizerConfig(n_en=600, n_zh=300, n_spare=147, pad_multiple=128)
    target = planned_vocab_size(cfg)
    with pytest.raises(InputError, match=rf"has \d+ ids \(learned 5 of n_zh 300 .* model.vocab_size is {target}"):
        build_vocab(cfg, Counter({"你好".encode(): 3}), vocab_size=target)  # 5 byte merges, then nothing repeats


def test_n_en_counts_the_byte_tokens():
    tok, stats = build_vocab(TokenizerConfig(n_en=700, n_zh=0, n_spare=17, pad_multiple=1), Counter())
    assert stats["blocks"]["bytes"] + stats["blocks"]["cl100k"] == 700
    assert tok.vocab_size == 3 + 700 + 17
    with pytest.raises(InputError, match="256 byte tokens"):
        build_vocab(_cfg(n_en=100, n_zh=0), Counter())


def _cfg(**kw) -> TokenizerConfig:
    cfg = TokenizerConfig()
    for k, v in kw.items():  # bypass __post_init__, as a hand-built config would
        object.__setattr__(cfg, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------------
# bounded, seeded, parallel counting


def test_pruning_keeps_frequent_pretokens_exact():
    texts = ["你好 世界 " * 50] + [f"罕见{chr(0x4e00 + i)}" for i in range(500)]
    counts = count_pretokens(texts, pretokenizer_pattern(TokenizerConfig()), max_keys=100)
    assert len(counts) <= 100
    assert counts[" 你好".encode()] == 49 and counts[" 世界".encode()] == 50  # the rare ones went


def test_sample_picks_documents_by_key_not_by_position():
    recs = [{"id": f"d{i}", "lang": "zh", "text": "中文" * 10} for i in range(2000)]
    sample = V.ZhSample((0, 0.0), 0.25)
    picked = {r["id"] for r in recs if sample.picks(r)}
    assert 350 < len(picked) < 650
    assert picked == {r["id"] for r in reversed(recs) if sample.picks(r)}
    assert picked != {r["id"] for r in recs if V.ZhSample((1, 0.0), 0.25).picks(r)}  # the seed salts it
    assert not any(V.ZhSample((0, 0.0), 1.0).picks({**r, "lang": "en"}) for r in recs[:10])


def test_sample_rate_reads_the_prepared_manifest(tmp_path):
    from lm2cli.layout import write_manifest

    prep = tmp_path / "prepared"
    (prep / "kept").mkdir(parents=True)
    (prep / "kept" / "part-00000.jsonl").write_text("{}\n")
    write_manifest(prep, "prepared", stats={"kept": {"by_lang": {"zh": {"bytes": 3000}, "mixed": {"bytes": 1000},
                                                                 "en": {"bytes": 10 ** 9}}}})
    assert V.sample_rate(prep, 1000) == 0.25
    assert V.sample_rate(prep, 0) == V.sample_rate(prep, 10 ** 6) == 1.0


@pytest.mark.timeout(300)
def test_parallel_counts_equal_serial_counts(tmp_path):
    prep = write_prepared(tmp_path / "prepared", records(seed=7, n_zh=80, n_en=10, n_code=2, n_mixed=20), shards=6)
    files = V.prepared_files(prep)
    sample = V.ZhSample((0, 0.05), 0.5)
    pat = pretokenizer_pattern(TokenizerConfig())
    serial = V._count_parallel(files, pat, 1, sample)
    assert serial and V._count_parallel(files, pat, 2, sample) == serial


# ---------------------------------------------------------------------------------------------------
# the recipes' vocabulary, built for real


@functools.lru_cache(maxsize=1)
def chinese_text(n_words: int = 60_000) -> list[str]:
    """Distinct Chinese text, cheaply: jieba's dictionary words, most frequent first, each written twice."""
    import jieba

    with open(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), encoding="utf-8") as f:
        rows = [line.split() for line in f]
    words = sorted(((int(r[1]), r[0]) for r in rows if len(r[0]) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in r[0])),
                   reverse=True)
    top = [w for _, w in words[:n_words]]
    return [" ".join(w for w in top[i:i + 50] for _ in range(2)) for i in range(0, len(top), 50)]


@functools.cache
def _build(cfg_json: str, vocab_size: int):
    cfg = TokenizerConfig(**json.loads(cfg_json))
    return build_vocab(cfg, count_pretokens(chinese_text(), pretokenizer_pattern(cfg)), vocab_size=vocab_size)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_vocabulary_is_exactly_92544(name):
    r = load_recipe(name)
    tok, stats = _build(json.dumps(to_dict(r.tokenizer), sort_keys=True), r.model.vocab_size)
    assert tok.vocab_size == r.model.vocab_size == 92544
    assert stats["blocks"] == {"special": 3, "bytes": 256, "cl100k": r.tokenizer.n_en - 256,
                               "zh": r.tokenizer.n_zh, "spare": r.tokenizer.n_spare}
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(92538, 92544))  # as the released models
    assert tok.reward_id == 92527 and tok.reward_token == "[UNUSED_TOKEN_130]" and tok.stop_ids == [2, 92542]
    assert len(tok.encode(" 中国")) == 1 and len(tok.encode("2024")) == 4  # Chinese words learned, digits split


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recipe_vocabulary_on_real_news_compresses_held_out_chinese():
    """The 7B recipe's vocabulary learned on 2,000 People's Daily articles (lm2cli.data.realtext): exactly
    92,544 ids, and the other 308 articles in under half of cl100k's tokens (the point of InternLM2's
    Chinese block; measured 1.82 against cl100k's 0.81 characters a token, digits and punctuation included)."""
    from lm2cli.data import realtext
    from lm2cli.tokenizer import Tokenizer

    news = realtext.load("zh_news")
    train, held_out = news[:2000], news[2000:]
    cfg = load_recipe("internlm2-7b").tokenizer
    tok, stats = build_vocab(cfg, count_pretokens(train, pretokenizer_pattern(cfg)), vocab_size=92544)
    assert tok.vocab_size == 92544 and stats["blocks"]["zh"] == cfg.n_zh
    chars = sum(len(t) for t in held_out)
    ours = sum(len(ids) for ids in tok.encode_batch(held_out))
    cl100k = sum(len(ids) for ids in Tokenizer.default().encode_batch(held_out))
    assert chars / ours > 1.6 and ours < 0.5 * cl100k, (chars / ours, chars / cl100k)
    assert all(tok.decode(tok.encode(t)) == t for t in held_out)
