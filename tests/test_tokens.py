"""lm2cli.tokens: prepared JSONL -> binary token shards, and the TokenStore reader."""

import json
from collections import Counter

import numpy as np
import pytest
from _tok_corpus import records, write_prepared
from typer.testing import CliRunner

from lm2cli import tokenizer as T
from lm2cli import tokens as TK
from lm2cli.cli import app
from lm2cli.config import TokenizeConfig, TokenizerConfig
from lm2cli.errors import InputError, WrongArtefact
from lm2cli.layout import Workspace, write_manifest
from lm2cli.tokenizer import Tokenizer
from lm2cli.tokens import TokenStore

BAD_LINES = [
    "{not json",
    '{"id": "no-text", "lang": "en"}',
    '{"id": "empty", "text": "", "lang": "en"}',
    "[1, 2, 3]",
    '{"id": "lone", "text": "a\\ud800b", "lang": "en", "content_type": "web"}',
]


@pytest.fixture(scope="module")
def built():
    cfg = TokenizerConfig(n_en=1000, n_zh=300, n_spare=16)
    zh = [r["text"] for r in records(seed=0) if r["lang"] == "zh"]
    return T.build_vocab(cfg, T.count_pretokens(zh, T.pretokenizer_pattern(cfg)))[0]


@pytest.fixture(scope="module")
def corpus():
    return records(seed=3, n_zh=150, n_en=80, n_code=30, n_mixed=20)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    return write_prepared(tmp_path_factory.mktemp("prep") / "prepared", corpus, shards=3, extra_lines=BAD_LINES)


@pytest.fixture(scope="module")
def written(tmp_path_factory, prepared, built):
    out = tmp_path_factory.mktemp("tok") / "tokens"
    cfg = TokenizeConfig(val_fraction=0.2, seed=0)
    manifest = TK.tokenize_dir(prepared, out, built, cfg, workers=1, chunk_bytes=16 << 10)
    return out, manifest


def test_round_trip_every_document(written, built, corpus):
    out, manifest = written
    store = TokenStore(out)
    assert store.tokenizer_fingerprint == built.fingerprint == store.tokenizer().fingerprint
    want = Counter((TK.split_name(r), r["text"]) for r in corpus)
    want[("en.web", "a\ufffdb")] += 1  # the lone surrogate, replaced (tokenizer policy)
    got = Counter()
    for part in ("train", "val"):
        for name, split in store.splits(part).items():
            assert split.tokens.dtype == np.uint16
            assert split.starts[0] == 0 and split.starts[-1] == split.num_tokens == len(split.tokens)
            assert split.doc_lengths.sum() == split.num_tokens and split.num_docs == len(split.doc_lengths)
            for i in range(split.num_docs):
                doc = split.doc(i)
                assert doc[0] == built.bos_id and doc[-1] == built.eos_id
                body = doc[1:-1]
                assert not any(built.is_special(t) for t in body.tolist())
                got[(name, built.decode(body))] += 1
    assert got == want
    counts = manifest["stats"]["splits"]
    for part in ("train", "val"):
        for name, split in store.splits(part).items():
            assert counts[part][name]["tokens"] == split.num_tokens
            assert counts[part][name]["docs"] == split.num_docs
    assert manifest["stats"]["rejected"]["count"] == 4
    rejected = [json.loads(x) for x in (out / TK.REJECTED).read_text().splitlines()]
    assert sorted(r["reason"].split(":")[0] for r in rejected) == ["empty text", "invalid json", "no text field",
                                                                    "not a json object"]


def test_headers_and_files_follow_the_format(written, built):
    out, manifest = written
    assert manifest["kind"] == "tokens" and manifest["format"]["dtype"] == "uint16"
    assert manifest["tokenizer"]["id0_occurs"] is False
    split = TokenStore(out).splits("train")["zh.web"]
    h = np.fromfile(split.bin_path, dtype="<i4", count=256)
    assert h[0] == TK.MAGIC_BIN and h[1] == 1 and h[4] == 2 and h[5] == built.vocab_size
    assert h[2:4].view("<i8")[0] == split.num_tokens and h[6:8].view("<i8")[0] == split.num_docs
    raw = np.fromfile(split.bin_path, dtype="<u2", offset=1024)
    assert np.array_equal(raw, split.tokens)
    idx = np.fromfile(split.idx_path, dtype="<i4", count=256)
    assert idx[0] == TK.MAGIC_IDX and idx[4] == 8 and idx[2:4].view("<i8")[0] == split.num_docs + 1
    assert sorted(p.name for p in (out / TK.TOKENIZER_DIR).iterdir()) == sorted([T.RANKS_FILE, T.CONFIG_FILE])
    assert not (out.parent / f".{out.name}.partial").exists()


