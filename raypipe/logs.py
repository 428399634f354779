"""Logging set up once, by the CLI and job entry points; library modules only call ``logging.getLogger``.

Quiet by default: the console shows raypipe's own INFO lines (progress, summaries), its warnings and errors,
and only errors from other libraries (Ray, MLflow, botocore, ...). Everything, DEBUG and tracebacks included,
goes to one log file per command: ``$RAYPIPE_LOG_DIR`` (default ``./raypipe-logs``) ``/<stage>-<UTC time>.log``.
Ray worker output (model loading, per-epoch training reports) stays in Ray's session logs
(``/tmp/ray/session_latest/logs`` on each node) unless ``-v``, which streams it and every library's INFO lines.

While a CLI command runs quietly, :func:`stderr_to_log_file` also points file descriptor 2 at the log file:
Ray's C++ core and some libraries write straight to it (actor warnings, download bars), which no logging
setting reaches; the console handler keeps a duplicate of the real stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state: dict[str, object] = {"verbose": False, "log_file": None, "console": None}
_NOISY = ("urllib3", "botocore", "s3fs", "aiobotocore", "filelock", "alembic", "matplotlib", "PIL")


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time (test harnesses swap it; a stream kept from earlier may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _ConsoleFilter(logging.Filter):
    """raypipe's records from INFO, other libraries' only from ERROR (all of them with -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"] or record.name == "raypipe" or record.name.startswith("raypipe."):
            return True
        return record.levelno >= logging.ERROR


def verbose() -> bool:
    return bool(_state["verbose"])


def log_file() -> str | None:
    """This command's log file (None when logging was not set up by the CLI)."""
    return _state["log_file"]  # type: ignore[return-value]


def setup_logging(verbosity: int = 0, stage: str | None = None) -> str | None:
    """Console + per-command log file; returns the log file path (None when it cannot be created)."""
    _state["verbose"] = verbosity > 0
    if not verbosity:  # MLflow attaches its own stderr handler on import unless told not to
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
        _quiet_mlflow_handler()
    level = getattr(logging, os.environ.get("RAYPIPE_LOG_LEVEL", "").upper(), logging.INFO)
    console = logging.StreamHandler(_CurrentStderr())
    console.setLevel(logging.DEBUG if verbosity > 1 else max(level, logging.INFO))
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_ConsoleFilter())
    _state["console"] = console
    handlers: list[logging.Handler] = [console]
    path = None
    if stage is not None:
        folder = Path(os.environ.get("RAYPIPE_LOG_DIR", "raypipe-logs"))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stage}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
            file = logging.FileHandler(path)
            file.setLevel(logging.DEBUG)
            file.setFormatter(logging.Formatter(FORMAT))
            handlers.append(file)
        except OSError:
            path = None
    logging.basicConfig(level=logging.DEBUG if verbosity > 1 else level, handlers=handlers, force=True)
    logging.getLogger("raypipe").setLevel(logging.DEBUG)  # plans and details reach the file, not the console
    logging.captureWarnings(True)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _state["log_file"] = str(path) if path else None
    return _state["log_file"]  # type: ignore[return-value]


def _quiet_mlflow_handler() -> None:
    """MLflow imported before the CLI set up logging (a test session, a notebook, a job driver that imported it)
    already has its own stderr handler, which would print its INFO lines ("Creating initial MLflow database
    tables...") past the console filter: drop it and let its records reach the handlers set up here."""
    mlflow_log = logging.getLogger("mlflow")
    for handler in list(mlflow_log.handlers):
        if type(handler) is logging.StreamHandler:
            mlflow_log.removeHandler(handler)
    mlflow_log.propagate = True


def quiet_ray_data() -> None:
    """Ray Data logs to its own console handler (execution plans, progress every 10 s): keep only its errors there
    unless -v; its session file ``ray-data.log`` keeps everything."""
    if verbose():
        return
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.ERROR)


def console_is_tty() -> bool:
    """Whether the console handler writes to a terminal (progress redrawn in place) or a pipe / file."""
    handler = _state["console"]
    stream = getattr(handler, "stream", sys.stderr)
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def console_write(text: str) -> None:
    handler = _state["console"]
    stream = getattr(handler, "stream", sys.stderr)
    try:
        stream.write(text)
        stream.flush()
    except (ValueError, OSError):  # the console went away: progress is cosmetic
        pass


@contextmanager
def stderr_to_log_file() -> Iterator[None]:
    """Send fd 2 to this command's log file for the duration (not with -v, nor without a log file)."""
    path, handler = _state["log_file"], _state["console"]
    if verbose() or not path or not isinstance(handler, logging.StreamHandler):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    console = os.fdopen(saved, "w", buffering=1, closefd=False)
    previous = handler.setStream(console)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        handler.setStream(previous or _CurrentStderr())
        console.close()
        os.close(saved)
