"""lm2 eval ppl: bits per byte against transformers on the Llama export, the breakdown's sums, the token
cap, the validation split of data/tokens, the contamination check, and bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch
from _eval_tiny import memorise, model, save_checkpoint, tokenizer

from lm2cli.config import load_recipe
from lm2cli.errors import InputError
from lm2cli.layout import Workspace, read_manifest

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 9, "lang": "en", "content_type": "book"},
    {"text": "Hello world, this is a short web page.", "lang": "en", "content_type": "web"},
    {"text": "北京是中国的首都。今天天气很好，我们去公园散步。", "lang": "zh", "content_type": "web"},
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n", "lang": "code", "content_type": "code"},
    {"text": "二加三等于五。 Mixed text: 苹果 and apples, 12345 emoji 🙂.", "lang": "zh", "content_type": "web"},
]
MAX_LEN = 32  # the first document needs several windows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    ckpt = save_checkpoint(model(seed=1), root / "ckpt")
    data = _jsonl(root / "docs.jsonl", DOCS)
    from lm2cli.evaluate.ppl import run_ppl

    recipe = load_recipe("tiny", [f"eval.max_len={MAX_LEN}", "eval.batch_size=3"])
    out = run_ppl(Workspace.at(root / "ws"), recipe, ckpt, data=[data], show=False)
    return ckpt, out, json.loads((out / "results.json").read_text())


def _hf_nll(hf, ids, bos):
    """Independent scoring: the same rolling windows, transformers' Llama, plain cross-entropy in float64."""
    total = 0.0
    for a in range(0, len(ids), MAX_LEN - 1):
        window = ([bos] if a == 0 else [ids[a - 1]]) + ids[a:a + MAX_LEN - 1]
        x = torch.tensor([window])
        with torch.no_grad():
            logits = hf(input_ids=x).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    return total


