"""`lm2 prepare` on the bundled examples corpus: nothing lost, planted duplicates collapse, bad inputs kept
as rejects, classifiers trained and used, resume and --force (issue 3 "Must show")."""

import base64
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from lm2cli.config import examples_dir, load_recipe
from lm2cli.data import readers
from lm2cli.data.dedup import jaccard
from lm2cli.data.pipeline import STAGES, iter_kept, iter_rejected, run_prepare
from lm2cli.errors import InputError
from lm2cli.layout import Workspace, read_manifest
from lm2cli.quickstart import _prepare

pytestmark = pytest.mark.slow  # one full run of the examples corpus (~15 s CPU), shared by the module

CORPUS = examples_dir() / "corpus"
PLANTED = json.loads((examples_dir() / "planted.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ws = Workspace.at(tmp_path_factory.mktemp("examples") / "ws")
    recipe = load_recipe("tiny", ["prepare.workers=2"])
    _prepare(ws, recipe)  # the quickstart step: train the three classifiers, then prepare
    manifest = read_manifest(ws.prepared, kinds=["prepared"])
    return ws, recipe, manifest


def _outcomes(prepared: Path) -> dict:
    """doc_key -> "kept" or the stage that rejected it."""
    out = {}
    for rec in iter_kept(prepared):
        out[rec["meta"].get("doc_key")] = "kept"
    for rec in iter_rejected(prepared):
        out[rec["meta"].get("doc_key")] = rec["stage"]
    return out


def test_every_input_record_is_kept_or_rejected_exactly_once(run):
    ws, recipe, manifest = run
    stats = manifest["stats"]
    # Count the input independently of the pipeline: every record (or reject) a reader yields.
    n_input = sum(1 for f in readers.discover([CORPUS])
                  for _ in readers.read_unit(readers.Unit(str(f), f.stat().st_size), recipe.prepare.types, 16_000_000))
    kept = list(iter_kept(ws.prepared))
    rejected = list(iter_rejected(ws.prepared))
    assert stats["input_records"] == n_input == len(kept) + len(rejected)
    assert stats["kept_records"] == len(kept)
    prev_kept = None
    for stage in STAGES:
        st = stats["stages"][stage]
        assert st["in"] == st["kept"] + st["rejected"]
        assert sum(st["reasons"].values()) == st["rejected"]
        assert st["rejected"] == sum(1 for r in rejected if r["stage"] == stage)
        if prev_kept is not None:
            assert st["in"] == prev_kept
        prev_kept = st["kept"]
    assert all(r["reason"] and r["stage"] in STAGES for r in rejected)
    assert {r["lang"] for r in kept} == {"zh", "en", "code", "mixed"}
    assert set(kept[0]) == {"id", "text", "source", "content_type", "lang", "meta"}
    by_lang = stats["kept"]["by_lang"]
    assert sum(v["records"] for v in by_lang.values()) == len(kept)
    assert by_lang["zh"]["bytes"] == sum(len(r["text"].encode()) for r in kept if r["lang"] == "zh")
    assert stats["kept"]["by_type"]["paper"]["records"] > 0  # the tiny recipe maps */papers/* to paper


def _components(groups: list[dict]) -> list[tuple[set, list[dict]]]:
    """Planted duplicate groups that share a document form one cluster (a copy of a copy)."""
    comps: list[tuple[set, list[dict]]] = []
    for g in groups:
        keys = set(g["keys"])
        touching = [c for c in comps if c[0] & keys]
        merged = (keys.union(*(c[0] for c in touching)), [g] + [x for c in touching for x in c[1]])
        comps = [c for c in comps if c not in touching] + [merged]
    return comps


def test_planted_duplicates_collapse_to_the_newest_copy(run):
    ws, _, manifest = run
    where = _outcomes(ws.prepared)
    reached = {"kept", "dedup", "safety", "quality"}
    checked = Counter()
    for keys, groups in _components([g for g in PLANTED["groups"] if g["kind"] != "below"]):
        members = [k for k in keys if where.get(k) in reached]
        if len(members) < 2:
            continue
        survivors = [k for k in members if where[k] != "dedup"]
        assert len(survivors) == 1, groups
        if len(groups) == 1 and len(members) == len(keys):
            assert survivors[0] in groups[0]["newest"], groups
        for g in groups:
            checked[g["kind"]] += 1
    recs = {r["meta"].get("doc_key"): r for r in list(iter_kept(ws.prepared)) + list(iter_rejected(ws.prepared))}
    for g in PLANTED["groups"]:
        if g["kind"] == "below" and all(where.get(k) in reached for k in g["keys"]):
            a, b = (recs[k] for k in g["keys"])
            # Below the threshold neither may be dropped as a copy of the other (either may be a planted
            # exact/near source, and go as a copy of *that*).
            assert a["meta"]["lm2"].get("dup_of") != b["id"] and b["meta"]["lm2"].get("dup_of") != a["id"], g
            assert a["meta"]["lm2"].get("dup_cluster_id") in (None,) or (
                a["meta"]["lm2"].get("dup_cluster_id") != b["meta"]["lm2"].get("dup_cluster_id")), g
            checked["below"] += 1
    assert checked["exact"] >= 50 and checked["near"] >= 50 and checked["below"] >= 5, checked
    dedup = manifest["stats"]["dedup"]
    assert (dedup["bands"], dedup["rows"], dedup["num_perm"], dedup["scheme"]) == (16, 8, 128, "affine32")
    assert dedup["s_curve"]["0.8"] > 0.94


def _corpus_texts() -> dict:
    texts = {}
    for name in ("zh_web.jsonl.gz", "en_web.jsonl.gz"):
        with gzip.open(CORPUS / "web" / name, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                texts[r["doc_key"]] = r.get("text", r.get("content"))
    return texts


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_planted_pairs_have_the_measured_jaccard(lang):
    texts = _corpus_texts()
    groups = [g for g in PLANTED["groups"] if g["lang"] == lang]
    near = [g for g in groups if g["kind"] == "near"]
    below = [g for g in groups if g["kind"] == "below"]
    assert len(near) >= 20 and len(below) >= 5
    for g in near:
        j = jaccard(texts[g["keys"][0]], texts[g["keys"][1]])
        assert j >= 0.8 and abs(j - g["jaccard"]) < 1e-3
    for g in below:
        assert 0.25 <= jaccard(texts[g["keys"][0]], texts[g["keys"][1]]) <= 0.55


def test_bad_inputs_are_rejected_with_a_reason_and_raw_bytes(run):
    ws, _, manifest = run
    fmt = list(iter_rejected(ws.prepared, "format"))
    reasons = Counter(r["reason"] for r in fmt)
    for reason in ("invalid_json", "invalid_utf8", "missing_text", "not_an_object", "text_not_string", "empty_file",
                   "corrupt_compression", "unsupported_format"):
        assert reasons[reason] >= 1, reason
    latin = next(r for r in fmt if r["reason"] == "invalid_utf8" and r["source"].endswith("broken.jsonl:6"))
    raw = base64.b64decode(latin["meta"]["raw_b64"])
    assert "café".encode("latin-1") in raw and latin["meta"]["raw_size"] == len(raw)
    truncated = next(r for r in fmt if r["reason"] == "corrupt_compression")
    assert "truncated.jsonl.gz" in truncated["source"]


def test_safety_and_quality_catch_the_planted_content(run):
    ws, _, manifest = run
    where = _outcomes(ws.prepared)
    stages = manifest["stats"]["stages"]
    assert stages["safety"]["reasons"]["domain_blocklist"] == 50
    blocked = [k for k in where if k and (k.startswith("zh-unsafe") or k.startswith("en-unsafe"))]
    assert blocked and all(where[k] in ("safety", "rules") for k in blocked)
    ads = [k for k in where if k and k[3:].startswith("ad-")]
    assert sum(where[k] == "quality" for k in ads) / len(ads) >= 0.9
    assert manifest["stats"]["classifiers"]["ad"].endswith("ad.npz")
    # Classifiers trained on prose must not eat clean prose or code.
    assert stages["quality"]["rejected"] <= 0.05 * stages["quality"]["in"] + 80


def test_rerun_skips_finished_work_and_refuses_other_config(run):
    ws, recipe, _ = run
    again = run_prepare(None, ws, recipe.prepare)
    assert again.get("skipped") is True
    other = load_recipe("tiny", ["prepare.rules.zh.max_short_chars=300"]).prepare
    with pytest.raises(InputError, match="--force"):
        run_prepare(None, ws, other)
