"""`lm2 prepare`: the InternLM2 data pipeline, streaming, parallel, resumable, nothing lost (SPEC §4).

Stages: format (read + standardize) → classify → rules → dedup → safety → quality. The work is cut
into tasks (runs of input files, or byte ranges of big JSONL files, about `task_mb` each):

  phase A, per task, in parallel:  format, classify, rules, MinHash signature
  phase B, dedup over every task's signatures: by default as parallel stages over files, each task
           within `dedup.memory_budget_mb` (dedup.py: exact shuffle/groups, band runs, band buckets,
           clusters); with `dedup.storage` memory or redis, one datasketch LSH index in this process
  phase C, per task, in parallel:  apply dedup decisions, safety, quality → kept/part-XXXXX.jsonl

Tasks run on an executor (executors.py): a local process pool or a Ray cluster (`--engine ray`); both
run the same task functions, so the artefact is the same.

Layout of `<workdir>/data/prepared/`:
  kept/part-XXXXX.jsonl                one record per line: {"id","text","source","content_type","lang","meta"}
  rejected/<stage>/part-XXXXX.jsonl    the same plus "stage" and "reason" (format rejects carry raw bytes)
  manifest.json                        kind "prepared": config, dedup scheme, per-stage stats
  .work/                               resumable state; removed once the manifest is written

Every (phase, task) writes its files under temporary names and a completion marker last; a re-run skips
marked work (`--force` redoes everything) and refuses to resume if the config, the inputs or the
MinHash scheme changed. `--shard i/N` runs phase A (and phase C once dedup exists) for tasks
t ≡ i (mod N) only, so a scheduler can fan the per-document stages out; a run without --shard then
does whatever is left, dedups and writes the manifest. Stats obey input = kept + Σ rejected, per stage.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ..config import PrepareConfig, to_dict
from ..errors import InputError, Lm2Error
from ..layout import MANIFEST, Workspace, artefact_lock, atomic_write_text, write_manifest
from . import classify as classify_mod
from . import dedup as dedup_mod
from . import readers, rules
from .executors import make_executor, peak_rss_mb
from .quality import Quality, resolve_model
from .safety import Safety
from .standardize import content_id, standardize

STAGES = ("format", "classify", "rules", "dedup", "safety", "quality")
PHASE_A = ("format", "classify", "rules")
PHASE_C = ("dedup", "safety", "quality")
PLAN_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Stats


def _new_stage() -> dict:
    return {"in": 0, "kept": 0, "rejected": 0, "reasons": {}, "by_lang": {}, "by_type": {}}


def _bump(bucket: dict, key: str, field: str, nbytes: int) -> None:
    b = bucket.setdefault(key or "unknown", {"kept": 0, "kept_bytes": 0, "rejected": 0, "rejected_bytes": 0})
    b[field] += 1
    b[field + "_bytes"] += nbytes


def _count(stage: dict, rec: dict, reason: Optional[str]) -> None:
    nbytes = len(rec.get("text", "").encode("utf-8"))
    field = "rejected" if reason else "kept"
    stage[field] += 1
    stage["in"] += 1
    if reason:
        stage["reasons"][reason] = stage["reasons"].get(reason, 0) + 1
    _bump(stage["by_lang"], rec.get("lang", ""), field, nbytes)
    _bump(stage["by_type"], rec.get("content_type", ""), field, nbytes)


def merge_stats(into: dict, other: dict) -> dict:
    for name, st in other.items():
        dst = into.setdefault(name, _new_stage())
        for k in ("in", "kept", "rejected"):
            dst[k] += st[k]
        for r, n in st["reasons"].items():
            dst["reasons"][r] = dst["reasons"].get(r, 0) + n
        for group in ("by_lang", "by_type"):
            for key, vals in st[group].items():
                b = dst[group].setdefault(key, {"kept": 0, "kept_bytes": 0, "rejected": 0, "rejected_bytes": 0})
                for f, v in vals.items():
                    b[f] += v
    return into


# ---------------------------------------------------------------------------------------------------
# Output writers: files appear under their final names only when the task completes.


class _Writers:
    def __init__(self, out: Path, task: int):
        self.out, self.task = out, task
        self.files: dict[Path, object] = {}

    def write(self, rel: str, obj: dict) -> None:
        path = self.out / rel
        fh = self.files.get(path)
        if fh is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self._tmp(path), "w", encoding="utf-8")
            self.files[path] = fh
        fh.write(json.dumps(obj, ensure_ascii=False) + "\n")

    @staticmethod
    def _tmp(path: Path) -> Path:
        # One name per process: a task run twice at once (a Ray retry while a lost worker still runs, a
        # resumed driver) must not write into the other copy's file; both produce the same content.
        return path.with_name(f"{path.name}.{os.getpid()}.tmp")

    def commit(self) -> None:
        for path, fh in self.files.items():
            fh.close()
            os.replace(self._tmp(path), path)

    def abort(self) -> None:
        for path, fh in self.files.items():
            fh.close()
            self._tmp(path).unlink(missing_ok=True)


def part(task: int) -> str:
    return f"part-{task:05d}.jsonl"


def _rejected(rec: dict, stage: str, reason: str) -> dict:
    return {**rec, "stage": stage, "reason": reason}


def _format_reject(item: dict) -> dict:
    raw_b64 = item.get("raw_b64")
    ident = content_id(item["source"] + "\0" + (raw_b64 or item["error"]))
    meta = {k: item[k] for k in ("error", "raw_b64", "raw_size", "raw_sha256") if k in item}
    return {"id": ident, "text": "", "source": item["source"], "content_type": "", "lang": "", "meta": meta}


# ---------------------------------------------------------------------------------------------------
# Phase A: format, classify, rules, signatures (one task)


def run_phase_a(task: int, units: list[readers.Unit], cfg: PrepareConfig, out: Path) -> dict:
    work = out / ".work" / "a"
    stats = {s: _new_stage() for s in PHASE_A}
    w = _Writers(out, task)
    signer = dedup_mod.Signer(cfg.dedup)
    sigs: list[np.ndarray] = []
    n_pass = 0
    try:
        for unit in units:
            for item in readers.read_unit(unit, cfg.types, int(cfg.max_record_mb * 1e6)):
                if "reject" in item:
                    rec = _format_reject(item)
                    _count(stats["format"], rec, item["reject"])
                    w.write(f"rejected/format/{part(task)}", _rejected(rec, "format", item["reject"]))
                    continue
                rec = standardize(item)
                if not rec["text"]:
                    _count(stats["format"], rec, "empty_text")
                    w.write(f"rejected/format/{part(task)}", _rejected(rec, "format", "empty_text"))
                    continue
                _count(stats["format"], rec, None)
                info = classify_mod.classify(rec["text"], rec["content_type"])
                rec["lang"] = info.pop("lang")
                rec["meta"]["lm2"].update(info)
                if rec["lang"] not in cfg.languages:
                    _count(stats["classify"], rec, "lang_not_selected")
                    w.write(f"rejected/classify/{part(task)}", _rejected(rec, "classify", "lang_not_selected"))
                    continue
                _count(stats["classify"], rec, None)
                reason = rules.check(rec, cfg.rules)
                if reason:
                    _count(stats["rules"], rec, reason)
                    w.write(f"rejected/rules/{part(task)}", _rejected(rec, "rules", reason))
                    continue
                _count(stats["rules"], rec, None)
                sig = signer.signature(rec["text"])
                row = -1
                if sig is not None:
                    row = len(sigs)
                    sigs.append(sig)
                w.write(f".work/a/{part(task)}", rec)
                key = [rec["id"], dedup_mod.exact_key(rec["text"], rec["lang"]),
                       dedup_mod.recency_of(rec["meta"]), row]
                w.write(f".work/a/dedup-{task:05d}.jsonl", {"k": key})
                n_pass += 1
        arr = np.stack(sigs) if sigs else np.zeros((0, cfg.dedup.num_perm), dtype=signer.dtype)
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / f"sig-{task:05d}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        w.commit()
        os.replace(tmp, work / f"sig-{task:05d}.npy")
    except BaseException:
        w.abort()
        raise
    result = {"task": task, "stats": stats, "passed": n_pass, "rss_mb": peak_rss_mb()}
    atomic_write_text(work / f"done-{task:05d}.json", json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------------
# Phase B: dedup (global)


def run_phase_b(out: Path, n_tasks: int, cfg: PrepareConfig, progress: Optional[Callable] = None) -> dict:
    work = out / ".work"
    entries: list[dedup_mod.Entry] = []
    sig_blocks = []
    offsets = []
    row_base = 0
    for t in range(n_tasks):
        offsets.append(len(entries))
        sig = np.load(work / "a" / f"sig-{t:05d}.npy")
        sig_blocks.append(sig)
        keys_path = work / "a" / f"dedup-{t:05d}.jsonl"
        if keys_path.exists():
            with open(keys_path, encoding="utf-8") as f:
                for line in f:
                    ident, exact, recency, row = json.loads(line)["k"]
                    entries.append(dedup_mod.Entry(len(entries), ident, exact, recency,
                                                   row + row_base if row >= 0 else -1))
        row_base += len(sig)
    sigs = np.concatenate(sig_blocks) if sig_blocks else np.zeros((0, cfg.dedup.num_perm))
    t0 = time.perf_counter()
    drops, kept_info = dedup_mod.find_duplicates(entries, sigs, cfg.dedup, progress=progress)
    per_task: dict[int, dict] = {t: {"drops": {}, "kept": {}} for t in range(n_tasks)}
    bounds = offsets + [len(entries)]
    task_of = np.searchsorted(np.array(bounds[1:]), np.arange(len(entries)), side="right")
    for pos, d in drops.items():
        t = int(task_of[pos])
        per_task[t]["drops"][pos - bounds[t]] = d
    for pos, k in kept_info.items():
        t = int(task_of[pos])
        per_task[t]["kept"][pos - bounds[t]] = k
    (work / "b").mkdir(parents=True, exist_ok=True)
    for t, d in per_task.items():
        atomic_write_text(work / "b" / f"decisions-{t:05d}.json", json.dumps(d))
    summary = dedup_mod.summarize(entries, drops)
    summary["clusters"] = len(kept_info)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_text(work / "b" / "done.json", json.dumps(summary))
    return summary


def run_phase_b_disk(out: Path, n_tasks: int, cfg: PrepareConfig, executor, rss: dict) -> dict:
    """Phase B as distributed stages over files (dedup.py), each task within `dedup.memory_budget_mb`:
    exact shuffle -> exact groups -> band runs -> band buckets -> clusters. Every stage's tasks leave a
    marker (their renamed output), so a rerun on any engine picks up where the last one stopped."""
    from ..console import log

    work = out / ".work"
    a_dir, b_dir = work / "a", work / "b"
    passed = [json.loads((a_dir / f"done-{t:05d}.json").read_text())["passed"] for t in range(n_tasks)]
    offsets = [int(x) for x in np.cumsum([0] + passed[:-1])]
    plan_path = b_dir / "plan.json"
    if not plan_path.exists():  # the partition counts of a resumed run stay those it started with
        atomic_write_text(plan_path, json.dumps(dedup_mod.dedup_plan(sum(passed), cfg.dedup)))
    bplan = json.loads(plan_path.read_text())
    xq, bq, d = bplan["exact_parts"], bplan["band_parts"], cfg.dedup
    log(f"prepare: dedup of {sum(passed)} documents in {xq} exact and {d.bands}x{bq} band partitions "
        f"(budget {d.memory_budget_mb:g} MB per task)")
    t0 = time.perf_counter()
    A, B = str(a_dir), str(b_dir)
    if d.exact:
        todo = [(t, A, B, xq) for t in range(n_tasks) if not (b_dir / "x" / f"done-{t:05d}").exists()]
        _run_tasks(executor, dedup_mod.exact_shuffle, todo, "dedup: exact shuffle", rss, "dedup.exact_shuffle")
        todo = [(q, B, offsets, n_tasks) for q in range(xq) if not (b_dir / "xo" / f"{q:04d}.jsonl").exists()]
        _run_tasks(executor, dedup_mod.exact_reduce, todo, "dedup: exact groups", rss, "dedup.exact_groups")
    todo = [(t, A, B, d.bands, d.rows, d.exact) for t in range(n_tasks)
            if not (b_dir / "bands" / f"done-{t:05d}").exists()]
    _run_tasks(executor, dedup_mod.band_runs, todo, "dedup: band runs", rss, "dedup.band_runs")
    todo = [(b, q, A, B, n_tasks, bq, d.rows, d.confirm, d.threshold, d.num_perm)
            for b in range(d.bands) for q in range(bq) if not (b_dir / "edges" / f"{b:03d}-{q:04d}.npy").exists()]
    _run_tasks(executor, dedup_mod.buckets, todo, "dedup: band buckets", rss, "dedup.buckets")
    (summary,) = _run_tasks(executor, dedup_mod.clusters, [(A, B, n_tasks, offsets)], "dedup: clusters", rss,
                            "dedup.clusters")
    summary.pop("rss_mb", None)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["partitions"] = {"exact": xq, "band": bq}
    atomic_write_text(b_dir / "done.json", json.dumps(summary))
    return summary


# ---------------------------------------------------------------------------------------------------
# Phase C: dedup decisions, safety, quality (one task)


def run_phase_c(task: int, cfg: PrepareConfig, out: Path, models: dict) -> dict:
    work = out / ".work"
    decisions = json.loads((work / "b" / f"decisions-{task:05d}.json").read_text())
    drops = {int(k): v for k, v in decisions["drops"].items()}
    kept_info = {int(k): v for k, v in decisions["kept"].items()}
    safety = Safety.load(cfg.safety, models.get("toxic"))
    quality = Quality(cfg.quality, models.get("ad"), models.get("fluency"), models.get("perplexity"))
    stats = {s: _new_stage() for s in PHASE_C}
    w = _Writers(out, task)
    src = work / "a" / part(task)
    try:
        if src.exists():
            with open(src, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    rec = json.loads(line)
                    lm2 = rec["meta"]["lm2"]
                    if i in drops:
                        lm2.update({k: v for k, v in drops[i].items() if k != "reason"})
                        _count(stats["dedup"], rec, drops[i]["reason"])
                        w.write(f"rejected/dedup/{part(task)}", _rejected(rec, "dedup", drops[i]["reason"]))
                        continue
                    if i in kept_info:
                        lm2.update(kept_info[i])
                    _count(stats["dedup"], rec, None)
                    reason = safety.check(rec)
                    _count(stats["safety"], rec, reason)
                    if reason:
                        w.write(f"rejected/safety/{part(task)}", _rejected(rec, "safety", reason))
                        continue
                    reason = quality.check(rec)
                    _count(stats["quality"], rec, reason)
                    if reason:
                        w.write(f"rejected/quality/{part(task)}", _rejected(rec, "quality", reason))
                        continue
                    w.write(f"kept/{part(task)}", rec)
        w.commit()
    except BaseException:
        w.abort()
        raise
    result = {"task": task, "stats": stats, "rss_mb": peak_rss_mb()}
    atomic_write_text(work / "c" / f"done-{task:05d}.json", json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------------
# Orchestration


def parse_shard(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value in (None, ""):
        return None
    try:
        i, n = (int(x) for x in str(value).split("/"))
    except ValueError:
        raise InputError(f"--shard expects i/N (e.g. 0/4), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {value}: need 0 <= i < N")
    return i, n


def config_hash(cfg: PrepareConfig) -> str:
    d = to_dict(cfg)
    for knob in ("workers", "engine", "ray_address"):  # where and how parallel it runs does not change the output
        d.pop(knob, None)
    d["dedup"].pop("memory_budget_mb", None)  # nor how finely dedup partitions its work
    return "sha256:" + hashlib.sha256(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _input_fingerprint(files: list[Path]) -> list[list]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _make_plan(files: list[Path], cfg: PrepareConfig) -> dict:
    task_bytes = max(1, int(cfg.task_mb * 1e6))
    tasks = readers.plan_tasks(readers.plan_units(files, task_bytes), task_bytes)
    return {
        "version": PLAN_VERSION,
        "config_hash": config_hash(cfg),
        "dedup_scheme": dedup_mod.scheme_record(cfg.dedup),
        "inputs": _input_fingerprint(files),
        "tasks": [[dataclasses.asdict(u) for u in t] for t in tasks],
    }


def _check_resume(old: dict, new: dict) -> None:
    for key, what in (("config_hash", "the prepare config"), ("dedup_scheme", "the MinHash scheme"),
                      ("inputs", "the input files"), ("tasks", "the task plan")):
        if old.get(key) != new.get(key):
            raise InputError(f"cannot resume: {what} changed since the unfinished run in this workspace; "
                             "re-run with --force to start over")


def _classifier_paths(ws: Workspace, cfg: PrepareConfig) -> dict:
    cdir = ws.root / "data" / "classifiers"
    models = {
        "toxic": resolve_model(cfg.safety.toxic_model, cdir / "toxic.npz"),
        "ad": resolve_model(cfg.quality.ad_model, cdir / "ad.npz"),
        "fluency": resolve_model(cfg.quality.fluency_model, cdir / "fluency.npz"),
        "perplexity": Path(cfg.quality.perplexity_model) if cfg.quality.perplexity_model else None,
    }
    return {k: (str(v) if v else None) for k, v in models.items()}


def _run_tasks(executor, fn, tasks: list[tuple], desc: str, rss: dict, key: str) -> list[dict]:
    """Run fn(*task) for every task on the executor, with a progress bar; remember the stage's peak RSS."""
    from ..console import progress

    results = []
    with progress(desc, total=len(tasks)) as bar:
        for r in executor.map(fn, tasks):
            results.append(r)
            rss[key] = max(rss.get(key, 0.0), r.get("rss_mb", 0.0))
            bar.advance(1)
    return results


