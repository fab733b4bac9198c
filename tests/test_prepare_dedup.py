"""MinHash-LSH dedup: measured zh/en pairs, the keep rule, datasketch parity, and the Redis-backed index."""

import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from lm2cli import synthetic as S
from lm2cli.config import DedupConfig
from lm2cli.data import dedup
from lm2cli.data.standardize import content_id

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import make_corpus  # noqa: E402

CFG = DedupConfig()


def _pairs(lang: str, seed: int):
    """(base, near copy J>=0.8, below copy J~0.3-0.5) triples, Jaccard measured on lm2's shingles."""
    rng = random.Random(seed)
    gen = S.zh_document if lang == "zh" else S.en_document
    out = []
    for _ in range(12):
        base = gen(rng, paragraphs=(5, 6))
        near, j_near = make_corpus.near_copy(rng, base, lang, 0.8, 0.95)
        below, j_below = make_corpus.below_copy(rng, base, lang)
        assert j_near >= 0.8 and j_below <= 0.55
        out.append((base, near, below))
    return out


def _run(texts: list[str], cfg: DedupConfig = CFG, meta: list[dict] | None = None):
    signer = dedup.Signer(cfg)
    sigs, entries = [], []
    for i, t in enumerate(texts):
        sig = signer.signature(t)
        row = -1
        if sig is not None:
            row = len(sigs)
            sigs.append(sig)
        m = meta[i] if meta else {}
        entries.append(dedup.Entry(i, content_id(t), dedup.exact_key(t, m.get("lang", "en")), dedup.recency_of(m), row))
    drops, kept = dedup.find_duplicates(entries, np.stack(sigs), cfg)
    return drops, kept, entries


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_near_and_exact_copies_collapse_and_pairs_below_threshold_survive(lang):
    triples = _pairs(lang, seed=3 if lang == "zh" else 4)
    texts = []
    for base, near, below in triples:
        texts += [base, near, below, base]  # the base twice: an exact copy
    drops, kept, _ = _run(texts)
    for k in range(len(triples)):
        b, n, w, x = 4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3
        assert drops[x]["reason"] == "exact_duplicate"
        # base and near copy: exactly one survives; the below-threshold copy always survives
        assert (b in drops) + (n in drops) == 1, k
        assert w not in drops
        gone = b if b in drops else n
        assert drops[gone]["reason"] == "near_duplicate"
        assert drops[gone]["dup_cluster_size"] == 2


def test_keep_rule_newest_dump_then_lowest_id():
    rng = random.Random(5)
    base = S.en_document(rng, paragraphs=(5, 6))
    near, _ = make_corpus.near_copy(rng, base, "en", 0.85, 0.95)
    metas = [{"cc_dump": "CC-MAIN-2021-04"}, {"cc_dump": "CC-MAIN-2024-10"}]
    drops, kept, entries = _run([base, near], meta=metas)
    assert list(drops) == [0] and drops[0]["dup_of"] == entries[1].id  # the newer dump wins
    drops, _, entries = _run([base, near], meta=[{"date": "2024-05-01"}, {"date": "2023-01-01"}])
    assert list(drops) == [1]
    drops, _, entries = _run([base, near])  # no recency: lowest id wins
    loser = max(range(2), key=lambda i: entries[i].id)
    assert list(drops) == [loser]


def test_code_is_compared_whitespace_insensitively():
    code = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" * 3
    variant = code.replace("    ", "\t") + "\n\n"
    drops, _, _ = _run([code, variant], meta=[{"lang": "code"}, {"lang": "code"}])
    assert [d["reason"] for d in drops.values()] == ["exact_duplicate"]


def test_signatures_are_datasketch_minhashes_of_the_shingle_hashes():
    text = S.zh_document(random.Random(6))
    hv = dedup.shingle_hashes(text, 5)
    ref = MinHash(num_perm=128, seed=1, scheme="affine32", hashfunc=int)
    ref.update_batch(hv.tolist())
    assert np.array_equal(dedup.Signer(CFG).signature(text), ref.hashvalues)
    # the hash set has exactly one entry per distinct shingle string
    assert len(hv) == len(dedup.shingles(text, 5))


