"""lm2 eval opencompass: a real OpenCompass run (not mocked) on a tiny lm2 checkpoint, checked item by item
against lm2's own scoring of the same prompts; the CLI launcher; bad datasets and a missing extra."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _eval_tiny import memorise, model, save_checkpoint, tokenizer

from lm2cli.config import examples_dir, load_recipe
from lm2cli.layout import Workspace, read_manifest

EXAMPLES = examples_dir() / "eval"
MAX_OUT = 12


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _chat(user, assistant=None):
    """InternLM2's ChatML turn layout, written out by hand (SPEC §3.2)."""
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return text if assistant is None else text + f"{assistant}<|im_end|>\n"


def _mcq_human(r):
    return f"Question: {r['question']}\n" + "\n".join(f"{k}. {r[k]}" for k in "ABCD")


@pytest.fixture(scope="module")
def sft_workspace(tmp_path_factory):
    """An `sft/final` checkpoint that memorised half of each task, so scores are neither 0 nor 100."""
    tok = tokenizer()
    mcq, gen = _rows(EXAMPLES / "en_mcq.jsonl"), _rows(EXAMPLES / "zh_gen.jsonl")
    texts = [_chat(_mcq_human(r), f"Answer: {r['answer']}") for r in mcq[::2]]
    texts += [_chat(r["question"], r["answer"]) for r in gen[::2]]
    m = memorise(model(seed=5), [tok.encode(t, bos=True, allow_special=True) for t in texts], steps=100, lr=6e-3)
    ws = Workspace.at(tmp_path_factory.mktemp("oc") / "ws")
    save_checkpoint(m, ws.stage_dir("sft") / "final")
    return ws, m


