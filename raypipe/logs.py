"""Logging set up once, by the CLI and job entry points; library modules only call ``logging.getLogger``."""

from __future__ import annotations

import logging
import os


def setup_logging(verbosity: int = 0) -> None:
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    level = getattr(logging, os.environ.get("RAYPIPE_LOG_LEVEL", "").upper(), level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "filelock", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