def run_prepare(
    inputs: Optional[Iterable[Path]],
    workdir=None,
    cfg: Optional[PrepareConfig] = None,
    *,
    workers: Optional[int] = None,
    shard: Optional[str] = None,
    force: bool = False,
    types: Optional[dict] = None,
    recipe_name: str = "",
    engine: Optional[str] = None,
    ray_address: Optional[str] = None,
) -> dict:
    """Run the pipeline into <workdir>/data/prepared/ and return the summary (the manifest's stats).

    `engine` (default `prepare.engine`): "local" runs tasks in a process pool of `workers`, "ray" on the
    Ray cluster at `ray_address`; both run the same tasks and write the same artefact.
    """
    ws = workdir if isinstance(workdir, Workspace) else Workspace.at(workdir)
    cfg = cfg or PrepareConfig()
    if types:
        cfg = dataclasses.replace(cfg, types={**cfg.types, **types})
    cfg = dataclasses.replace(cfg, engine=engine or cfg.engine, ray_address=ray_address or cfg.ray_address,
                              workers=workers or cfg.workers)
    shard_sel = parse_shard(shard)
    # --shard runs write disjoint tasks and may run side by side; a full run excludes every other writer.
    with artefact_lock(ws.prepared, shared=shard_sel is not None):
        return _run_prepare(inputs, ws, cfg, shard, force, recipe_name)


