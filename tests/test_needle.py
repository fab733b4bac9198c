"""Needle in a haystack: sample construction, the CDME/NeedleBench scores, forced choice, the heatmap,
and `lm2 needle` end to end on an lm2 checkpoint and on its Llama export."""

import json

import pytest
import torch
from _eval_tiny import plain_tokenizer, spread_model
from typer.testing import CliRunner

from lm2cli.cli import app
from lm2cli.config import NeedleConfig
from lm2cli.convert import save_model
from lm2cli.evaluate import needle as N
from lm2cli.layout import Workspace, write_manifest
from lm2cli.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return plain_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return spread_model(tok.vocab_size, max_len=128)


# ---------------------------------------------------------------------------------------------------
# Samples


@pytest.mark.parametrize("depth", [0, 25, 50, 90, 100])
def test_passkey_needle_sits_at_the_requested_token_depth_in_a_prompt_of_the_requested_length(tok, depth):
    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    s = N.build_sample(task, hay, tok, tok, 300, depth, 0, buffer=8, bos_id=tok.bos_id)
    needle = tok.encode(task.needle.format(key=s.key))
    assert len(s.ids) == s.counted == 300 - 8
    assert s.ids[0] == tok.bos_id
    assert s.ids[s.needle_at:s.needle_at + len(needle)] == needle
    head = 1 + len(tok.encode(task.header))
    target = head + int(s.context * depth / 100)
    # Moved back exactly to the start of the word it would split: the token after the needle starts a
    # word and no token between it and the requested index does.
    shift = target - s.needle_at
    after = [tok.decode([t]) for t in s.ids[s.needle_at + len(needle):]]
    assert 0 <= shift <= 4
    assert after[0].startswith(" ") and not any(a.startswith(" ") for a in after[1:shift + 1])
    # Pieces join on word boundaries, so the ids are exactly what encoding the prompt text gives.
    text = tok.decode(s.ids[1:])
    assert tok.encode(text) == s.ids[1:]
    assert text.startswith("There is an important info") and text.endswith("What is the pass key? The pass key is")
    assert text.count(f"The pass key is {s.key}. Remember it. {s.key} is the pass key.") == 1


def test_en_needle_is_spliced_at_exactly_the_cdme_token_index(tok):
    task = N.TASKS["en"]
    hay = N.filler_haystack("en", n_docs=8)
    for depth in (0, 33, 100):
        s = N.build_sample(task, hay, tok, tok, 400, depth, 1, buffer=20, bos_id=tok.bos_id)
        assert len(s.ids) == 380
        assert s.needle_at == 1 + len(tok.encode(task.header)) + int(s.context * depth / 100)
        assert s.ids[s.needle_at:s.needle_at + s.needle_len] == tok.encode(task.needle.format(key=task.key))


def test_cl100k_counter_counts_the_prompt_in_cl100k_tokens(tok):
    cl = Tokenizer.default()
    task = N.TASKS["zh"]
    hay = N.filler_haystack("zh", n_docs=8)
    s = N.build_sample(task, hay, cl, tok, 500, 50, 0, buffer=0, bos_id=tok.bos_id)
    text = tok.decode(s.ids[1:])
    assert len(cl.encode(text)) in range(495, 501)  # decode/re-encode may merge a few tokens at the seams
    assert s.counted == 500
    assert "小明最喜欢的实习的地点就是上海人工智能实验室。" in text
    assert s.ids[1:] == tok.encode(text)


def test_samples_are_reproducible_and_repeats_differ(tok):
    task, hay = N.TASKS["passkey"], N.filler_haystack("passkey")
    a = N.build_sample(task, hay, tok, tok, 200, 40, 0, bos_id=tok.bos_id)
    b = N.build_sample(task, hay, tok, tok, 200, 40, 0, bos_id=tok.bos_id)
    c = N.build_sample(task, hay, tok, tok, 200, 40, 1, bos_id=tok.bos_id)
    assert a.ids == b.ids and a.key != c.key
    assert len(a.choices) == 5 and a.choices[0] == f" {a.key}." and len(set(a.choices)) == 5
    assert {len(x) for x in a.choices} == {len(a.choices[0])}  # distractors have as many digits as the key


