"""Where the tasks of `lm2 prepare` and `lm2 tokenize` run: one interface, two engines (datatrove's shape).

A stage is written once as a plain module-level function over a list of tasks. Each task writes its
outputs under temporary names and a completion marker last, so it may run twice (a retry after its
worker died, a rerun after the driver died) with the same result, and a rerun submits only the tasks
without a marker. An engine decides only where tasks run and how failures are retried:

  local  a process pool on this machine (in-process for one worker); a dead worker fails the run, and the
         next run resumes from the markers
  ray    Ray tasks on a cluster (`ray start --head` + `ray start --address`), retried by Ray on another
         worker when a worker or node dies; every node must see the workspace at the same path

Both run the same functions on the same task plan, so their outputs are identical.
"""

from __future__ import annotations

import os
import resource
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator, Optional, Sequence

from ..errors import InputError

ENGINES = ("local", "ray")


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if os.uname().sysname == "Darwin" else 1 << 10), 1)


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator:
        """fn(*task) for every task; results in completion order."""
        if self.workers == 1 or len(tasks) <= 1:
            for args in tasks:
                yield fn(*args)
            return
        with ProcessPoolExecutor(max_workers=min(self.workers, len(tasks))) as pool:
            futs = [pool.submit(fn, *args) for args in tasks]
            for fut in as_completed(futs):
                yield fut.result()

    def close(self) -> None:
        pass


class RayExecutor:
    """Tasks as Ray remote functions on the cluster at `address` ("auto": the one `ray start` left running)."""

    name = "ray"

    def __init__(self, address: str = "auto", max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise InputError("--engine ray needs Ray on this machine and the cluster's: pip install 'lm2[ray]'") from None
        self.ray = ray
        self.max_retries = max_retries
        self.owns = False
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                ray.init(address=address or "auto", log_to_driver=False, logging_level="ERROR",
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"cannot reach a Ray cluster at {address!r} ({first}); start one with "
                                 "`ray start --head` or pass --ray-address HOST:PORT") from None
            self.owns = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> Iterator:
        ray = self.ray
        # A worker's death (SIGKILL, OOM, a lost node) is retried; an exception raised by the task is not:
        # it is a real error and is re-raised here as itself.
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)(fn)
        pending = [remote.remote(*args) for args in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise e.as_instanceof_cause() from None

    def close(self) -> None:
        if self.owns:
            self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of reconnecting, when nothing listens at HOST:PORT."""
    import socket

    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10):
            pass
    except (OSError, ValueError) as e:
        raise InputError(f"no Ray cluster answers at {address} ({e}); start one with `ray start --head "
                         "--port=PORT` or pass the head's HOST:PORT as --ray-address") from None


def make_executor(engine: str = "local", workers: int = 1, ray_address: Optional[str] = None):
    if engine == "local":
        return LocalExecutor(workers)
    if engine == "ray":
        return RayExecutor(ray_address or "auto")
    raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