def _run_prepare(inputs, ws: Workspace, cfg: PrepareConfig, shard: Optional[str], force: bool,
                 recipe_name: str) -> dict:
    from ..config import examples_dir
    from ..console import log

    inputs = list(inputs or [])
    if not inputs:
        inputs = [examples_dir() / "corpus"]
    files = readers.discover(inputs)
    if not files:
        raise InputError(f"no input files under {', '.join(map(str, inputs))}")
    out = ws.prepared
    work = out / ".work"
    plan = _make_plan(files, cfg)

    if force and out.exists():
        shutil.rmtree(out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if m.get("plan", {}).get("config_hash") == plan["config_hash"] and m.get("plan", {}).get("inputs") == plan["inputs"]:
            log(f"prepare: {out} is up to date with these inputs and config (use --force to redo)")
            return {**m["stats"], "skipped": True}
        raise InputError(f"{out} already holds prepared data from other inputs or config; use --force to replace it")
    if (work / "plan.json").exists():
        _check_resume(json.loads((work / "plan.json").read_text()), plan)
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out} holds files but no prepare state; use --force to replace them")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "plan.json", json.dumps(plan))

    executor = make_executor(cfg.engine, cfg.workers, cfg.ray_address)
    try:
        return _run_phases(ws, cfg, plan, files, shard, executor, recipe_name)
    finally:
        executor.close()