def test_dtype_follows_the_vocabulary(tmp_path, built):
    assert TK.dtype_for(built.vocab_size) == np.uint16
    assert TK.dtype_for(65536) == np.uint16 and TK.dtype_for(65537) == np.uint32
    prep = write_prepared(tmp_path / "prepared", records(seed=4, n_zh=6, n_en=6, n_code=2, n_mixed=2), shards=1)
    m = TK.tokenize_dir(prep, tmp_path / "tokens", Tokenizer.default(), TokenizeConfig(val_fraction=0.0))
    assert m["format"]["dtype"] == "uint32" and m["tokenizer"]["id0_occurs"] is True
    split = TokenStore(tmp_path / "tokens").splits("train")["en.book"]
    assert split.tokens.dtype == np.uint32 and split.doc(0)[0] == Tokenizer.default().bos_id
    assert TokenStore(tmp_path / "tokens").splits("val") == {}


def test_val_split_is_deterministic_and_disjoint(tmp_path, written, prepared, built, corpus):
    out, manifest = written
    store = TokenStore(out)
    n_val = manifest["stats"]["docs"]["val"]
    n_train = manifest["stats"]["docs"]["train"]
    assert n_train + n_val == len(corpus) + 1
    expected_val = sum(TK.is_val(r["id"], 0, 0.2) for r in corpus) + TK.is_val("lone", 0, 0.2)
    assert n_val == expected_val and 0.1 < n_val / (n_train + n_val) < 0.3
    # another worker count and chunking gives byte-identical shards (the split depends on ids only)
    again = tmp_path / "tokens"
    TK.tokenize_dir(prepared, again, built, TokenizeConfig(val_fraction=0.2, seed=0), workers=2)
    for part in ("train", "val"):
        for name, split in store.splits(part).items():
            assert (again / part / f"{name}.bin").read_bytes() == split.bin_path.read_bytes()
            assert (again / part / f"{name}.idx").read_bytes() == split.idx_path.read_bytes()
    # a different seed holds out a different set
    ids = [r["id"] for r in corpus]
    assert [TK.is_val(i, 0, 0.2) for i in ids] != [TK.is_val(i, 1, 0.2) for i in ids]


