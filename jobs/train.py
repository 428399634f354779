"""Training entry point for `ray job submit` (no logic here: see raypipe.train).

    ray job submit --working-dir . -- python jobs/train.py -c demo --set train.num_workers=4 --set train.use_gpu=true

Arguments are those of ``raypipe train``; the exit code is the job's (2 on a config error).
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