def test_signature_jaccard_tracks_exact_jaccard():
    rng = random.Random(7)
    signer = dedup.Signer(CFG)
    for lang in ("zh", "en"):
        for base, near, below in _pairs(lang, 8)[:4]:
            for other in (near, below):
                exact = dedup.jaccard(base, other)
                est = signer.lean(signer.signature(base)).jaccard(signer.lean(signer.signature(other)))
                assert abs(est - exact) < 0.15, (lang, exact, est)
    sha = replace(CFG, hashfunc="sha1")
    t = S.en_document(rng)
    assert dedup.Signer(sha).signature(t).shape == (128,)


def test_documents_without_shingles_are_kept():
    drops, kept, entries = _run(["short", "short", S.en_document(random.Random(1))])
    assert drops == {1: {"reason": "exact_duplicate", "dup_of": entries[0].id, "dup_cluster_id": drops[1]["dup_cluster_id"],
                         "dup_cluster_size": 2}}
    assert entries[0].sig_row == -1


def test_bands_and_rows_are_explicit():
    assert dedup.s_curve(16, 8)["0.7"] == pytest.approx(1 - (1 - 0.7 ** 8) ** 16, abs=1e-4)
    with pytest.raises(Exception):
        DedupConfig(bands=16, rows=9)


# ---------------------------------------------------------------------------------------------------
# Redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (`make test` installs it: apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.terminate()
        pytest.fail("redis-server did not start")
    yield port, client
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_backend_matches_memory_and_cleans_up(redis_server):
    port, client = redis_server
    triples = _pairs("zh", 9)[:6] + _pairs("en", 10)[:6]
    texts = [t for triple in triples for t in triple]
    mem_drops, _, _ = _run(texts)
    cfg = replace(CFG, storage="redis", redis_host="127.0.0.1", redis_port=port)
    red_drops, _, _ = _run(texts, cfg)
    assert red_drops == mem_drops
    assert len(mem_drops) == len(triples)
    assert client.dbsize() == 0  # the index's keys are removed after the run


def test_pipeline_with_redis_storage(redis_server, tmp_path):
    import json

    from lm2cli.config import load_recipe
    from lm2cli.data.pipeline import iter_kept, run_prepare
    from lm2cli.layout import Workspace

    port, client = redis_server
    corpus = tmp_path / "in"
    corpus.mkdir()
    lines = [t for triple in _pairs("en", 11)[:5] for t in triple]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    redis_cfg = load_recipe("tiny", ["prepare.dedup.storage=redis", f"prepare.dedup.redis_port={port}",
                                     "prepare.dedup.redis_host=127.0.0.1"]).prepare
    stats = run_prepare([corpus], Workspace.at(tmp_path / "redis"), redis_cfg)
    mem = run_prepare([corpus], Workspace.at(tmp_path / "mem"), load_recipe("tiny").prepare)
    assert stats["dedup"]["storage"] == "redis"
    assert stats["stages"]["dedup"]["reasons"] == mem["stages"]["dedup"]["reasons"]
    assert stats["stages"]["dedup"]["reasons"].get("near_duplicate", 0) >= 3
    ids = lambda ws: sorted(r["id"] for r in iter_kept(tmp_path / ws / "data" / "prepared"))  # noqa: E731
    assert ids("redis") == ids("mem")
    assert client.dbsize() == 0


# ---------------------------------------------------------------------------------------------------
# Dedup on disk within a memory budget (storage "disk", the default) vs the in-memory index


def _phase_a_files(out: Path, tasks: list[list[tuple[str, dict]]], cfg: DedupConfig) -> None:
    """What phase A leaves for dedup: per task its keys, signatures and done marker."""
    import json

    work = out / ".work" / "a"
    work.mkdir(parents=True)
    signer = dedup.Signer(cfg)
    for t, docs in enumerate(tasks):
        sigs, lines = [], []
        for text, meta in docs:
            sig = signer.signature(text)
            row = -1
            if sig is not None:
                row = len(sigs)
                sigs.append(sig)
            key = [content_id(text), dedup.exact_key(text, meta.get("lang", "en")), dedup.recency_of(meta), row]
            lines.append(json.dumps({"k": key}) + "\n")
        np.save(work / f"sig-{t:05d}.npy", np.stack(sigs) if sigs else np.zeros((0, cfg.num_perm), np.uint32))
        (work / f"dedup-{t:05d}.jsonl").write_text("".join(lines))
        (work / f"done-{t:05d}.json").write_text(json.dumps({"passed": len(docs)}))


