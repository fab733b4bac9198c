"""What the demo scripts share: running an lm2 command the way a user types it, and logging it."""

from __future__ import annotations

import os
import shlex
import subprocess
import time


def lm2(*args, log: list) -> None:
    """Run `lm2 ARGS` (CPU DeepSpeed unless DS_ACCELERATOR says otherwise), echo it, append it to `log`."""
    cmd = ["lm2", *map(str, args)]
    log.append(" ".join(shlex.quote(c) for c in cmd))
    print("$", log[-1], flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
