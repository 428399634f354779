"""``ray job submit -- python jobs/embed.py -c demo ...``: the embed stage as a Ray job (no logic here)."""

import sys

from raypipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