def _run_phases(ws: Workspace, cfg: PrepareConfig, plan: dict, files: list[Path], shard: Optional[str],
                executor, recipe_name: str) -> dict:
    from ..console import log

    out = ws.prepared
    work = out / ".work"
    shard_sel = parse_shard(shard)
    tasks = [[readers.Unit(**u) for u in t] for t in plan["tasks"]]
    n_tasks = len(tasks)
    mine = [t for t in range(n_tasks) if shard_sel is None or t % shard_sel[1] == shard_sel[0]]
    t_start = time.perf_counter()
    rss: dict = {}

    # Phase A
    todo_a = [t for t in mine if not (work / "a" / f"done-{t:05d}.json").exists()]
    if len(todo_a) < len(mine):
        log(f"prepare: {len(mine) - len(todo_a)} of {len(mine)} tasks already through format/classify/rules; skipping them")
    _run_tasks(executor, run_phase_a, [(t, tasks[t], cfg, out) for t in todo_a], "prepare: format+classify+rules",
               rss, "format+classify+rules")

    done_a = [t for t in range(n_tasks) if (work / "a" / f"done-{t:05d}.json").exists()]
    if len(done_a) < n_tasks:
        if shard_sel is None:
            raise Lm2Error("internal: phase A incomplete after running every task")
        log(f"prepare: shard {shard}: format/classify/rules done for its {len(mine)} tasks; "
            f"{n_tasks - len(done_a)} tasks of other shards remain. Run `lm2 prepare` without --shard when all "
            "shards are done to dedup and finish.")
        return {"shard": shard, "tasks": mine, "stats": _collect(work, "a", mine)}

    # Phase B (never sharded: the LSH index is global)
    if not (work / "b" / "done.json").exists():
        if shard_sel is not None:
            log(f"prepare: shard {shard} done; all shards finished phase A — run `lm2 prepare` without --shard "
                "to dedup and finish")
            return {"shard": shard, "tasks": mine, "stats": _collect(work, "a", mine)}
        if cfg.dedup.storage == "disk":
            run_phase_b_disk(out, n_tasks, cfg, executor, rss)
        else:
            from ..console import progress

            n_docs = sum(json.loads((work / "a" / f"done-{t:05d}.json").read_text())["passed"] for t in range(n_tasks))
            with progress("prepare: dedup (MinHash-LSH)", total=n_docs) as bar:
                run_phase_b(out, n_tasks, cfg, progress=lambda k: bar.advance(k))
            rss["dedup"] = peak_rss_mb()

    # Phase C
    models = _classifier_paths(ws, cfg)
    (work / "c").mkdir(parents=True, exist_ok=True)
    todo_c = [t for t in mine if not (work / "c" / f"done-{t:05d}.json").exists()]
    paths = {k: Path(v) if v else None for k, v in models.items()}
    _run_tasks(executor, run_phase_c, [(t, cfg, out, paths) for t in todo_c], "prepare: safety+quality", rss,
               "safety+quality")
    if shard_sel is not None:
        return {"shard": shard, "tasks": mine, "stats": _collect(work, "c", mine)}

    rss["driver"] = peak_rss_mb()
    resources = {"engine": executor.name, "workers": executor.workers, "peak_rss_mb": rss}
    summary = _finalize(out, work, n_tasks, cfg, plan, models, files, time.perf_counter() - t_start, recipe_name,
                        resources)
    return summary