def test_resume_skips_finished_chunks(tmp_path, prepared, built, written, monkeypatch):
    out = tmp_path / "tokens"
    cfg = TokenizeConfig(val_fraction=0.2, seed=0)
    calls, crash = [], [True]
    real = TK._tokenize_chunk

    def flaky(chunk, work):
        calls.append(chunk.id)
        if len(calls) == 4 and crash.pop():
            raise RuntimeError("killed mid-run")
        return real(chunk, work)

    monkeypatch.setattr(TK, "_tokenize_chunk", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        TK.tokenize_dir(prepared, out, built, cfg, workers=1, chunk_bytes=16 << 10)
    assert not out.exists()
    first = list(calls)
    calls.clear()
    crash.append(False)
    m = TK.tokenize_dir(prepared, out, built, cfg, workers=1, chunk_bytes=16 << 10)
    assert set(first[:3]).isdisjoint(calls) and first[3] in calls
    assert len(first[:3]) + len(calls) == len(TK.plan_chunks(T.prepared_files(prepared), 16 << 10))
    ref = written[0]
    for part in ("train", "val"):
        for name in m["stats"]["splits"][part]:
            assert (out / part / f"{name}.bin").read_bytes() == (ref / part / f"{name}.bin").read_bytes()
    calls.clear()
    assert TK.tokenize_dir(prepared, out, built, cfg, workers=1)["job_key"] == m["job_key"] and calls == []
    TK.tokenize_dir(prepared, out, built, cfg, workers=1, force=True)
    assert calls  # --force redoes up-to-date shards


def test_chunks_cover_every_line_once(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [f'{{"i": {i}, "pad": "{"x" * (i % 37)}"}}\n'.encode() for i in range(300)]
    path.write_bytes(b"".join(lines))
    for size in (1, 7, 64, 1000, 1 << 20):
        seen = [line for c in TK.plan_chunks([path], size) for _, line in TK._lines(c)]
        assert seen == lines


def test_reader_refuses_wrong_or_damaged_artefacts(tmp_path, written, built):
    out, _ = written
    with pytest.raises(WrongArtefact):
        TokenStore(out / TK.TOKENIZER_DIR)
    other = T.build_vocab(TokenizerConfig(n_en=500, n_zh=0, n_spare=16), Counter())[0]
    with pytest.raises(InputError, match="tokenized with"):
        TokenStore(out).require_tokenizer(other)
    TokenStore(out).require_tokenizer(built)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    split = TokenStore(copy).splits("train")["en.book"]
    with open(split.bin_path, "r+b") as f:
        f.truncate(split.bin_path.stat().st_size - 2)
    with pytest.raises(WrongArtefact, match="truncated"):
        _ = TokenStore(copy).splits("train")["en.book"].tokens
    with pytest.raises(InputError):
        TokenStore(copy).splits("test")


def test_tokenize_command_uses_the_workspace_tokenizer(tmp_path, built):
    ws = Workspace(tmp_path / "ws")
    write_prepared(ws.prepared, records(seed=5, n_zh=20, n_en=10, n_code=4, n_mixed=4))
    runner = CliRunner()
    res = runner.invoke(app, ["tokenize", "--workdir", str(ws.root), "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tokenizer"]["fingerprint"] == Tokenizer.default().fingerprint
    built.save(ws.tokenizer)
    write_manifest(ws.tokenizer, "tokenizer")
    res = runner.invoke(app, ["tokenize", "--workdir", str(ws.root), "--set", "tokenize.val_fraction=0.3", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["tokenizer"]["fingerprint"] == built.fingerprint
    assert summary["tokenizer"]["source"] == str(ws.tokenizer)
    assert TokenStore(ws.tokens).tokenizer_fingerprint == built.fingerprint
    assert [i["kind"] for i in TokenStore(ws.tokens).manifest["inputs"]] == ["prepared", "tokenizer"]
    ckpt = tmp_path / "some-checkpoint"  # any folder carrying tokenizer files will do
    built.save(ckpt)
    res = runner.invoke(app, ["tokenize", "-w", str(ws.root), "--tokenizer", str(ckpt), "-j", "1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["tokenizer"]["source"] == str(ckpt.resolve())
    res = runner.invoke(app, ["tokenize", "-w", str(ws.root), "--tokenizer", "cl100k", "-j", "1", "--json"])
    assert json.loads(res.stdout)["tokenizer"]["fingerprint"] == Tokenizer.default().fingerprint
    res = runner.invoke(app, ["tokenize", "--workdir", str(tmp_path / "empty")])
    assert isinstance(res.exception, InputError) and "lm2 prepare" in str(res.exception)


def test_shard_assembly_copies_exact_ranges_with_or_without_kernel_copy(tmp_path, monkeypatch):
    import os

    (tmp_path / "src").write_bytes(b"A" * 1000 + b"B" * 5000)
    want = b"H" * 10 + b"B" * 4000 + b"A" * 3
    with open(tmp_path / "fast", "wb") as f:
        f.write(b"H" * 10)
        TK._append_range(tmp_path / "src", 1000, 4000, f)
        TK._append_range(tmp_path / "src", 0, 3, f)
    assert (tmp_path / "fast").read_bytes() == want
    if hasattr(os, "copy_file_range"):
        real = os.copy_file_range

        def fails_midway(src, dst, count, offset_src=None, *args):
            real(src, dst, 7, offset_src)
            raise OSError("cross-device")

        monkeypatch.setattr(os, "copy_file_range", fails_midway)
    with open(tmp_path / "slow", "wb") as f:
        f.write(b"H" * 10)
        TK._append_range(tmp_path / "src", 1000, 4000, f)
        TK._append_range(tmp_path / "src", 0, 3, f)
    assert (tmp_path / "slow").read_bytes() == want


def test_a_failing_worker_process_stops_the_run_and_a_rerun_resumes(tmp_path, prepared, built, written, monkeypatch):
    real = TK._tokenize_chunk_records

    def fails_on_one_chunk(chunk, work):
        if chunk.id == "00001-00002":
            raise RuntimeError("worker died")
        return real(chunk, work)

    monkeypatch.setattr(TK, "_tokenize_chunk_records", fails_on_one_chunk)  # forked workers inherit it
    cfg = TokenizeConfig(val_fraction=0.2, seed=0)
    with pytest.raises(RuntimeError, match="worker died"):
        TK.tokenize_dir(prepared, tmp_path / "tokens", built, cfg, workers=2, chunk_bytes=16 << 10)
    assert not (tmp_path / "tokens").exists()
    monkeypatch.setattr(TK, "_tokenize_chunk_records", real)
    m = TK.tokenize_dir(prepared, tmp_path / "tokens", built, cfg, workers=2, chunk_bytes=16 << 10)
    assert m["stats"]["splits"] == written[1]["stats"]["splits"]
