"""Inputs of every kind, random corpora, --shard, resume after a crash, the CLI and train-classifier."""

import gzip
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lm2cli import synthetic as S
from lm2cli.cli import app
from lm2cli.config import PrepareConfig, examples_dir, load_recipe
from lm2cli.data import pipeline, readers
from lm2cli.data.pipeline import STAGES, iter_kept, iter_rejected, run_prepare
from lm2cli.data.quality import load_classifier, train_classifier
from lm2cli.errors import InputError
from lm2cli.layout import Workspace


def _cfg(**kw) -> PrepareConfig:
    cfg = load_recipe("tiny").prepare
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _count_input(root: Path, cfg: PrepareConfig) -> Counter:
    """Sources of every record a reader yields: the ground truth for nothing-lost checks."""
    out = Counter()
    for f in readers.discover([root]):
        for u in readers.plan_units([f], int(cfg.task_mb * 1e6)):
            for item in readers.read_unit(u, cfg.types, int(cfg.max_record_mb * 1e6)):
                out[item["source"]] += 1
    return out


def _outputs(prepared: Path) -> Counter:
    return Counter(r["source"] for r in list(iter_kept(prepared)) + list(iter_rejected(prepared)))


def random_corpus(root: Path, seed: int, n_files: int = 6, per_file: int = 40) -> Path:
    """Random mixtures: prose, junk, unicode noise, duplicates, odd fields, compressed and plain files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    pool: list[str] = []
    for i in range(n_files):
        lines = []
        for _ in range(per_file):
            r = rng.random()
            if r < 0.35:
                text = S.zh_document(rng)
            elif r < 0.65:
                text = S.en_document(rng)
            elif r < 0.75 and pool:
                text = rng.choice(pool)  # exact duplicate
            elif r < 0.85:
                text = "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(rng.randint(0, 400)))
            else:
                text = " ".join(rng.choice(["buy", "now", "cheap", "!!!", "点击", "免费"]) for _ in range(rng.randint(1, 200)))
            pool.append(text)
            rec = {"text": text, "n": rng.random()} if rng.random() < 0.8 else {"content": text, "date": "2024-01-02"}
            lines.append(json.dumps(rec, ensure_ascii=False))
        if rng.random() < 0.2:
            lines.insert(rng.randrange(len(lines)), "{broken json")
        data = ("\n".join(lines) + "\n").encode()
        if i % 3 == 0:
            with gzip.open(root / f"part-{i}.jsonl.gz", "wb") as g:
                g.write(data)
        else:
            (root / f"part-{i}.jsonl").write_bytes(data)
    (root / "notes.txt").write_text(S.en_document(rng, paragraphs=(5, 6)), encoding="utf-8")
    (root / "page.html").write_text(f"<html><body><p>{S.zh_paragraph(rng)}</p><script>x()</script></body></html>",
                                    encoding="utf-8")
    return root


@pytest.mark.parametrize("seed", [1, 2])
def test_nothing_lost_on_random_corpora(tmp_path, seed):
    corpus = random_corpus(tmp_path / "in", seed)
    cfg = _cfg(task_mb=0.02)  # several tasks, and byte-range splits of the bigger JSONL files
    stats = run_prepare([corpus], Workspace.at(tmp_path / "ws"), cfg)
    truth = _count_input(corpus, cfg)
    assert _outputs(tmp_path / "ws" / "data" / "prepared") == truth
    assert stats["input_records"] == sum(truth.values())
    assert stats["input_records"] == stats["kept_records"] + stats["rejected_records"]
    assert stats["tasks"] > 3
    for s in STAGES:
        st = stats["stages"][s]
        assert st["in"] == st["kept"] + st["rejected"]


def test_byte_ranges_own_each_line_once(tmp_path):
    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 17)}) for i in range(500)]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for size in (1, 7, 100, 1000, 10**6):
        units = readers.plan_units([path], size)
        got = [it["source"] for u in units for it in readers.read_unit(u, {}, 10**6)]
        assert got == [f"{path}:{i + 1}" for i in range(500)], size


def test_each_bad_input_is_rejected_with_a_reason_and_never_crashes(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = S.en_document(random.Random(3), paragraphs=(5, 6))
    (bad / "latin1.jsonl").write_bytes(json.dumps({"text": good}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (bad / "notutf8.txt").write_bytes("déjà vu ".encode("latin-1") * 20)
    full = gzip.compress((json.dumps({"text": good}) + "\n").encode() * 200)
    (bad / "cut.jsonl.gz").write_bytes(full[: len(full) // 2])
    (bad / "notext.jsonl").write_text('{"title": "no text here"}\n{"text": null}\n')
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "blank.txt").write_text("  \n\n ")
    huge = bad / "huge.jsonl"
    with open(huge, "wb") as f:  # one 50 MB line: must be rejected without loading it whole
        f.write(b'{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(50):
            f.write(chunk)
        f.write(b'"}\n')
    digest = hashlib.sha256(huge.read_bytes()).hexdigest()
    cfg = _cfg()
    stats = run_prepare([bad], Workspace.at(tmp_path / "ws"), cfg)
    rej = {r["source"].rsplit("/", 1)[-1]: r for r in iter_rejected(tmp_path / "ws" / "data" / "prepared", "format")}
    assert rej["latin1.jsonl:2"]["reason"] == "invalid_utf8"
    assert rej["notutf8.txt"]["reason"] == "invalid_utf8"
    assert rej["cut.jsonl.gz"]["reason"] == "corrupt_compression"
    assert rej["notext.jsonl:1"]["reason"] == "missing_text"
    assert rej["notext.jsonl:2"]["reason"] == "text_not_string"
    assert rej["empty.jsonl"]["reason"] == "empty_file"
    assert rej["blank.txt"]["reason"] == "empty_file"
    big = rej["huge.jsonl:1"]
    assert big["reason"] == "record_too_large"
    assert big["meta"]["raw_size"] == huge.stat().st_size and big["meta"]["raw_sha256"] == digest
    assert stats["input_records"] == stats["kept_records"] + stats["rejected_records"]
    assert stats["stages"]["format"]["kept"] >= 2  # the good lines around the bad ones survive


def test_shards_partition_the_records_exactly_once(tmp_path):
    corpus = random_corpus(tmp_path / "in", 5)
    cfg = _cfg(task_mb=0.02)
    ws = Workspace.at(tmp_path / "ws")
    n = 3
    for i in range(n):
        out = run_prepare([corpus], ws, cfg, shard=f"{i}/{n}")
        assert out["shard"] == f"{i}/{n}"
    prepared = ws.prepared
    # After phase A of every shard: each record sits exactly once in a shard's passing or rejected output.
    seen = Counter()
    for p in sorted((prepared / ".work" / "a").glob("part-*.jsonl")):
        seen.update(json.loads(line)["source"] for line in p.read_text().splitlines())
    for r in iter_rejected(prepared):
        seen[r["source"]] += 1
    assert seen == _count_input(corpus, cfg)
    # The final run dedups and finishes without redoing a single phase-A task.
    calls = []
    orig = pipeline.run_phase_a
    pipeline.run_phase_a = lambda *a, **k: calls.append(a) or orig(*a, **k)
    try:
        stats = run_prepare([corpus], ws, cfg)
    finally:
        pipeline.run_phase_a = orig
    assert calls == []
    assert _outputs(prepared) == _count_input(corpus, cfg)
    assert stats["input_records"] == sum(_count_input(corpus, cfg).values())


def test_resume_after_a_crash_redoes_only_unfinished_tasks(tmp_path, monkeypatch):
    corpus = random_corpus(tmp_path / "in", 6)
    cfg = _cfg(task_mb=0.02)
    ws = Workspace.at(tmp_path / "ws")
    orig_a, orig_c = pipeline.run_phase_a, pipeline.run_phase_c
    done = []

    def crash_on_third(task, *a):
        if len(done) == 2:
            raise RuntimeError("simulated crash")
        done.append(task)
        return orig_c(task, *a)

    monkeypatch.setattr(pipeline, "run_phase_c", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated"):
        run_prepare([corpus], ws, cfg)
    assert not (ws.prepared / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "run_phase_a", lambda *a: pytest.fail("phase A re-ran"))
    redone = []
    monkeypatch.setattr(pipeline, "run_phase_c", lambda task, *a: redone.append(task) or orig_c(task, *a))
    stats = run_prepare([corpus], ws, cfg)
    assert sorted(set(redone) & set(done)) == []
    assert _outputs(ws.prepared) == _count_input(corpus, cfg)
    assert stats["input_records"] == stats["kept_records"] + stats["rejected_records"]
    # --force starts over from scratch.
    monkeypatch.setattr(pipeline, "run_phase_a", orig_a)
    forced = run_prepare([corpus], ws, cfg, force=True)
    assert forced["input_records"] == stats["input_records"] and "skipped" not in forced


def test_resume_refuses_a_changed_minhash_scheme(tmp_path, monkeypatch):
    corpus = random_corpus(tmp_path / "in", 7, n_files=2)
    cfg = _cfg(task_mb=0.02)
    ws = Workspace.at(tmp_path / "ws")
    run_prepare([corpus], ws, cfg, shard="0/2")
    other = load_recipe("tiny", ["prepare.dedup.scheme=legacy", "prepare.task_mb=0.02"]).prepare
    with pytest.raises(InputError, match="cannot resume"):
        run_prepare([corpus], ws, other)


def test_cli_prepare_json_and_types(tmp_path):
    corpus = random_corpus(tmp_path / "in", 8, n_files=2, per_file=20)
    (corpus / "papers").mkdir()
    (corpus / "papers" / "p.md").write_text(S.en_document(random.Random(1), paragraphs=(5, 6)), encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", str(corpus), "-w", str(tmp_path / "ws"), "--type", "*/papers/*=paper",
                              "--set", "prepare.task_mb=0.05", "--workers", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["input_records"] == out["kept_records"] + out["rejected_records"]
    assert "paper" in out["stages"]["format"]["by_type"]
    # Usage errors are InputError, which `lm2` turns into one line and exit code 2.
    res = runner.invoke(app, ["prepare", str(corpus), "-w", str(tmp_path / "ws2"), "--type", "x=novel"])
    assert isinstance(res.exception, InputError) and "--type" in str(res.exception)
    res = runner.invoke(app, ["prepare", str(corpus), "-w", str(tmp_path / "ws3"), "--shard", "3/2"])
    assert isinstance(res.exception, InputError)


def test_train_classifier_round_trip(tmp_path):
    labels = examples_dir() / "labels" / "ad.jsonl"
    model_path = tmp_path / "ad.npz"
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "train-classifier", "--labels", str(labels), "--name", "ad", "--out",
                              str(model_path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["holdout_accuracy"] >= 0.9
    model = load_classifier(model_path)
    assert model.meta["name"] == "ad" and model.meta["holdout_accuracy"] == info["holdout_accuracy"]
    rows = [json.loads(line) for line in labels.read_text(encoding="utf-8").splitlines()]
    scores = [(model.score(r["text"]) >= 0.5) == bool(r["label"]) for r in rows]
    assert sum(scores) / len(scores) >= 0.95
    again = train_classifier(labels, "ad", tmp_path / "ad2.npz")  # deterministic for a fixed seed
    assert again["holdout_accuracy"] == info["holdout_accuracy"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "maybe"}\n')
    res = runner.invoke(app, ["prepare", "train-classifier", "--labels", str(bad), "--name", "ad", "--out",
                              str(tmp_path / "x.npz")])
    assert isinstance(res.exception, InputError) and "bad.jsonl:1" in str(res.exception)


@pytest.mark.slow
def test_perplexity_filter_scores_with_an_lm2_checkpoint(tmp_path):
    import torch

    from lm2cli.config import ModelConfig, TokenizerConfig
    from lm2cli.convert import save_model
    from lm2cli.model import InternLM2
    from lm2cli.tokenizer import build_vocab

    tok, _ = build_vocab(TokenizerConfig(n_en=256, n_zh=16, n_spare=16), Counter({"中文": 5}))
    torch.manual_seed(0)
    model = InternLM2(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    ckpt = save_model(model, tmp_path / "ckpt", tokenizer=tok)
    corpus = tmp_path / "in"
    corpus.mkdir()
    rng = random.Random(1)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": S.en_document(rng, paragraphs=(5, 6))}) + "\n"
                                            for _ in range(3)))
    cfg = load_recipe("tiny", [f"prepare.quality.perplexity_model={ckpt}", "prepare.quality.max_perplexity=1"]).prepare
    stats = run_prepare([corpus], Workspace.at(tmp_path / "ws"), cfg)
    rejected = list(iter_rejected(tmp_path / "ws" / "data" / "prepared", "quality"))
    assert stats["stages"]["quality"]["reasons"] == {"perplexity": len(rejected)} and rejected
    assert all(r["meta"]["lm2"]["perplexity"] > 1 for r in rejected)  # an untrained model is near-uniform


def test_lone_surrogates_in_json_are_replaced_not_fatal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = S.en_document(random.Random(5), paragraphs=(5, 6))
    # json.dumps escapes the lone surrogate as \ud800, which json.loads turns back into one.
    (src / "sur.jsonl").write_text(json.dumps({"text": good + " \ud800 end."}) + "\n")
    stats = run_prepare([src], Workspace.at(tmp_path / "ws"), _cfg())
    assert stats["input_records"] == stats["kept_records"] + stats["rejected_records"] == 1
    recs = list(iter_kept(tmp_path / "ws" / "data" / "prepared")) + [
        r for r in iter_rejected(tmp_path / "ws" / "data" / "prepared") if r.get("text")]
    assert recs and "\ufffd" in recs[0]["text"] and "\ud800" not in recs[0]["text"]