def _collect(work: Path, phase: str, tasks: Iterable[int]) -> dict:
    stats: dict = {}
    for t in tasks:
        p = work / phase / f"done-{t:05d}.json"
        if p.exists():
            merge_stats(stats, json.loads(p.read_text())["stats"])
    return stats


def _finalize(out: Path, work: Path, n_tasks: int, cfg: PrepareConfig, plan: dict, models: dict,
              files: list[Path], seconds: float, recipe_name: str, resources: dict) -> dict:
    stages: dict = {}
    merge_stats(stages, _collect(work, "a", range(n_tasks)))
    merge_stats(stages, _collect(work, "c", range(n_tasks)))
    stages = {s: stages.get(s, _new_stage()) for s in STAGES}
    check_balance(stages)
    final = stages["quality"]
    kept = {"records": final["kept"],
            "bytes": sum(v["kept_bytes"] for v in final["by_lang"].values()),
            "by_lang": {k: {"records": v["kept"], "bytes": v["kept_bytes"]} for k, v in final["by_lang"].items() if v["kept"]},
            "by_type": {k: {"records": v["kept"], "bytes": v["kept_bytes"]} for k, v in final["by_type"].items() if v["kept"]}}
    dedup_summary = json.loads((work / "b" / "done.json").read_text())
    stats = {
        "input_records": stages["format"]["in"],
        "kept_records": final["kept"],
        "rejected_records": sum(stages[s]["rejected"] for s in STAGES),
        "balanced": True,
        "kept": kept,
        "stages": stages,
        "dedup": {**plan["dedup_scheme"], "s_curve": dedup_mod.s_curve(cfg.dedup.bands, cfg.dedup.rows),
                  "storage": cfg.dedup.storage, **dedup_summary},
        "classifiers": models,
        "tasks": n_tasks,
        "seconds": round(seconds, 2),
        # where it ran and each stage's peak resident memory (the largest task's process): the only stats
        # that differ between engines and runs
        "resources": resources,
    }
    # Parts of tasks that kept nothing still get an (empty) kept shard, so readers can count on part names.
    (out / "kept").mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("kept/*.tmp")) + list(out.glob("rejected/*/*.tmp")):  # of killed task attempts
        stale.unlink(missing_ok=True)
    for t in range(n_tasks):
        (out / "kept" / part(t)).touch(exist_ok=True)
    plan_small = {k: plan[k] for k in ("version", "config_hash", "dedup_scheme", "inputs")}
    write_manifest(out, "prepared", config=cfg, inputs=files if len(files) <= 50 else [], stats=stats,
                   plan=plan_small, recipe=recipe_name, n_input_files=len(files))
    shutil.rmtree(work, ignore_errors=True)
    return stats


