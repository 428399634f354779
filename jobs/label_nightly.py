"""Nightly labelling entry point for `ray job submit` (no logic here: see raypipe.label).

    ray job submit --working-dir . -- python jobs/label_nightly.py -c demo --model-uri models:/raypipe-classifier@prod

Arguments are those of ``raypipe label``; the exit code is the job's (non-zero when too many videos failed).
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
