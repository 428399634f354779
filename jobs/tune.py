"""``ray job submit -- python jobs/tune.py -c sweep_demo``: a hyperparameter sweep as a Ray job (no logic here).

Arguments are those of ``raypipe tune``; submitting the same sweep again resumes it (see raypipe.tune).
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
