"""Checkpoints that survive crashes: `<stage>/checkpoints/step-%08d/`, written asynchronously.

    checkpoints/
      latest                      "step-00000200": moved only once that folder is whole
      step-00000200/
        model.safetensors         full weights, HF InternLM2 names (loadable with `lm2cli.model.load_model`)
        config.json               HF InternLM2 config (+ generation_config.json, tokenizer files)
        optim/                    DeepSpeed's own checkpoint (module, optimizer and LR-scheduler state,
                                  ZeRO shards per rank) + rng-rank%05d.pt (torch/numpy/python RNG per rank)
                                  + rank%05d.written markers
        dataloader.json           the data stream's exact position (`PackedStream.state_dict()`)
        train_state.json          step, tokens seen, wall time, world size, ZeRO stage
        config.resolved.yaml      the recipe the run resolved
        manifest.json             kind "checkpoint"
        DONE                      written last: every file's size, so a truncated file is detected

Saving (llm.c's marker + InternEvo's async upload): on the training thread DeepSpeed's
`save_checkpoint` runs against a checkpoint engine that only *snapshots* (copies to CPU memory), and
the full weights are gathered; a background thread then writes everything while training continues.
At most one save is in flight: the next one first waits for it. Each rank marks its files written;
rank 0 waits for every mark, writes `DONE`, then moves `latest` and prunes to the newest `keep_last`.
Multi-node runs need `checkpoints/` on a filesystem every node sees.

`find_resume` returns the newest whole checkpoint, skipping any without DONE, with a missing or
truncated file, or with an unreadable safetensors header, each with a warning that says why.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from ..console import warn
from ..errors import InputError, Lm2Error
from ..layout import atomic_write_text, now_iso, write_manifest
from .engine import Weights

DONE = "DONE"
LATEST = "latest"
OPTIM = "optim"
WEIGHTS = "model.safetensors"
STEP_PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every `step-XXXXXXXX` under `root`, oldest first, whole or not."""
    out = []
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            name = p.name
            if p.is_dir() and name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
                out.append((int(name[len(STEP_PREFIX):]), p))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------
# Validity and resume