def check_balance(stages: dict) -> None:
    """input = kept + rejected at every stage, and each stage's input is the previous stage's kept."""
    prev = None
    for s in STAGES:
        st = stages[s]
        if st["in"] != st["kept"] + st["rejected"]:
            raise Lm2Error(f"internal: stage {s} lost records ({st['in']} in, {st['kept']} kept, {st['rejected']} rejected)")
        if prev is not None and st["in"] != stages[prev]["kept"]:
            raise Lm2Error(f"internal: stage {s} got {st['in']} records but {prev} kept {stages[prev]['kept']}")
        prev = s


# ---------------------------------------------------------------------------------------------------
# Reading the artefact (for later stages and tests)


def iter_kept(prepared: Path) -> Iterable[dict]:
    """Every kept record of a prepared artefact, in part order."""
    for p in sorted((Path(prepared) / "kept").glob("part-*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def iter_rejected(prepared: Path, stage: Optional[str] = None) -> Iterable[dict]:
    base = Path(prepared) / "rejected"
    for p in sorted(base.glob(f"{stage or '*'}/part-*.jsonl")):
        with open(p, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def decode_raw(rejected: dict) -> Optional[bytes]:
    """The raw bytes a format reject kept (None if the reject had none)."""
    b64 = rejected.get("meta", {}).get("raw_b64")
    return base64.b64decode(b64) if b64 else None


def summary_table(stats: dict):
    """A Rich table of per-stage counts and top reasons."""
    from rich.table import Table

    table = Table(title="lm2 prepare", show_lines=False)
    for col in ("stage", "in", "kept", "rejected", "top reasons"):
        table.add_column(col, justify="right" if col in ("in", "kept", "rejected") else "left")
    for s in STAGES:
        st = stats["stages"][s]
        top = Counter(st["reasons"]).most_common(3)
        table.add_row(s, str(st["in"]), str(st["kept"]), str(st["rejected"]), ", ".join(f"{r} {n}" for r, n in top))
    return table


# ---------------------------------------------------------------------------------------------------
# Command entry points (cli.py stays thin)


def parse_types(items: Iterable[str]) -> dict:
    from ..config import CONTENT_TYPES

    out = {}
    for item in items:
        glob, sep, kind = item.rpartition("=")
        if not sep or not glob or kind not in CONTENT_TYPES:
            raise InputError(f"--type expects PATH_GLOB=TYPE with TYPE in {', '.join(CONTENT_TYPES)}, got {item!r}")
        out[glob] = kind
    return out


def prepare_main(inputs, workdir, recipe, types: list[str], workers=None, shard=None, force=False,
                 json_out=False, engine=None, ray_address=None) -> dict:
    from ..console import err, log, print_json

    ws = Workspace.at(workdir)
    stats = run_prepare(inputs, ws, recipe.prepare, workers=workers, shard=shard, force=force,
                        types=parse_types(types), recipe_name=recipe.name, engine=engine, ray_address=ray_address)
    if json_out:
        print_json({"prepared": str(ws.prepared), **stats})
    elif "stages" in stats:
        err.print(summary_table(stats))
        kept = stats["kept"]
        langs = ", ".join(f"{k} {v['records']}" for k, v in sorted(kept["by_lang"].items()))
        log(f"prepare: {stats['input_records']} records in, {stats['kept_records']} kept ({langs}), "
            f"{stats['rejected_records']} rejected -> {ws.prepared}")
    return stats


def train_classifier_main(labels: Path, name: str, out: Optional[Path], workdir, json_out: bool = False) -> dict:
    from ..console import log, print_json
    from .quality import train_classifier

    ws = Workspace.at(workdir)
    out = Path(out) if out else ws.root / "data" / "classifiers" / f"{name}.npz"
    result = train_classifier(Path(labels), name, out)
    if json_out:
        print_json(result)
    else:
        log(f"train-classifier: {name} on {result['examples']} examples, held-out accuracy "
            f"{result['holdout_accuracy']} -> {out}")
    return result