def _corpus(seed: int) -> list[tuple[str, dict]]:
    """Unique documents, exact copies, near copies, chains of near copies (a~b~c, a and c may be below the
    threshold), pairs below it, documents without shingles, and dumps/dates for the keep rule."""
    rng = random.Random(seed)
    docs = []
    for lang in ("zh", "en"):
        for base, near, below in _pairs(lang, seed):
            further, _ = make_corpus.near_copy(rng, near, lang, 0.75, 0.9)
            docs += [(base, {}), (near, {"cc_dump": rng.choice(["CC-MAIN-2021-04", "CC-MAIN-2024-10", ""])}),
                     (below, {}), (base, {"date": "2023-0%d-01" % rng.randint(1, 9)}), (further, {})]
        gen = S.zh_document if lang == "zh" else S.en_document
        docs += [(gen(rng), {}) for _ in range(150)]
    docs += [("short", {}), ("short", {}), ("tiny", {})]
    rng.shuffle(docs)
    return docs


def test_dedup_on_disk_within_a_small_budget_decides_like_the_in_memory_index(tmp_path):
    import json

    from lm2cli.config import PrepareConfig
    from lm2cli.data import pipeline
    from lm2cli.data.executors import LocalExecutor

    docs = _corpus(12)
    tasks = [docs[i::5] for i in range(5)]
    # ~420 signatures (~215 KB) against a 20 KB budget: dedup must split into several partitions
    budget = 0.02
    sig_bytes = sum(1 for d in docs if dedup.shingle_hashes(d[0]).size) * CFG.num_perm * 4
    assert sig_bytes > 5 * budget * 1e6
    mem_out, disk_out = tmp_path / "memory", tmp_path / "disk"
    _phase_a_files(mem_out, tasks, CFG)
    _phase_a_files(disk_out, tasks, CFG)
    mem = pipeline.run_phase_b(mem_out, len(tasks), PrepareConfig(dedup=replace(CFG, storage="memory")))
    rss: dict = {}
    disk = pipeline.run_phase_b_disk(disk_out, len(tasks), PrepareConfig(dedup=replace(CFG, memory_budget_mb=budget)),
                                     LocalExecutor(1), rss)
    assert disk["partitions"]["exact"] > 1 and disk["partitions"]["band"] > 1
    for t in range(len(tasks)):
        name = f"decisions-{t:05d}.json"
        assert json.loads((disk_out / ".work" / "b" / name).read_text()) == \
            json.loads((mem_out / ".work" / "b" / name).read_text()), t
    drop = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "partitions")}  # noqa: E731
    assert drop(disk) == drop(mem)
    assert mem["near_duplicate"] >= 24 and mem["exact_duplicate"] >= 25  # the corpus exercises both
    assert set(rss) == {"dedup.exact_shuffle", "dedup.exact_groups", "dedup.band_runs", "dedup.buckets",
                        "dedup.clusters"}


def test_dedup_on_disk_resumes_from_its_stage_markers(tmp_path):
    """A run killed between dedup stages redoes only the unmarked tasks and decides the same."""
    import json

    from lm2cli.config import PrepareConfig
    from lm2cli.data import pipeline
    from lm2cli.data.executors import LocalExecutor

    docs = _corpus(13)[:200]
    tasks = [docs[i::4] for i in range(4)]
    cfg = PrepareConfig(dedup=replace(CFG, memory_budget_mb=0.02))
    _phase_a_files(tmp_path, tasks, CFG)
    first = pipeline.run_phase_b_disk(tmp_path, len(tasks), cfg, LocalExecutor(1), {})
    b = tmp_path / ".work" / "b"
    decisions = {p.name: json.loads(p.read_text()) for p in b.glob("decisions-*.json")}
    # as if killed after the band runs of two tasks and some buckets: their outputs are gone
    for p in [*sorted(b.glob("bands/done-*"))[:2], *sorted(b.glob("edges/*.npy"))[::3], *b.glob("decisions-*")]:
        p.unlink()
    again = pipeline.run_phase_b_disk(tmp_path, len(tasks), cfg, LocalExecutor(1), {})
    assert {p.name: json.loads(p.read_text()) for p in b.glob("decisions-*.json")} == decisions
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