def test_a_length_too_short_for_the_prompt_is_refused_by_name(tok):
    with pytest.raises(N.LengthTooShort, match="too short for the passkey needle"):
        N.build_sample(N.TASKS["passkey"], N.filler_haystack("passkey"), tok, tok, 40, 50, 0, bos_id=tok.bos_id)


def test_corpus_haystack_prefers_documents_in_the_needles_language(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"text": "An English document.", "lang": "en"}, {"text": "一篇中文文档。", "lang": "zh"},
        {"text": "another one", "lang": "en"}]) + "\nnot json\n")
    assert N.read_corpus([f], "zh") == ["一篇中文文档。"]
    assert N.read_corpus([f], "en") == ["An English document.", "another one"]


# ---------------------------------------------------------------------------------------------------
# Scores


def test_levenshtein_and_edit_score_match_hand_computed_values():
    assert N.levenshtein("kitten", "sitting") == 3
    assert N.levenshtein("", "abc") == 3
    assert N.edit_score("kitten", "sitting", trim=False) == pytest.approx(100 * (1 - 3 / 7))
    assert N.edit_score(" 1 2\n3 ", "123") == 100.0  # whitespace is stripped first
    assert N.edit_score("", "") == 100.0 and N.edit_score("", "abc") == 0.0
    # InternLM2's needle against the answer format the question asks for: one character (的) apart, of 23.
    needle = "\n小明最喜欢的实习的地点就是上海人工智能实验室。\n"
    assert N.edit_score("小明最喜欢的实习地点就是上海人工智能实验室。", needle) == pytest.approx(100 * (1 - 1 / 23))


def test_trim_cuts_trailing_chatter_at_the_references_last_character():
    # NeedleBench: keep <= 1.2x the reference, ending at its last character when found past 0.8x.
    assert N.trim_prediction("12345.Thepasskeyis", "12345") == "12345"
    assert N.edit_score("12345. The pass key is 12345.", "12345") == 100.0
    assert N.edit_score("12345. The pass key is 12345.", "12345", trim=False) == pytest.approx(100 * 5 / 24)  # 24 chars, 19 deleted
    assert N.trim_prediction("abc", "abcdefghij") == "abc"


def test_exact_match_compares_the_first_integer_as_a_string():
    assert N.exact_match("passkey", " 12345. Remember", "12345")
    assert not N.exact_match("passkey", " 012345.", "12345")
    assert not N.exact_match("passkey", " 123 45", "12345")
    assert not N.exact_match("passkey", " no digits", "12345")
    assert N.exact_match("zh", "小明最喜欢的实习地点就是上海 人工智能实验室。", "上海人工智能实验室")
    assert N.exact_match("en", "The best thing is EAT a sandwich and sit in Dolores Park on a sunny day",
                         N.TASKS["en"].key)


def test_forced_choice_logprobs_equal_one_sequence_at_a_time_scoring(model):
    prompt = [1, 40, 41, 42, 43, 44, 45]
    conts = [[50, 51, 52], [60], [70, 71, 72, 73, 74]]
    got = N.choice_logprobs(model, prompt, conts, pad_id=2)
    for c, value in zip(conts, got):
        ids = torch.tensor([prompt + c])
        with torch.no_grad():
            logp = model(ids)[0].log_softmax(-1)
        want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(c))
        assert value == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == 3


def test_grids_average_repeats_per_cell_in_percent():
    recs = [{"length": 100, "depth": 0, "exact": 1, "edit": 100.0, "choice": 1},
            {"length": 100, "depth": 0, "exact": 0, "edit": 50.0, "choice": 1},
            {"length": 200, "depth": 0, "exact": 0, "edit": 0.0, "choice": 0}]
    g = N.grids(recs, [100, 200], [0, 50])
    assert g["exact"] == [[50.0, 0.0], [None, None]]
    assert g["edit"] == [[75.0, 0.0], [None, None]]
    assert g["choice"] == [[100.0, 0.0], [None, None]]


