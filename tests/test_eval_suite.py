"""`lm2 eval` with no subcommand: ppl + OpenCompass example tasks + a small needle grid into one report."""

import json

import pytest
from _eval_tiny import model, save_checkpoint, tokenizer
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.config import TokenizeConfig, load_recipe
from lm2cli.errors import InputError
from lm2cli.layout import Workspace, read_manifest


def _workspace(root, with_tokens=True):
    ws = Workspace.at(root / "ws")
    save_checkpoint(model(seed=7), ws.stage_dir("pretrain-stage1") / "final")
    if with_tokens:
        from lm2cli.tokens import tokenize_dir

        kept = ws.prepared / "kept"
        kept.mkdir(parents=True)
        rows = [{"id": f"d{i}", "text": f"Document {i}: the quick brown fox. 北京是中国的首都。", "source": "t",
                 "lang": ["en", "zh"][i % 2], "content_type": "web", "meta": {}} for i in range(12)]
        (kept / "part-00000.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tokenize_dir(ws.prepared, ws.tokens, tokenizer(), TokenizeConfig(val_fraction=0.5, workers=1), workers=1)
    return ws


@pytest.mark.slow
def test_default_suite_writes_one_report(tmp_path):
    ws = _workspace(tmp_path)
    res = CliRunner().invoke(app, ["eval", "--workdir", str(ws.root), "--json", "--set", "eval.max_len=128",
                                   "--set", "eval.opencompass.max_out_len=6", "--set", "eval.needle.lengths=[128,192]"])
    assert res.exit_code == 0, res.output
    out = ws.eval_dir("report")
    report = json.loads((out / "report.json").read_text())
    assert {k: p["status"] for k, p in report["parts"].items()} == {"ppl": "ok", "opencompass": "ok", "needle": "ok"}
    assert report["checkpoint"] == str(ws.stage_dir("pretrain-stage1") / "final")

    ppl = json.loads((ws.eval_dir("ppl") / "results.json").read_text())
    assert report["parts"]["ppl"]["all"] == ppl["all"] and set(ppl["split"]) == {"en.web", "zh.web"}
    oc = json.loads((ws.eval_dir("opencompass") / "summary.json").read_text())
    assert oc["template"] == "base"  # a pretraining checkpoint gets plain-text prompts
    assert set(oc["datasets"]) == {"en_mcq", "zh_mcq", "en_gen", "zh_gen"}  # the bundled examples
    assert {k: d["score"] for k, d in report["parts"]["opencompass"]["datasets"].items()} == \
        {k: d["score"] for k, d in oc["datasets"].items()}
    needle = json.loads((ws.eval_dir("needle-small") / "summary.json").read_text())
    assert needle["lengths"] == [128, 192] and needle["repeats"] == 2 and len(needle["depths"]) == 5
    assert report["parts"]["needle"]["mean"] == needle["mean"]

    assert report["plots"] == {"bpb": "bpb.png", "opencompass": "opencompass.png", "needle": "needle.png"}
    for png in report["plots"].values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for needle_text in ("## ppl", "## opencompass", "## needle", "![ppl](bpb.png)", "| en_mcq |"):
        assert needle_text in md
    manifest = read_manifest(out, kinds=("eval-report",))
    assert [i.get("kind") for i in manifest["inputs"]] == ["checkpoint", "eval-ppl", "eval-opencompass", "eval-needle"]
    assert json.loads(res.stdout)["out"] == str(out)


def test_suite_skips_what_cannot_run_and_fails_when_nothing_can(tmp_path):
    from lm2cli.evaluate.suite import run_suite

    ws = _workspace(tmp_path, with_tokens=False)
    with pytest.raises(InputError, match=r"no part of the eval suite could run: ppl: no validation data"):
        run_suite(ws, load_recipe("tiny", ["eval.suite=[ppl]"]))


def test_default_checkpoint_is_the_latest_generative_stage(tmp_path):
    from lm2cli.evaluate.common import is_chat_checkpoint, resolve_checkpoint

    ws = _workspace(tmp_path, with_tokens=False)
    assert resolve_checkpoint(ws, "default", None) == ws.stage_dir("pretrain-stage1") / "final"
    for stage in ("sft", "rlhf-reward"):
        save_checkpoint(model(), ws.stage_dir(stage) / "final")
    found = resolve_checkpoint(ws, "default", None)
    assert found == ws.stage_dir("sft") / "final"  # the reward model scores text; it is never the default
    assert is_chat_checkpoint(found) and not is_chat_checkpoint(ws.stage_dir("pretrain-stage1") / "final")
    with pytest.raises(InputError, match="no checkpoint given"):
        resolve_checkpoint(ws, "other-run", None)