def verify(ckpt: Path) -> Optional[str]:
    """None if `ckpt` is whole, else why not."""
    ckpt = Path(ckpt)
    done = ckpt / DONE
    if not done.exists():
        return "no DONE marker (the save did not finish)"
    try:
        files = json.loads(done.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable DONE marker ({e})"
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{rel} has {actual} bytes where DONE recorded {size} (truncated or overwritten)"
    try:
        from safetensors import safe_open

        with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own types for a bad header
        return f"{WEIGHTS} is unreadable ({e})"
    return None


def find_resume(root: Path, quiet: bool = False) -> Optional[Path]:
    """The newest whole checkpoint under `root` (a stage folder or its `checkpoints/`), skipping broken
    ones with a warning that says why."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    for _, path in reversed(list_steps(root)):
        reason = verify(path)
        if reason is None:
            return path
        if not quiet:
            warn(f"skipping checkpoint {path}: {reason}")
    return None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------
# RNG state as plain tensors and numbers (loadable with weights_only=True)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------
# Snapshots


def snapshot(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory: what a background writer may safely read."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps OrderedDict/defaultdict types
        for k in out:
            out[k] = snapshot(obj[k])
        return out
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class SnapshotEngine(CheckpointEngine):
    """A DeepSpeed checkpoint engine that records (path, CPU snapshot) instead of writing; loads as torch."""

    def __init__(self):
        super().__init__()
        self.name = "lm2-snapshot"
        self.pending: list[tuple[str, Any]] = []

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.pending.append((path, snapshot(state_dict)))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)  # DeepSpeed's own files

    def commit(self, info) -> bool:
        return True

    def take(self) -> list[tuple[str, Any]]:
        out, self.pending = self.pending, []
        return out


@dataclass
class _Save:
    step: int
    dir: Path
    ds_files: list
    rng: dict
    weights: Optional[dict]  # rank 0 only
    meta: dict = field(default_factory=dict)  # rank 0 only: data/train state, config yaml


# ---------------------------------------------------------------------------------------------------
# The asynchronous checkpointer


class AsyncCheckpointer:
    """`save()` snapshots on the calling (training) thread and returns; a background thread writes."""

    # Tests set this to hold the writer at its first line, to observe that training goes on meanwhile.
    before_write: Optional[Callable[[], None]] = None

    def __init__(self, root: Path, engine, dist, *, keep_last: int, model_config=None, tokenizer=None,
                 export: Optional[Callable] = None, config_yaml: str = "", inputs=(), peer_timeout: float = 3600.0):
        self.root, self.engine, self.dist = Path(root), engine, dist
        self.keep_last, self.model_config, self.tokenizer = keep_last, model_config, tokenizer
        self.export, self.config_yaml, self.inputs = export, config_yaml, list(inputs)
        self.peer_timeout = peer_timeout
        self._ds = SnapshotEngine()
        engine.ds.checkpoint_engine = self._ds
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_saved: Optional[int] = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(self, step: int, data_state: dict, train_state: dict) -> Path:
        """Snapshot now (all ranks call this), write in the background; returns the folder."""
        self.wait()
        folder = self.root / step_name(step)
        if self.dist.is_main:
            if folder.exists():  # left by a run that crashed at this step
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        # DeepSpeed barriers after rank 0 creates the folder, so no rank writes into a folder being removed.
        self.engine.ds.save_checkpoint(str(folder), tag=OPTIM, client_state={}, save_latest=False)
        ds_files = self._ds.take()
        weights = self._weights_from(ds_files)
        meta = {}
        if self.dist.is_main:
            meta = {"data": json.dumps(data_state, indent=1), "train": json.dumps(train_state, indent=1)}
        job = _Save(step, folder, ds_files, rng_state(), weights, meta)
        self._thread = threading.Thread(target=self._write, args=(job,), name=f"lm2-save-{step}")
        self._thread.start()
        self.last_saved = step
        return folder

    def _weights_from(self, ds_files: list) -> Optional[dict]:
        """Full weights for model.safetensors; reuses DeepSpeed's module snapshot unless ZeRO-3 shards it."""
        if self.engine.zero_stage < 3 and self.dist.is_main:
            for _, state in ds_files:
                if isinstance(state, dict) and state.get("module"):
                    return state["module"]
        return self.engine.full_state_dict()

    def wait(self) -> None:
        """Block until the save in flight is written; a failed write stops training here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise Lm2Error(f"writing a checkpoint under {self.root} failed: {err}") from err

    # -- the writer thread -------------------------------------------------------------------------

    def _write(self, job: _Save) -> None:
        try:
            if AsyncCheckpointer.before_write is not None:
                AsyncCheckpointer.before_write()
            rank = self.dist.rank
            for path, state in job.ds_files:
                torch.save(state, path)
            torch.save(job.rng, job.dir / OPTIM / f"rng-rank{rank:05d}.pt")
            if self.dist.is_main:
                self._write_main(job)
            (job.dir / OPTIM / f"rank{rank:05d}.written").write_text(now_iso() + "\n")
            if self.dist.is_main:
                self._wait_for_peers(job)
                self._commit(job)
        except BaseException as e:  # surfaced to the training thread by wait()
            self._error = e

    def _write_main(self, job: _Save) -> None:
        from ..convert import save_model

        export = self.export or save_model
        export(Weights(self.model_config, job.weights), job.dir, self.tokenizer)
        (job.dir / "dataloader.json").write_text(job.meta["data"] + "\n")
        (job.dir / "train_state.json").write_text(job.meta["train"] + "\n")
        (job.dir / "config.resolved.yaml").write_text(self.config_yaml)
        write_manifest(job.dir, "checkpoint", config=self.model_config, inputs=self.inputs,
                       stats=json.loads(job.meta["train"]), stage=self.root.parent.name)

    def _wait_for_peers(self, job: _Save) -> None:
        marks = [job.dir / OPTIM / f"rank{r:05d}.written" for r in range(self.dist.world)]
        deadline = time.monotonic() + self.peer_timeout
        while not all(m.exists() for m in marks):
            if time.monotonic() > deadline:
                missing = [m.name for m in marks if not m.exists()]
                raise Lm2Error(f"{job.dir.name}: ranks did not finish writing ({', '.join(missing)}); is "
                               f"{self.root} on a filesystem every node sees?")
            time.sleep(0.05)

    def _commit(self, job: _Save) -> None:
        files = {str(p.relative_to(job.dir)): p.stat().st_size for p in sorted(job.dir.rglob("*")) if p.is_file()}
        atomic_write_text(job.dir / DONE, json.dumps({"step": job.step, "created": now_iso(), "files": files},
                                                     indent=1) + "\n")
        atomic_write_text(self.root / LATEST, job.dir.name + "\n")
        self._prune(job.step)

    def _prune(self, newest: int) -> None:
        steps = list_steps(self.root)
        whole = [p for _, p in steps if (p / DONE).exists()]
        for p in whole[: max(0, len(whole) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)
        for s, p in steps:  # partial folders older than a whole one are crash leftovers
            if s < newest and not (p / DONE).exists():
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Restore


def restore(ckpt: Path, engine, dist) -> tuple[dict, dict]:
    """Load weights, optimizer, LR schedule and this rank's RNG from `ckpt`; returns (train_state, data_state).

    The same ZeRO layout (stage and number of ranks) loads DeepSpeed's shards as saved. A ZeRO 1-3
    checkpoint resumes on another number of ranks (hpZ on or off) at the same ZeRO stage through
    DeepSpeed's universal checkpoint: rank 0 converts `optim/` once into `optim-universal/` (full fp32
    master weights and Adam moments per parameter), which every rank then slices for its own
    partition. ZeRO-0 state is whole on every rank and resumes on any number of ranks as it is. The
    data position is global (samples consumed by all ranks), so the new layout continues the same
    sample sequence; keep micro_batch_size × grad_accum × ranks equal to continue the same batches.
    A different ZeRO stage is refused: deepspeed 0.19.8 names the model-state files per stage and
    stores the stages' optimizer state in different forms, and its universal loader does not bridge them.
    """
    ckpt = Path(ckpt)
    reason = verify(ckpt)
    if reason:
        raise InputError(f"cannot resume from {ckpt}: {reason}")
    train_state = read_json(ckpt / "train_state.json")
    saved_world, saved_zero = train_state.get("world", 1), train_state.get("zero_stage", 0)
    if saved_zero != engine.zero_stage:
        raise InputError(f"{ckpt} holds ZeRO-{saved_zero} state; this run is ZeRO-{engine.zero_stage}. A "
                         "checkpoint resumes on any number of ranks but at its own ZeRO stage: set the sharding "
                         "(or zero_stage) it was saved with, or start over with --resume never")
    if saved_world == dist.world or saved_zero == 0:
        path, _ = engine.ds.load_checkpoint(str(ckpt), tag=OPTIM, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    else:
        path = _load_universal(ckpt, engine, dist)
    if path is None:
        raise Lm2Error(f"DeepSpeed could not load {ckpt / OPTIM}")
    engine.follow_config_schedule()
    rng = ckpt / OPTIM / f"rng-rank{dist.rank:05d}.pt"
    if rng.exists():  # a rank the saving run did not have keeps its own seed-derived state
        set_rng_state(torch.load(rng, weights_only=True))
    return train_state, read_json(ckpt / "dataloader.json")


UNIVERSAL = "optim-universal"


def universal_checkpoint(ckpt: Path) -> Path:
    """`ckpt/optim-universal/`: DeepSpeed's universal form of `ckpt/optim/` (made once, atomically;
    outside DONE's list, so the checkpoint stays valid with or without it)."""
    out = Path(ckpt) / UNIVERSAL
    if (out / DONE).exists():
        return out
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = Path(ckpt) / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(input_folder=str(Path(ckpt) / OPTIM), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log_out = io.StringIO()
    try:
        with contextlib.redirect_stdout(log_out), contextlib.redirect_stderr(log_out):
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Lm2Error(f"converting {ckpt / OPTIM} to a universal checkpoint failed: {e}\n{log_out.getvalue()[-2000:]}")
    (Path(ckpt) / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; lm2 names the folder
    (tmp / DONE).write_text(now_iso() + "\n")
    tmp.rename(out)
    return out


def _load_universal(ckpt: Path, engine, dist, poll: float = 1.0):
    """Rank 0 converts while the others wait on the filesystem, not in a collective: converting a 7B
    checkpoint can outlast NCCL's and gloo's 30-minute timeouts."""
    failed = Path(ckpt) / f".{UNIVERSAL}.failed"
    if dist.is_main:
        failed.unlink(missing_ok=True)  # an earlier attempt's, gone before any rank looks
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.is_main:
        try:
            universal_checkpoint(ckpt)
        except Lm2Error as e:
            failed.write_text(str(e))
            raise
    else:
        while not (Path(ckpt) / UNIVERSAL / DONE).exists():
            if failed.exists():
                raise Lm2Error(failed.read_text())
            time.sleep(poll)
    cfg = engine.ds._config
    cfg.load_universal_checkpoint = True
    try:
        path, _ = engine.ds.load_checkpoint(str(ckpt), tag=UNIVERSAL, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    finally:
        cfg.load_universal_checkpoint = False
    return path
