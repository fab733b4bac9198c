"""One rank of `lm2 ... --nproc N`: runs the lm2 command line given in $LM2_RANK_ARGV (a JSON list).

torch.distributed.run scans every option-like argument after the script name and rejects prefixes of
its own options (`--run` could be its `--run-path`), so the command travels in the environment.

A rank leaves through `os._exit` once the command has returned: the interpreter's teardown with gloo
and a ZeRO-3 engine still referenced can abort ("terminate called without an active exception", seen
on bench ranks in CI) after every artefact was already written, and the launcher would report the
whole run as failed. The command joins its own writers (checkpoint threads) before it returns.
"""

import json
import os
import sys

from lm2cli.cli import main


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # what the interpreter would have printed for sys.exit("message")
    return 1


if __name__ == "__main__":
    sys.argv = ["lm2", *json.loads(os.environ["LM2_RANK_ARGV"])]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
