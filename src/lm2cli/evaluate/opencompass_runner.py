"""`lm2 eval opencompass`: build an OpenCompass config for an lm2 checkpoint, run it offline, collect the summary.

Datasets (SPEC §9.1, P13):
- custom-format JSONL files (default: the bundled `examples/eval/*.jsonl`). A file whose first row has
  options `A`, `B`, … is multiple choice, scored by perplexity (lowest mean loss wins); any other is
  question answering, scored by generation and exact match of the first line. A `<file>.meta.json`
  beside a file overrides this, as OpenCompass itself reads it. Paths are made absolute (a relative
  path would be taken for a dataset id and downloaded) and every row is checked before OpenCompass runs;
- OpenCompass dataset configs by name (`gsm8k_gen`) or `.py` path, for data already on disk in
  OpenCompass's own layout under `eval.opencompass.data_root` ($COMPASS_DATA_CACHE); one whose files
  are not there is refused rather than downloaded.

Running (P18): OpenCompass writes `tmp/`, `outputs/` and caches into the current directory and
`~/.cache`, so it runs inside `eval/<run>/opencompass/` with `HF_HOME`, the tiktoken cache and
offline switches pointed there. `launcher=inprocess` runs partitioner → infer → eval → summarizer in
this process (OpenCompass's debug mode); `launcher=cli` runs its CLI on the same config file. Either
way the folder ends with `config.py`, `outputs/<time>/` (predictions, results, OpenCompass's own
summary), `summary.json`, `summary.md` and, last, `manifest.json`. OpenCompass is imported only here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from ..errors import InputError, Lm2Error
from .ppl import read_jsonl

MODEL_ABBR = "lm2"


def import_opencompass():
    """The opencompass package, or one clear line on how to get it. Import it with `offline_env` active:
    its dependencies read `HF_HOME` once, at import."""
    import importlib.util

    hint = "install the eval extra: pip install 'lm2[eval]'"
    if importlib.util.find_spec("opencompass") is None:
        raise InputError(f"OpenCompass is not installed; {hint}")
    try:
        import opencompass
        from opencompass.models.base import BaseModel  # noqa: F401  (the part lm2 subclasses)
    except ImportError as e:
        raise InputError(f"OpenCompass is installed but does not import ({e}); {hint}") from None
    return opencompass


def _logs_to_stderr() -> None:
    """OpenCompass's loggers write to stdout, which belongs to `--json` (console.py); move them to stderr."""
    import logging

    from opencompass.utils import get_logger

    loggers = [get_logger(), *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__):
                h.setStream(sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Datasets


def example_datasets() -> list[Path]:
    from ..config import examples_dir

    return sorted((examples_dir() / "eval").glob("*.jsonl"))


def _options(row: dict) -> list[str]:
    opts = []
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        if letter not in row:
            break
        opts.append(letter)
    return opts


def custom_dataset(path: Path) -> tuple[dict, int]:
    """Check a custom-format JSONL row by row; return (its declaration for OpenCompass, rows)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist")
    if path.suffix != ".jsonl":
        raise InputError(f"dataset {path}: lm2 reads custom datasets as .jsonl")
    rows = list(read_jsonl(path))
    if not rows:
        raise InputError(f"dataset {path} has no rows")
    meta_path = Path(str(path) + ".meta.json")
    meta = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{meta_path}: not valid JSON ({e.msg})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{meta_path}: expected a JSON object")
    _, first = rows[0]
    options = _options(first)
    data_type = meta.get("data_type", "mcq" if len(options) > 1 else "qa")
    keys = set(first)
    for n, row in rows:
        if set(row) != keys:
            raise InputError(f"{path}:{n}: columns {sorted(row)} differ from the first row's {sorted(keys)}")
        if "answer" not in row:
            raise InputError(f"{path}:{n}: row has no 'answer'")
        if data_type == "mcq":
            if "question" not in row and "template" not in meta:
                raise InputError(f"{path}:{n}: multiple-choice row has no 'question'")
            if str(row["answer"]) not in options:
                raise InputError(f"{path}:{n}: answer {row['answer']!r} is not one of the options {options}")
        elif "question" not in row and "template" not in meta:
            raise InputError(f"{path}:{n}: row has no 'question'")
    decl = {"path": str(path), "abbr": path.name.split(".")[0], "data_type": data_type}
    if "infer_method" not in meta:
        decl["infer_method"] = "ppl" if data_type == "mcq" else "gen"
    decl["_own_evaluator"] = "evaluator" not in meta and "evaluator_kwargs" not in meta
    return decl, len(rows)


def custom_dataset_config(decl: dict) -> dict:
    """OpenCompass's full dataset config for a checked declaration. Unless the file's meta names one,
    scoring is lm2's exact match (multiple choice: the letter; QA: the first line of the answer)."""
    from opencompass.datasets.custom import make_custom_dataset_config

    from .opencompass_model import ExactMatchEvaluator, first_line

    decl = dict(decl)
    if decl.pop("_own_evaluator"):
        decl["evaluator"] = ExactMatchEvaluator
        if decl["data_type"] == "qa":
            decl["evaluator_kwargs"] = {"pred_postprocessor": {"type": first_line}}
    return make_custom_dataset_config(decl)


def _oc_dirs() -> list[str]:
    root = Path(import_opencompass().__file__).parent / "configs"
    return [str(root / "datasets"), str(root / "dataset_collections")]


def named_datasets(name: str, data_root: str) -> list[dict]:
    """The `*_datasets` lists of an OpenCompass dataset config, each checked to be on disk."""
    from mmengine.config import Config
    from opencompass.utils.run import match_cfg_file

    if name.endswith(".py") and Path(name).is_file():
        files = [str(Path(name).resolve())]
    else:
        try:
            files = [f for _, f in match_cfg_file(_oc_dirs(), [name])]
        except ValueError:
            raise InputError(f"no OpenCompass dataset config named {name!r} (see opencompass/configs/datasets)") from None
    found = []
    for f in files:
        cfg = Config.fromfile(f)
        for key in cfg.keys():
            if key.endswith("_datasets"):
                found.extend(cfg[key])
    if not found:
        raise InputError(f"OpenCompass config {name!r} defines no *_datasets")
    for ds in found:
        _check_on_disk(name, ds, data_root)
    return found


def _check_on_disk(name: str, ds: dict, data_root: str) -> None:
    from opencompass.utils.datasets_info import DATASETS_MAPPING

    raw = ds.get("path")
    if not raw:
        return
    if os.path.isabs(raw):
        local = raw
    else:
        local = os.path.normpath(os.path.join(data_root, DATASETS_MAPPING.get(raw, {}).get("local") or raw))
    if not os.path.exists(local):
        raise InputError(f"dataset {ds.get('abbr', raw)} of {name!r} is not on disk at {local}; lm2 never "
                         "downloads: put it there in OpenCompass's layout or set eval.opencompass.data_root")


# ---------------------------------------------------------------------------------------------------
# Config


def model_config(checkpoint: Path, recipe, chat: bool) -> dict:
    import torch

    from .common import load_tokenizer
    from .opencompass_model import LM2Model, chatml_meta_template

    ev = recipe.eval
    cfg = dict(type=f"{LM2Model.__module__}.{LM2Model.__name__}", abbr=MODEL_ABBR, path=str(checkpoint),
               max_seq_len=ev.max_len, max_out_len=ev.opencompass.max_out_len, batch_size=ev.batch_size,
               dtype=ev.dtype, run_cfg=dict(num_gpus=1 if torch.cuda.is_available() else 0))
    if ev.rope_scaling:
        cfg["rope_scaling"] = dict(ev.rope_scaling)
    if chat:
        cfg["meta_template"] = chatml_meta_template(load_tokenizer(checkpoint))
    return cfg


def _stage(task: str, nproc: int = 1, **task_kw) -> dict:
    """One rank: OpenCompass's debug path (every task in this process, in order). `nproc` > 1: each
    dataset split into `nproc` parts (NumWorkerPartitioner) run by as many worker processes at once
    (LocalRunner, each with the model's `run_cfg.num_gpus` GPUs) — OpenCompass's own data parallelism."""
    if nproc == 1:
        partitioner = dict(type="opencompass.partitioners.NaivePartitioner")
    else:
        partitioner = dict(type="opencompass.partitioners.NumWorkerPartitioner", num_worker=nproc, min_task_size=1,
                           dataset_size_path=".cache/dataset_size.json")
    return dict(partitioner=partitioner,
                runner=dict(type="opencompass.runners.LocalRunner", max_num_workers=nproc, debug=nproc == 1,
                            task=dict(type=f"opencompass.tasks.{task}", **task_kw)))


def build_config(model: dict, datasets: list[dict], nproc: int = 1) -> dict:
    """Inference shards over `nproc` workers; scoring (cheap, on the gathered predictions) runs once."""
    return dict(models=[model], datasets=datasets, work_dir="outputs",
                infer=_stage("OpenICLInferTask", nproc), eval=_stage("OpenICLEvalTask", dump_details=True))


# ---------------------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def offline_env(folder: Path, data_root: str) -> Iterator[None]:
    """Caches inside `folder`, the Hugging Face stack offline, data under `data_root`; restored afterwards."""
    from ..tokenizer import ensure_cl100k_offline

    env = {
        "HF_HOME": str(folder / "cache" / "huggingface"),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TIKTOKEN_CACHE_DIR": str(folder / "cache" / "tiktoken"),
        "XDG_CACHE_HOME": str(folder / "cache"),  # yapf (through mmengine) and others write ~/.cache otherwise
        "COMPASS_DATA_CACHE": data_root,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ensure_cl100k_offline()  # OpenCompass asks tiktoken for cl100k by name (SPEC P7)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    """contextlib.chdir, which needs Python 3.11."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_inprocess(config_path: Path) -> Path:
    """OpenCompass's own pipeline (cli/main.py in debug mode) in this process; returns the work dir."""
    from mmengine.config import Config
    from opencompass.registry import PARTITIONERS, RUNNERS
    from opencompass.summarizers import DefaultSummarizer
    from opencompass.utils.run import try_fill_in_custom_cfgs

    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    cfg = try_fill_in_custom_cfgs(Config.fromfile(str(config_path), format_python_code=False))
    work = os.path.join(cfg.work_dir, stamp)
    cfg["work_dir"] = work
    os.makedirs(os.path.join(work, "configs"), exist_ok=True)
    dumped = os.path.join(work, "configs", f"{stamp}.py")
    cfg.dump(dumped)
    cfg = Config.fromfile(dumped, format_python_code=False)  # as the CLI does: types become importable names
    for stage, sub in (("infer", "predictions/"), ("eval", "results/")):
        cfg[stage].partitioner["out_dir"] = os.path.join(work, sub)
        tasks = PARTITIONERS.build(cfg[stage].partitioner)(cfg)
        for task in tasks:
            # The debug runner dumps each task's config to a file it never reads back in-process; mmengine
            # would format it with yapf first, which costs seconds per task (more than the inference).
            object.__setattr__(task, "_format_python_code", False)
        RUNNERS.build(cfg[stage].runner)(tasks)
    DefaultSummarizer(config=cfg).summarize(time_str=stamp)
    return Path(work).resolve()


def run_cli(config_path: Path, log_path: Path) -> Path:
    """`opencompass config.py --debug` in a subprocess (cwd and environment already set)."""
    before = set(Path("outputs").glob("*")) if Path("outputs").exists() else set()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "opencompass.cli.main", str(config_path), "-w", "outputs",
                               "--debug"], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise Lm2Error(f"opencompass exited with {proc.returncode}: {tail[0]} (full log: {log_path})")
    new = sorted(set(Path("outputs").glob("*")) - before)
    if not new:
        raise Lm2Error(f"opencompass wrote no outputs/ folder (log: {log_path})")
    return new[-1].resolve()


# ---------------------------------------------------------------------------------------------------
# Results


def collect(work: Path, datasets: list[dict], rows: dict) -> dict:
    """Scores per dataset from `results/<model>/<dataset>.json` (details dropped), in config order."""
    out = {}
    for ds in datasets:
        abbr = ds["abbr"]
        res_file = work / "results" / MODEL_ABBR / f"{abbr}.json"
        if not res_file.exists():
            raise Lm2Error(f"OpenCompass produced no result for {abbr} (expected {res_file})")
        res = json.loads(res_file.read_text())
        if "error" in res:
            raise Lm2Error(f"OpenCompass failed to score {abbr}: {res['error']}")
        metrics = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metric = "accuracy" if "accuracy" in metrics else next(iter(metrics), None)
        infer = ds.get("infer_cfg", {}).get("inferencer", {}).get("type", "")
        out[abbr] = {
            "metric": metric,
            "score": metrics.get(metric),
            "metrics": metrics,
            "mode": "ppl" if "PPL" in str(infer) else "gen",
            "n": rows.get(abbr) or len(res.get("details", [])),
            "path": ds.get("path"),
            "predictions": str(work / "predictions" / MODEL_ABBR / f"{abbr}.json"),
            "results": str(res_file),
        }
    return out


def summary_markdown(summary: dict) -> str:
    lines = [f"# OpenCompass — {summary['checkpoint']}", "",
             f"template: {summary['template']}, launcher: {summary['launcher']}, opencompass {summary['opencompass_version']}",
             "", "| dataset | mode | n | metric | score |", "|---|---|---:|---|---:|"]
    for abbr, d in summary["datasets"].items():
        score = "—" if d["score"] is None else f"{d['score']:.2f}"
        lines.append(f"| {abbr} | {d['mode']} | {d['n']} | {d['metric']} | {score} |")
    return "\n".join(lines) + "\n"


def print_table(summary: dict) -> None:
    from rich.table import Table

    from ..console import err

    table = Table(title=f"OpenCompass: {summary['checkpoint']} ({summary['template']} template)")
    for col in ("dataset", "mode", "n", "metric", "score"):
        table.add_column(col, justify="right" if col in ("n", "score") else "left")
    for abbr, d in summary["datasets"].items():
        table.add_row(abbr, d["mode"], str(d["n"]), str(d["metric"]),
                      "—" if d["score"] is None else f"{d['score']:.2f}")
    err.print(table)


# ---------------------------------------------------------------------------------------------------
# The command


def run_opencompass(ws, recipe, checkpoint: Path | None = None, *, run: str = "default",
                    datasets: Sequence[Path] | None = None, configs: Sequence[str] | None = None,
                    name: str = "opencompass", show: bool = True) -> Path:
    """Evaluate a checkpoint with OpenCompass into `eval/<run>/<name>/`; returns that folder."""
    from ..layout import write_manifest
    from .common import is_chat_checkpoint, resolve_checkpoint

    oc_cfg = recipe.eval.opencompass
    checkpoint = resolve_checkpoint(ws, run, checkpoint)
    files = [Path(p) for p in (datasets or oc_cfg.datasets)]
    configs = list(configs or oc_cfg.configs)
    if not files and not configs:
        files = example_datasets()
    checked = [custom_dataset(p) for p in files]
    rows = {decl["abbr"]: n for decl, n in checked}
    template = oc_cfg.template if oc_cfg.template != "auto" else ("chat" if is_chat_checkpoint(checkpoint) else "base")
    data_root = str(Path(oc_cfg.data_root or os.environ.get("COMPASS_DATA_CACHE", "") or ".").expanduser().resolve())
    out = ws.eval_dir(name, run)
    if out.exists():
        shutil.rmtree(out)  # a folder without manifest.json is unfinished work (layout.py)
    out.mkdir(parents=True)
    with offline_env(out, data_root):
        oc = import_opencompass()
        _logs_to_stderr()
        from mmengine.config import Config

        ds_cfgs = [custom_dataset_config(decl) for decl, _ in checked]
        for c in configs:
            ds_cfgs.extend(named_datasets(c, data_root))
        abbrs = [d["abbr"] for d in ds_cfgs]
        dupes = sorted({a for a in abbrs if abbrs.count(a) > 1})
        if dupes:
            raise InputError(f"two datasets share the name {dupes[0]!r} (OpenCompass keys results by file stem)")
        model = model_config(checkpoint, recipe, chat=template == "chat")
        config_path = out / "config.py"
        Config(build_config(model, ds_cfgs, oc_cfg.nproc), format_python_code=False).dump(str(config_path))
        # OpenCompass prints its tables on stdout, which belongs to `--json` (console.py).
        with _cwd(out), contextlib.redirect_stdout(sys.stderr):
            work = (run_inprocess(config_path) if oc_cfg.launcher == "inprocess"
                    else run_cli(config_path, out / "opencompass.log"))
    summary = {"checkpoint": str(checkpoint), "template": template, "launcher": oc_cfg.launcher,
               "dtype": recipe.eval.dtype, "workers": oc_cfg.nproc,
               "opencompass_version": getattr(oc, "__version__", "?"), "work_dir": str(work),
               "datasets": collect(work, ds_cfgs, rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    for leftover in ("tmp", "icl_inference_output"):  # empty folders OpenCompass's debug path leaves behind
        with contextlib.suppress(OSError):
            (out / leftover).rmdir()
    write_manifest(out, "eval-opencompass", config=oc_cfg, inputs=[checkpoint, *(Path(p) for p in files)],
                   stats={a: d["score"] for a, d in summary["datasets"].items()}, template=template)
    if show:
        print_table(summary)
    return out