def test_heatmap_uses_the_report_colours_and_opens_as_a_png(tmp_path):
    from matplotlib.colors import to_rgb
    from PIL import Image

    cmap = N.needle_cmap()
    for x, colour in zip((0.0, 0.5, 1.0), ("#F0496E", "#EBB839", "#0CD79F")):
        assert cmap(x)[:3] == pytest.approx(to_rgb(colour), abs=2 / 255)  # a 256-entry table
    path = N.plot_heatmap([[0.0, 100.0], [50.0, None]], [128, 256], [0, 100], tmp_path / "h.png", "t", trained_length=128)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 150


def test_config_rejects_bad_needle_settings():
    from lm2cli.config import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        NeedleConfig(mode="fr")
    with pytest.raises(ConfigError, match="depths"):
        NeedleConfig(depths=[0, 120])
    with pytest.raises(ConfigError, match="rope_scaling"):
        NeedleConfig(rope_scaling="ntk")


# ---------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tok, model):
    ws = Workspace(tmp_path_factory.mktemp("needle") / "ws")
    final = ws.stage_dir("pretrain-stage1") / "final"
    save_model(model, final, tokenizer=tok)
    write_manifest(final, "checkpoint", stats={})
    return ws


def _needle(ws, *args):
    res = CliRunner().invoke(app, ["needle", *args, "--workdir", str(ws.root), "--lengths", "144,192",
                                   "--depths", "0,100", "--repeats", "2", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_lm2_needle_on_a_checkpoint_writes_results_summary_and_heatmaps(workspace):
    from PIL import Image

    out = _needle(workspace)
    folder = workspace.eval_dir("needle-passkey")
    assert out["out"] == str(folder) and out["main_metric"] == "exact"
    records = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert all(r["prompt_tokens"] == r["length"] - 8 for r in records)
    for r in records:  # the record's scores follow from its own prediction and log-probs
        assert r["exact"] == int(N.exact_match("passkey", r["prediction"], r["key"]))
        assert r["choice"] == int(r["choice_logprobs"][0] > max(r["choice_logprobs"][1:]))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["lengths"] == [144, 192] and summary["depths"] == [0, 100]
    assert summary["model"]["trained_length"] == 128
    assert len(summary["grids"]["exact"]) == 2 and len(summary["grids"]["exact"][0]) == 2
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "eval-needle" and manifest["inputs"][0]["kind"] == "checkpoint"
    for name in ("heatmap.png", "heatmap-edit.png", "heatmap-choice.png"):
        with Image.open(folder / name) as im:
            assert im.format == "PNG"


def test_lm2_needle_on_the_llama_export_gives_the_same_answers(workspace):
    from lm2cli.convert import export_checkpoint

    final = workspace.stage_dir("pretrain-stage1") / "final"
    hf = export_checkpoint(final, workspace.root / "hf-llama", "llama")
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llama"
    _needle(workspace, str(hf), "--name", "needle-llama")
    mine = (workspace.eval_dir("needle-passkey") / "results.jsonl").read_text().splitlines()
    theirs = (workspace.eval_dir("needle-llama") / "results.jsonl").read_text().splitlines()
    for a, b in zip(map(json.loads, mine), map(json.loads, theirs)):
        assert a["prediction"] == b["prediction"] and a["key"] == b["key"]
        assert a["choice_logprobs"] == pytest.approx(b["choice_logprobs"], abs=1e-3)


def test_lm2_needle_rope_scaling_flag_reaches_the_model(workspace):
    out = _needle(workspace, "--rope-scaling", "dynamic", "--factor", "2")
    summary = json.loads((workspace.eval_dir("needle-passkey-dynamic2") / "summary.json").read_text())
    assert out["out"].endswith("needle-passkey-dynamic2")
    assert summary["model"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}


def test_lm2_needle_without_a_model_fails_with_one_line(tmp_path):
    res = CliRunner().invoke(app, ["needle", "--workdir", str(tmp_path / "empty")])
    assert res.exit_code != 0
    assert "no checkpoint given" in str(res.exception) or "no checkpoint given" in res.output
