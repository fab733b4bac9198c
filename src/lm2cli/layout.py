"""The workspace layout and artefact manifests: the one place that knows paths.

    <workdir>/
      data/prepared/                      lm2 prepare
      data/tokens/                        lm2 tokenize
      tokenizer/                          lm2 tokenize build-vocab
      runs/<run>/<stage>/                 pretrain-stage1..3, extend-context, sft, rlhf-reward, rlhf-ppo
      eval/<run>/<name>/                  lm2 eval ..., lm2 eval needle

Every artefact folder carries `manifest.json` (kind, lm2 version, created, resolved config, inputs
with fingerprints, stats). A manifest is written last and atomically, so a folder without one is
unfinished work, never a valid artefact. Commands find their input through `Workspace` and check
its kind with `read_manifest(..., kinds=...)`, which refuses a wrong artefact by name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import __version__
from .errors import InputError, WrongArtefact

DEFAULT_WORKDIR = "lm2-work"
DEFAULT_RUN = "default"
MANIFEST = "manifest.json"

# Training stages in pipeline order; each name is also its folder under runs/<run>/.
STAGES = (
    "pretrain-stage1",
    "pretrain-stage2",
    "pretrain-stage3",
    "extend-context",
    "sft",
    "rlhf-reward",
    "rlhf-ppo",
)
# Artefact kinds that hold model weights (a training stage's final/ or one of its checkpoints).
MODEL_KINDS = ("checkpoint",)


def resolve_workdir(workdir: str | os.PathLike | None = None) -> Path:
    """--workdir, else $LM2_WORKDIR, else ./lm2-work."""
    if workdir:
        return Path(workdir).expanduser().resolve()
    env = os.environ.get("LM2_WORKDIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(DEFAULT_WORKDIR).resolve()


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, workdir: str | os.PathLike | None = None) -> "Workspace":
        return cls(resolve_workdir(workdir))

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def tokens(self) -> Path:
        return self.root / "data" / "tokens"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def run_dir(self, run: str = DEFAULT_RUN) -> Path:
        _check_name(run, "run")
        return self.root / "runs" / run

    def stage_dir(self, stage: str, run: str = DEFAULT_RUN) -> Path:
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.run_dir(run) / stage

    def eval_dir(self, name: str, run: str = DEFAULT_RUN) -> Path:
        _check_name(run, "run")
        _check_name(name, "eval name")
        return self.root / "eval" / run / name

    def latest_model(self, run: str = DEFAULT_RUN, stages: Iterable[str] = STAGES) -> Path | None:
        """The `final/` of the latest stage (in pipeline order) among `stages` that finished."""
        found = None
        for stage in stages:
            final = self.stage_dir(stage, run) / "final"
            if (final / MANIFEST).exists():
                found = final
        return found

    def artefacts(self) -> list[Path]:
        """Every folder under the workspace that holds a manifest, in path order."""
        if not self.root.exists():
            return []
        return sorted(p.parent for p in self.root.rglob(MANIFEST))


def _check_name(name: str, what: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"invalid {what} name {name!r}: use a plain folder name")


# ---------------------------------------------------------------------------------------------------
# Manifests


def fingerprint_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def fingerprint(artefact: Path) -> str:
    """An artefact's fingerprint is the hash of its manifest, which itself records its contents' stats."""
    return fingerprint_file(Path(artefact) / MANIFEST)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and numpy scalars into plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def write_manifest(
    artefact: Path,
    kind: str,
    config: Any = None,
    inputs: Iterable[Path] = (),
    stats: dict | None = None,
    **extra: Any,
) -> dict:
    """Write `manifest.json` atomically; call it last, once the artefact's files are complete."""
    artefact = Path(artefact)
    manifest = {
        "kind": kind,
        "lm2_version": __version__,
        "created": now_iso(),
        "config": to_jsonable(config) if config is not None else {},
        "inputs": [describe_input(Path(p)) for p in inputs],
        "stats": to_jsonable(stats or {}),
    }
    manifest.update(to_jsonable(extra))
    atomic_write_text(artefact / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def describe_input(path: Path) -> dict:
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path.resolve())}
    if (path / MANIFEST).exists():
        m = json.loads((path / MANIFEST).read_text())
        entry["kind"] = m.get("kind")
        entry["fingerprint"] = fingerprint(path)
    elif path.is_file():
        entry["fingerprint"] = fingerprint_file(path)
    elif path.is_dir():  # a foreign folder, e.g. a released HF model: no manifest to hash
        entry["fingerprint"] = fingerprint_folder(path)
    return entry


