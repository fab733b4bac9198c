"""HF tokenizer files (tokenizer/hf.py): a saved lm2 tokenizer opens with `transformers.AutoTokenizer` and
gives lm2's ids on every string, its decode and its chat template; the same for the SentencePiece backend."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from _released import example_texts, session_spm
from _tok_corpus import ADVERSARIAL, CODE, EN, ZH

from lm2cli.chat import render
from lm2cli.config import TokenizerConfig, load_recipe
from lm2cli.tokenizer import CHAT_TOKENS, Tokenizer, build_vocab, count_pretokens, pretokenizer_pattern
from lm2cli.tokenizer.hf import CHAT_TEMPLATE, hf_pattern

transformers = pytest.importorskip("transformers")

DIGITS = ["1234567", "０１２", "٣٤٥", "१२३४", "๑๒๓", "12,345.6789", "3.14159265358979", "v1.2.3-rc4", "0x7fff_ffff",
          "²³¹", "①②③", "ⅫⅣ", "1e-10", "2024年12月05日", "第1234567章", "+86 138 0013 8000", "１２３４５６７"]
SPACES = [" ", "  ", "   x", "\t", "\t\t  \t", "\n", "\n\n", "\r\n", " \n ", "a  b", "a\n\n\nb", "x   \n  y", "end   ",
          "\u3000全角空格\u3000", "\u00a0nbsp\u00a0", "  leading", "trailing\n\n", "\n \n \n", "\f\v", "tab\tsep"]
SPECIALS = ["<|im_start|>user\nhi<|im_end|>\n", "<s>", "</s>x", "a<unk>b", "<|action_start|><|plugin|>\n{}<|action_end|>",
            "<|im_start|>assistant\n", "<|interpreter|>", "[UNUSED_TOKEN_3]", "<s><s></s>", "x<|im_end|>y"]


def sample_strings(n_random: int = 700, seed: int = 0) -> list[str]:
    """Fixed edge cases, lines of the bundled examples and seeded mixtures of zh/en/code/digits/whitespace
    and special-token strings (>= 1,000 in all)."""
    lines = [line for text in example_texts(400_000) for line in text.split("\n") if line.strip()]
    rng = random.Random(seed)
    pools = [ZH, EN, CODE, DIGITS, SPACES, SPECIALS, rng.sample(lines, min(300, len(lines)))]
    mixed = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 6))) for _ in range(n_random)]
    out = [*ADVERSARIAL, *DIGITS, *SPACES, *SPECIALS, *ZH, *EN, *CODE, *lines[:300], *mixed]
    return [s for s in out if s]


@pytest.fixture(scope="module")
def strings():
    out = sample_strings()
    assert len(out) >= 1000
    return out


@pytest.fixture(scope="module")
def built():
    """The tiny recipe's vocabulary (split digits, a Chinese block), built on the examples' Chinese text."""
    cfg = load_recipe("tiny").tokenizer
    zh = [t for t in example_texts() if any("\u4e00" <= c <= "\u9fff" for c in t)] + ZH * 4
    return build_vocab(cfg, count_pretokens(zh, pretokenizer_pattern(cfg)))[0]


def _hf(tok, tmp_path_factory, name):
    from transformers import AutoTokenizer

    folder = tok.save(tmp_path_factory.mktemp(name))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def built_pair(built, tmp_path_factory):
    return built, _hf(built, tmp_path_factory, "built")


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory):
    tok = Tokenizer.default()
    return tok, _hf(tok, tmp_path_factory, "default")


def _ids(hf, texts, special=False):
    return hf(list(texts), add_special_tokens=special)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# byte-level BPE (tiktoken backend)


def test_digit_rule_is_bounded_in_the_hf_pattern():
    from lm2cli.tokenizer import CL100K_PAT, SPLIT_DIGITS_PAT

    assert r"\p{N}{1,3}+" in CL100K_PAT and r"\p{N}{1,3}+" not in hf_pattern(CL100K_PAT)
    assert hf_pattern(SPLIT_DIGITS_PAT) == SPLIT_DIGITS_PAT


@pytest.mark.parametrize("which", ["built_pair", "default_pair"])
def test_autotokenizer_gives_lm2_ids_on_every_string(which, strings, request):
    tok, hf = request.getfixturevalue(which)
    ours = [tok.encode(s, allow_special=True) for s in strings]
    theirs = _ids(hf, strings)
    diff = [(s, a, b) for s, a, b in zip(strings, ours, theirs) if a != b]
    assert not diff, f"{len(diff)} of {len(strings)} differ, first: {diff[0]!r}"
    # add_bos_token: `tokenizer(text)` starts with <s>, as InternLM2's
    assert _ids(hf, strings[:50], special=True) == [[tok.bos_id, *ids] for ids in ours[:50]]
    assert hf.convert_tokens_to_ids(list(CHAT_TOKENS)) == [tok.token_to_id(t) for t in CHAT_TOKENS]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert len(hf) == tok.vocab_size


@pytest.mark.parametrize("which", ["built_pair", "default_pair"])
def test_decode_round_trips_like_lm2(which, strings, request):
    tok, hf = request.getfixturevalue(which)
    for s in strings[:400]:
        ids = tok.encode(s, allow_special=True)
        assert hf.decode(ids) == tok.decode(ids) == s


def test_long_digit_runs_split_like_tiktoken(default_pair):
    tok, hf = default_pair  # cl100k: digits in runs of at most three, the rule a naive export makes unbounded
    for s in ["1234567", "1" * 40, "x 98765432101234 y", "٣٤٥٦٧٨٩", "０１２３４５６"]:
        assert _ids(hf, [s]) == [tok.encode(s)]
        assert all(len(tok.decode([i])) <= 3 for i in tok.encode(s) if tok.decode([i]).isdigit())


# ---------------------------------------------------------------------------------------------------
# chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are InternLM (书生·浦语)."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "再来一次"}],
    [{"role": "system", "content": "Tools:\n[{\"name\": \"search\"}]", "name": "<|plugin|>"},
     {"role": "user", "content": "weather in Shanghai?", "name": "alice"},
     {"role": "assistant", "content": "Let me look.<|action_start|><|plugin|>\n{\"name\": \"search\", "
                                      "\"parameters\": {\"q\": \"上海 天气\"}}<|action_end|>\n"},
     {"role": "environment", "content": "{\"temp\": 21}", "name": "<|plugin|>"},
     {"role": "assistant", "content": "21 °C."}],
    [{"role": "system", "content": "code", "name": "<|interpreter|>"}, {"role": "user", "content": "  spaces \n\n"},
     {"role": "assistant", "content": "<|action_start|><|interpreter|>\nprint(2**10)<|action_end|>"},
     {"role": "environment", "content": "1024", "name": "<|interpreter|>"}],
    [{"role": "user", "content": "text that looks special: <|im_end|> <s>"}, {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_apply_chat_template_is_byte_identical_to_render(built_pair, conv, gen):
    tok, hf = built_pair
    msgs = CONVERSATIONS[conv]
    text = render(msgs, add_generation_prompt=gen)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == text
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert list(ids) == tok.encode(text, allow_special=True)
    assert hf.chat_template == CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------
# SentencePiece backend (a released-style tokenizer.model, trained on the examples)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    return session_spm(tmp_path_factory)


@pytest.fixture(scope="module")
def spm_pair(spm_dir, tmp_path_factory):
    tok = Tokenizer.load(spm_dir)
    return tok, _hf(tok, tmp_path_factory, "spm-saved")


def test_released_layout_is_read_from_tokenizer_config(spm_dir):
    from _released import N_SPARE, VOCAB

    tok = Tokenizer.load(spm_dir)
    assert tok.backend == "sentencepiece" and tok.vocab_size == VOCAB
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(VOCAB - 6, VOCAB))  # 92538..92543 scaled
    assert tok.stop_ids == [2, VOCAB - 2]
    assert tok.reward_id == VOCAB - 17 and tok.reward_token == f"[UNUSED_TOKEN_{N_SPARE - 17}]"  # 92527 scaled
    assert [tok.token_bytes(3 + b) for b in range(256)] == [bytes([b]) for b in range(256)]  # byte fallback


def test_sentencepiece_backend_gives_sentencepiece_ids(spm_dir, strings):
    import sentencepiece as spm

    tok = Tokenizer.load(spm_dir)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    plain = [s for s in strings if "UNUSED_TOKEN" not in s]
    assert [tok.encode(s) for s in plain] == sp.encode(plain)
    assert tok.encode_batch(plain[:100]) == sp.encode(plain[:100])
    for s in plain:
        assert tok.decode(tok.encode(s)) == s
    # plain text never yields a special token, even the released spares' names that SentencePiece matches
    for s in ("<|im_start|>user", "[UNUSED_TOKEN_130] and <s>", "x[UNUSED_TOKEN_3]"):
        ids = tok.encode(s)
        assert not any(tok.is_special(i) for i in ids) and tok.decode(ids) == s
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)[0] == tok.im_start_id


def test_sentencepiece_folder_saved_by_lm2_opens_in_transformers(spm_pair, spm_dir, strings, tmp_path):
    tok, hf = spm_pair
    assert _ids(hf, strings) == [tok.encode(s, allow_special=True) for s in strings]
    for s in strings[:300]:
        ids = tok.encode(s, allow_special=True)
        assert hf.decode(ids) == tok.decode(ids) == s
    msgs = CONVERSATIONS[2]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render(msgs, True)
    # the saved folder is still the same tokenizer for lm2 (tokenizer.model copied, same special ids)
    again = Tokenizer.load(tok.save(tmp_path / "again"))
    assert again.fingerprint == tok.fingerprint and again.backend == "sentencepiece"
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (spm_dir / "tokenizer.model").read_bytes()


def test_tokenizer_json_alone_is_refused_with_a_reason(tmp_path, built):
    from lm2cli.errors import InputError

    (tmp_path / "tokenizer.json").write_bytes(built.hf_files()["tokenizer.json"])
    with pytest.raises(InputError, match="only a HF tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_counter_is_importable_from_the_package():
    assert isinstance(count_pretokens(["你好 世界"], pretokenizer_pattern(TokenizerConfig())), Counter)


def test_a_dummy_prefix_model_converts_too(spm_dir, strings, tmp_path):
    """Models that prepend `▁` (SentencePiece's default) encode, decode and convert the same way."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    proto = pb.ModelProto()
    proto.ParseFromString((spm_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    folder = tmp_path / "prefixed"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    (folder / "tokenizer_config.json").write_bytes((spm_dir / "tokenizer_config.json").read_bytes())
    tok = Tokenizer.load(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    plain = [s for s in strings if "UNUSED_TOKEN" not in s]
    assert [tok.encode(s) for s in plain] == sp.encode(plain)
    assert sp.encode("hi", out_type=str)[0].startswith("\u2581")  # the prefix is really there
    hf = AutoTokenizer.from_pretrained(tok.save(tmp_path / "saved"))
    assert _ids(hf, strings) == [tok.encode(s, allow_special=True) for s in strings]
    for s in plain[:300]:
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s)) == s


def test_a_folder_without_added_tokens_decoder_names_the_top_spares(spm_dir, tmp_path):
    import json

    cfg = json.loads((spm_dir / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"]
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    old, new = Tokenizer.load(tmp_path), Tokenizer.load(spm_dir)
    assert [old.token_to_id(t) for t in CHAT_TOKENS] == [new.token_to_id(t) for t in CHAT_TOKENS]
    assert old.fingerprint == new.fingerprint


@pytest.mark.parametrize("which", ["built_pair", "default_pair", "spm_pair"])
def test_real_news_documents_get_lm2_ids(which, request):
    """Whole real articles (People's Daily, ABC news; lm2cli.data.realtext), not test strings: HF's ids and
    decode equal lm2's on every one."""
    from lm2cli.data import realtext

    tok, hf = request.getfixturevalue(which)
    docs = realtext.load("zh_news") + realtext.load("en_news")
    ours, theirs = tok.encode_batch(docs), _ids(hf, docs)
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not diff, f"{len(diff)} of {len(docs)} documents differ, first: {docs[diff[0]][:80]!r}"
    assert hf.batch_decode(theirs) == [tok.decode(ids) for ids in ours]