@pytest.mark.slow
def test_opencompass_scores_equal_lm2s_own_scoring(sft_workspace):
    import torch

    from lm2cli.evaluate.opencompass_model import first_line
    from lm2cli.evaluate.opencompass_runner import run_opencompass
    from lm2cli.evaluate.ppl import token_nll
    from lm2cli.generate import generate

    ws, m = sft_workspace
    tok = tokenizer()
    recipe = load_recipe("tiny", [f"eval.opencompass.max_out_len={MAX_OUT}", "eval.batch_size=4"])
    out = run_opencompass(ws, recipe, datasets=[EXAMPLES / "en_mcq.jsonl", EXAMPLES / "zh_gen.jsonl"], show=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "chat"  # an sft checkpoint speaks ChatML
    assert summary["checkpoint"] == str(ws.stage_dir("sft") / "final")  # the run's latest, found by default
    work = Path(summary["work_dir"])

    # multiple choice: lowest mean token loss over the whole ChatML text, one sequence at a time
    mcq = _rows(EXAMPLES / "en_mcq.jsonl")
    oc_preds = json.loads((work / "predictions" / "lm2" / "en_mcq.json").read_text())
    right = 0
    for i, r in enumerate(mcq):
        losses = {}
        for label in "ABCD":
            ids = tok.encode(_chat(_mcq_human(r), f"Answer: {label}"), bos=True, allow_special=True)
            losses[label] = float(token_nll(m, [ids])[0].mean())
            assert oc_preds[str(i)][f"label: {label}"]["PPL"] == pytest.approx(losses[label], rel=1e-4)
        mine = min("ABCD", key=lambda k: losses[k])
        assert oc_preds[str(i)]["prediction"] == mine
        right += mine == r["answer"]
    mcq_score = summary["datasets"]["en_mcq"]["score"]
    assert mcq_score == pytest.approx(100 * right / len(mcq))
    assert 0 < mcq_score < 100 and summary["datasets"]["en_mcq"]["mode"] == "ppl"

    # generation: greedy continuation of the ChatML prompt, stopped at <|im_end|>, first line vs the answer
    gen = _rows(EXAMPLES / "zh_gen.jsonl")
    oc_preds = json.loads((work / "predictions" / "lm2" / "zh_gen.json").read_text())
    right = 0
    for i, r in enumerate(gen):
        prompt = _chat(r["question"])
        assert oc_preds[str(i)]["origin_prompt"] == prompt
        with torch.no_grad():
            ids = generate(m, [tok.encode(prompt, bos=True, allow_special=True)], MAX_OUT, stop_ids=tok.stop_ids)[0]
        text = tok.decode([t for t in ids if not tok.is_special(t)])
        assert oc_preds[str(i)]["prediction"] == text
        right += first_line(text) == r["answer"]
    gen_score = summary["datasets"]["zh_gen"]["score"]
    assert gen_score == pytest.approx(100 * right / len(gen))
    assert 0 < gen_score < 100 and summary["datasets"]["zh_gen"]["mode"] == "gen"

    manifest = read_manifest(out, kinds=("eval-opencompass",))
    assert manifest["stats"] == {"en_mcq": mcq_score, "zh_gen": gen_score}
    assert manifest["inputs"][0]["kind"] == "checkpoint"
    assert (out / "summary.md").read_text().count("|") > 10
    assert (out / "cache" / "huggingface").parent.exists()  # caches stayed inside the artefact
    assert not (out / "tmp").exists()


@pytest.mark.slow
def test_cli_launcher_and_base_template_match_inprocess(sft_workspace, tmp_path):
    from lm2cli.evaluate.opencompass_runner import run_opencompass

    ws, _ = sft_workspace
    small = tmp_path / "en_small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in _rows(EXAMPLES / "en_gen.jsonl")[:5]))
    scores = {}
    for launcher in ("inprocess", "cli"):
        recipe = load_recipe("tiny", ["eval.opencompass.template=base", f"eval.opencompass.launcher={launcher}",
                                      f"eval.opencompass.max_out_len={MAX_OUT}"])
        out = run_opencompass(ws, recipe, datasets=[small], name=f"oc-{launcher}", show=False)
        summary = json.loads((out / "summary.json").read_text())
        preds = json.loads((Path(summary["work_dir"]) / "predictions" / "lm2" / "en_small.json").read_text())
        scores[launcher] = (summary["datasets"]["en_small"]["score"], [p["prediction"] for p in preds.values()])
        assert summary["template"] == "base" and summary["launcher"] == launcher
        assert preds["0"]["origin_prompt"] == _rows(small)[0]["question"]  # base template: the raw question
    assert scores["cli"] == scores["inprocess"]
    assert (ws.eval_dir("oc-cli") / "opencompass.log").exists()


@pytest.mark.slow
def test_named_opencompass_config_reads_local_data_and_never_downloads(tmp_path):
    from lm2cli.errors import InputError
    from lm2cli.evaluate.opencompass_runner import run_opencompass

    ws = Workspace.at(tmp_path / "ws")
    ckpt = save_checkpoint(model(), tmp_path / "ckpt")
    recipe = load_recipe("tiny", [f"eval.opencompass.data_root={tmp_path / 'oc'}", "eval.opencompass.max_out_len=4"])
    with pytest.raises(InputError, match=r"gsm8k .* is not on disk at .*/oc/data/gsm8k; lm2 never downloads"):
        run_opencompass(ws, recipe, ckpt, configs=["gsm8k_gen_1d7fe4"], show=False)
    data = tmp_path / "oc" / "data" / "gsm8k"  # OpenCompass's own layout for its dataset id opencompass/gsm8k
    data.mkdir(parents=True)
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in ((3, 4), (10, 2), (5, 5))]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_opencompass(ws, recipe, ckpt, configs=["gsm8k_gen_1d7fe4"], show=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"]["gsm8k"]["n"] == 3 and summary["datasets"]["gsm8k"]["metric"] == "accuracy"
    preds = json.loads((Path(summary["work_dir"]) / "predictions" / "lm2" / "gsm8k.json").read_text())
    assert "Tom has 3 apples" in preds["0"]["origin_prompt"]


def test_lm2model_contract(tmp_path):
    """OpenCompass's BaseModel contract (SPEC §9.1) on a random checkpoint, against direct computation."""
    import numpy as np

    from lm2cli.evaluate.opencompass_model import LM2Model
    from lm2cli.evaluate.ppl import token_nll

    tok = tokenizer()
    ckpt = save_checkpoint(model(seed=4, max_len=64), tmp_path / "ckpt")
    m = LM2Model(str(ckpt), max_seq_len=48, some_future_option=1)  # unknown kwargs are accepted
    text = "Question: what is 1 + 1?\nAnswer: 2"
    ids = tok.encode(text, bos=True)
    assert m.get_token_len(text) == len(ids) and m.encode(text).tolist() == [ids]
    assert m.decode(m.encode(text)) == text

    row = token_nll(m.model, [ids])[0]
    context = "Question: what is 1 + 1?\nAnswer:"
    k = m.get_token_len(context)
    assert ids[:k] == tok.encode(context, bos=True)  # the context's tokens are a prefix here
    ppl = m.get_ppl([text, text], mask_length=[0, k])
    assert ppl[0] == pytest.approx(row.mean()) and ppl[1] == pytest.approx(row[k - 1:].mean())
    assert m.get_loglikelihood([text], [" 2"])[0] == pytest.approx(-row[k - 1:].mean())

    long = "word " * 200  # longer than max_seq_len: cut after <s>, the mask shifts with the cut
    assert np.isfinite(m.get_ppl([long])[0])
    out = m.generate([text, long], max_out_len=6)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    if len(out[0]) > 2:
        stop = out[0][1:3]
        assert m.generate([text], max_out_len=6, stopping_criteria=[stop])[0] == out[0].split(stop)[0]

    ntk = LM2Model(str(ckpt), max_seq_len=512, rope_scaling={"type": "dynamic", "factor": 2.0})
    plain = LM2Model(str(ckpt), max_seq_len=512)
    assert ntk.model.config.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert ntk.get_ppl([text])[0] == pytest.approx(plain.get_ppl([text])[0], rel=1e-6)  # within trained length
    assert ntk.get_ppl([long])[0] != pytest.approx(plain.get_ppl([long])[0], rel=1e-6)  # beyond it: new base
    assert LM2Model(str(ckpt), tokenizer_only=True).model is None


def _lm2(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lm2cli.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _one_line(p):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_malformed_dataset_and_missing_extra_exit_2(tmp_path):
    ckpt = save_checkpoint(model(), tmp_path / "ckpt")
    ws = str(tmp_path / "ws")
    bad = tmp_path / "bad_mcq.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "A": "2", "B": "3", "answer": "A"}) + "\n"
                   + json.dumps({"question": "2+2?", "A": "4", "B": "5", "answer": "E"}) + "\n")
    line = _one_line(_lm2("eval", "opencompass", str(ckpt), "--dataset", str(bad), "--workdir", ws))
    assert "bad_mcq.jsonl:2" in line and "'E' is not one of the options" in line

    # a broken or absent install: `import opencompass` fails
    shim = tmp_path / "shim" / "opencompass"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'mmengine'\")\n")
    line = _one_line(_lm2("eval", "opencompass", str(ckpt), "--workdir", ws,
                          env={"PYTHONPATH": f"{shim.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}))
    assert "OpenCompass" in line and "pip install 'lm2[eval]'" in line


def test_custom_dataset_checks(tmp_path):
    from lm2cli.errors import InputError
    from lm2cli.evaluate.opencompass_runner import custom_dataset

    for name in ("en_mcq", "zh_mcq", "en_gen", "zh_gen"):  # the shipped examples are well formed
        decl, n = custom_dataset(EXAMPLES / f"{name}.jsonl")
        assert decl["path"] == str((EXAMPLES / f"{name}.jsonl").resolve()) and n >= 20
        assert (decl["data_type"], decl["infer_method"]) == (("mcq", "ppl") if "mcq" in name else ("qa", "gen"))
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text('{"question": "a", "answer": "b"}\n{"question": "c", "answer": "d", "extra": 1}\n')
    with pytest.raises(InputError, match=r"ragged.jsonl:2: columns"):
        custom_dataset(ragged)
    with pytest.raises(InputError, match="does not exist"):
        custom_dataset(tmp_path / "missing.jsonl")