def test_bits_per_byte_matches_transformers_llama_export(scored, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lm2cli.convert import export_checkpoint

    ckpt, _, res = scored
    hf_dir = export_checkpoint(ckpt, tmp_path / "llama", fmt="llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    tok = tokenizer()
    by_lang: dict[str, list[float]] = {}
    for d in DOCS:
        ids = tok.encode(d["text"])
        acc = by_lang.setdefault(d["lang"], [0.0, 0])
        acc[0] += _hf_nll(hf, ids, tok.bos_id)
        acc[1] += len(d["text"].encode("utf-8"))
    nll_all, bytes_all = sum(v[0] for v in by_lang.values()), sum(v[1] for v in by_lang.values())
    assert res["all"]["bytes"] == bytes_all
    assert res["all"]["bpb"] == pytest.approx(nll_all / (math.log(2) * bytes_all), rel=1e-4)
    for lang, (nll, nbytes) in by_lang.items():
        assert res["lang"][lang]["bytes"] == nbytes
        assert res["lang"][lang]["bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-4)


def test_breakdown_groups_sum_to_the_total(scored):
    _, out, res = scored
    tok = tokenizer()
    assert res["all"]["tokens"] == sum(len(tok.encode(d["text"])) for d in DOCS)
    assert res["all"]["docs"] == len(DOCS)
    for group in ("lang", "content_type", "split"):
        for key in ("docs", "tokens", "bytes"):
            assert sum(s[key] for s in res[group].values()) == res["all"][key]
        assert sum(s["nll"] for s in res[group].values()) == pytest.approx(res["all"]["nll"], rel=1e-12)
        # the overall loss is the token-weighted mean of the groups' losses, bpb the byte-weighted one
        assert sum(s["loss"] * s["tokens"] for s in res[group].values()) / res["all"]["tokens"] == \
            pytest.approx(res["all"]["loss"], rel=1e-12)
        assert sum(s["bpb"] * s["bytes"] for s in res[group].values()) / res["all"]["bytes"] == \
            pytest.approx(res["all"]["bpb"], rel=1e-12)
    assert set(res["split"]) == {"en.book", "en.web", "zh.web", "code.code"}
    zh = res["lang"]["zh"]
    assert zh["tokens"] == res["split"]["zh.web"]["tokens"] and zh["docs"] == 2
    for s in [res["all"], *res["split"].values()]:
        assert s["loss"] == pytest.approx(s["nll"] / s["tokens"])
        assert s["ppl"] == pytest.approx(math.exp(s["loss"]))
        assert s["bpb"] == pytest.approx(s["nll"] / (math.log(2) * s["bytes"]))
    manifest = read_manifest(out, kinds=("eval-ppl",))
    assert manifest["stats"]["bpb"] == res["all"]["bpb"]
    assert manifest["inputs"][0]["kind"] == "checkpoint"


def test_token_cap_cuts_each_split(tmp_path):
    from lm2cli.evaluate.ppl import jsonl_docs

    tok = tokenizer()
    data = _jsonl(tmp_path / "d.jsonl", DOCS)
    docs = jsonl_docs([data], tok, max_tokens=20)
    per_split: dict[str, int] = {}
    for d in docs:
        per_split[d.split] = per_split.get(d.split, 0) + len(d.ids)
        assert d.n_bytes == len(tok.decode_bytes(d.ids))
    full = {}
    for d in DOCS:
        key = f"{d['lang']}.{d['content_type']}"
        full[key] = full.get(key, 0) + len(tok.encode(d["text"]))
    assert per_split == {k: min(v, 20) for k, v in full.items()}


def test_validation_split_of_data_tokens_is_the_default_source(tmp_path):
    from lm2cli.config import TokenizeConfig
    from lm2cli.evaluate.ppl import run_ppl
    from lm2cli.tokens import TokenStore, tokenize_dir

    tok = tokenizer()
    ws = Workspace.at(tmp_path / "ws")
    kept = ws.prepared / "kept"
    kept.mkdir(parents=True)
    rows = [{"id": f"d{i}", "source": "t", "meta": {}, **d} for i, d in enumerate(DOCS * 4)]
    rows = [{**r, "text": f"{r['text']} #{i}"} for i, r in enumerate(rows)]
    _jsonl(kept / "part-00000.jsonl", rows)
    tokenize_dir(ws.prepared, ws.tokens, tok, TokenizeConfig(val_fraction=0.5, workers=1), workers=1)
    val = TokenStore(ws.tokens).splits("val")
    expect_tokens = sum(split.num_tokens - 2 * split.num_docs for split in val.values())  # minus <s> and </s>
    assert expect_tokens > 0
    recipe = load_recipe("tiny", ["eval.max_len=4096", "eval.ppl_max_tokens=0"])
    out = run_ppl(ws, recipe, save_checkpoint(model(seed=2, max_len=128), tmp_path / "ckpt"), show=False)
    res = json.loads((out / "results.json").read_text())
    assert res["source"] == "tokens-val"
    assert res["window"] == 128  # never longer than the model's trained length
    assert res["all"]["tokens"] == expect_tokens
    assert res["all"]["docs"] == sum(s.num_docs for s in val.values())
    assert {k: v["tokens"] for k, v in res["split"].items()} == \
        {k: s.num_tokens - 2 * s.num_docs for k, s in val.items() if s.num_docs}


def _qa(a, b):
    return {"question": f"What is {a} plus {b}?", "answer": f"{a} plus {b} makes {a + b}."}


def test_contamination_flags_a_memorised_test_split(tmp_path):
    from lm2cli.evaluate.ppl import contamination

    tok = tokenizer()
    train = [_qa(a, b) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 5)]]
    test = [_qa(a, b) for a, b in [(4, 4), (6, 3), (8, 2), (3, 9), (5, 5), (7, 1)]]
    ref = [_qa(a, b) for a, b in [(2, 2), (6, 6), (1, 8), (9, 3), (4, 7), (8, 8)]]
    files = [_jsonl(tmp_path / f"{n}.jsonl", rows) for n, rows in (("train", train), ("test", test), ("ref", ref))]
    texts = {n: [f"{r['question']}\n{r['answer']}" for r in rows] for n, rows in
             (("train", train), ("test", test), ("ref", ref))}
    leaked = memorise(model(seed=3), [tok.encode(t, bos=True) for t in texts["test"]], steps=120)
    res = contamination(leaked, tok, *files, max_len=64, batch_size=4)

    def mean_loss(rows):  # per-sample mean token loss, one plain forward per sample
        losses = []
        for t in rows:
            x = torch.tensor([tok.encode(t, bos=True)])
            with torch.no_grad():
                logits = leaked(x)[0, :-1].double()
            losses.append(torch.nn.functional.cross_entropy(logits, x[0, 1:]).item())
        return sum(losses) / len(losses)

    expect = {n: mean_loss(t) for n, t in texts.items()}
    assert res["L_train"] == pytest.approx(expect["train"], rel=1e-5)
    assert res["L_test"] == pytest.approx(expect["test"], rel=1e-5)
    assert res["L_ref"] == pytest.approx(expect["ref"], rel=1e-5)
    assert res["delta1"] == pytest.approx(expect["test"] - expect["ref"], rel=1e-5)
    assert res["delta2"] == pytest.approx(expect["test"] - expect["train"], rel=1e-5)
    assert res["delta1"] < -0.5 and res["delta2"] < -0.5  # the leaked test split is far easier than its look-alikes
    assert res["samples"] == {"train": 6, "test": 6, "ref": 6}


def test_malformed_data_names_file_and_line(tmp_path):
    from lm2cli.evaluate.ppl import jsonl_docs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_docs([bad], tokenizer())
    notext = _jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(InputError, match=r"notext.jsonl:2: record has no string 'text'"):
        jsonl_docs([notext], tokenizer())


def _lm2(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lm2cli.cli", *args], capture_output=True, text=True, env=env)


def _one_line(p):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_cli_missing_checkpoint_and_malformed_data_exit_2(tmp_path):
    line = _one_line(_lm2("eval", "ppl", "--workdir", str(tmp_path / "ws")))
    assert "no checkpoint given" in line and "runs/default" in line
    ckpt = save_checkpoint(model(), tmp_path / "ckpt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    line = _one_line(_lm2("eval", "ppl", str(ckpt), "--data", str(bad), "--workdir", str(tmp_path / "ws")))
    assert "bad.jsonl:1: not valid JSON" in line
