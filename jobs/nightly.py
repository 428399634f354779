"""Nightly entry point for `ray job submit` (no logic here: see raypipe.nightly).

    ray job submit --working-dir . -- python jobs/nightly.py -c prod.yaml            # every night
    ray job submit --working-dir . -- python jobs/nightly.py -c prod.yaml --retrain  # nights that retrain

Embeds new videos, retrains and promotes when --retrain, labels with the champion, writes the night's summary.
Submitting it again for the same night (--night YYYY-MM-DD, default today in UTC) finishes that night, once.
Arguments are those of ``raypipe nightly``; the exit code is the job's.
"""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
