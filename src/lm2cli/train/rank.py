"""One rank of `lm2 ... --nproc N`: runs the lm2 command line given in $LM2_RANK_ARGV (a JSON list).

torch.distributed.run scans every option-like argument after the script name and rejects prefixes of
its own options (`--run` could be its `--run-path`), so the command travels in the environment.
"""

import json
import os
import sys

from lm2cli.cli import main

if __name__ == "__main__":
    sys.argv = ["lm2", *json.loads(os.environ["LM2_RANK_ARGV"])]
    main()