SAMPLE_BYTES = 1 << 20


def fingerprint_folder(folder: Path) -> str:
    """A content fingerprint of a folder without a manifest, cheap on a 15 GB model folder.

    Hashes every top-level file's name and size; small files (configs, tokenizer) whole; of larger
    files the safetensors header (names, dtypes, shapes, offsets) when there is one, plus the first and
    last MiB of data. Changed weights of the same shapes are caught by the sampled bytes, not
    guaranteed: this identifies an input in lineage, it is not an integrity check.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * SAMPLE_BYTES:
                h.update(fh.read())
                continue
            if f.suffix == ".safetensors":
                n = int.from_bytes(fh.read(8), "little")
                if 0 < n < size:
                    h.update(fh.read(n))
            fh.seek(0)
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(size - SAMPLE_BYTES)
            h.update(fh.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()


def read_manifest(artefact: str | os.PathLike, kinds: Iterable[str] | None = None, what: str = "input") -> dict:
    """Load an artefact's manifest, refusing a missing, unfinished or wrong-kind artefact by name."""
    artefact = Path(artefact)
    path = artefact / MANIFEST
    if not artefact.exists():
        raise InputError(f"{what} {artefact} does not exist")
    if not path.exists():
        raise WrongArtefact(f"{what} {artefact} is not an lm2 artefact (no {MANIFEST}; unfinished or foreign)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WrongArtefact(f"{what} {artefact} has an unreadable {MANIFEST}: {e}") from None
    kinds = tuple(kinds) if kinds else None
    if kinds and manifest.get("kind") not in kinds:
        raise WrongArtefact(
            f"{what} {artefact} is a {manifest.get('kind')!r} artefact; expected {' or '.join(map(repr, kinds))}"
        )
    return manifest


def require_input(path: Path | None, kinds: Iterable[str], what: str, hint: str) -> tuple[Path, dict]:
    """Resolve a command's input: the given or default path must exist and be of the right kind."""
    if path is None:
        raise InputError(f"no {what} found; {hint}")
    return Path(path), read_manifest(path, kinds, what)


# ---------------------------------------------------------------------------------------------------
# Crash-safe writes: nothing half-written ever sits at a final path.


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staging_dir(final: Path, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder beside `final` and move it into place only if the block succeeds.

    A crash leaves a `.final.staging-*` folder that no command reads, never a partial `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise InputError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------
# The workspace lock: one writer per artefact folder.


def _holder_line(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} running `{info.get('command', '?')}` "
            f"since {info.get('since', '?')}")


@contextlib.contextmanager
def artefact_lock(artefact: Path, command: str = "", shared: bool = False) -> Iterator[None]:
    """Hold `.<name>.lock` beside `artefact` while a command writes it; a second writer fails at once with a
    one-line error naming the holder (pid, host, command).

    The lock is `flock` on the file, so the kernel frees it when its holder dies, however it died: a lock
    file left by a killed process is simply taken over. `shared=True` lets several cooperating writers in at
    once (`lm2 prepare --shard i/N` runs, which write disjoint tasks) while still excluding a full run.
    Multi-rank commands take it on rank 0 only.
    """
    import fcntl
    import socket
    import sys

    artefact = Path(artefact)
    artefact.parent.mkdir(parents=True, exist_ok=True)
    path = artefact.parent / f".{artefact.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise InputError(f"{artefact} is being written by another lm2 command ({_holder_line(info)}); "
                             "wait for it to finish or stop it") from None
        # The holder before us may have removed the file between our open and our lock: then we locked an
        # orphan inode and must start over on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
            "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield
    finally:
        try:
            # Upgrading to exclusive without waiting tells us whether we are the last holder: only then remove.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except BlockingIOError:
            pass
        os.close(fd)
