"""The README's and docs/OPERATIONS.md's shell commands, run as written, in order, in a scratch copy of the repo.

A new user copies commands from the README in order, from the repository root, with relative paths. This test
does the same: it reads the ``bash`` / ``sh`` / ``console`` code blocks of each document at run time (so a changed
command is tested as changed), copies the checkout (tracked and not-ignored files: what a clone has) into a
scratch folder whose ``.venv`` is this test run's virtual environment, and runs each block there with bash,
expecting exit 0 (or the exit code the doc states). The demo runs once, as written (``make demo``); the commands
after it use its output, as they would for the user.

Markers, as an HTML comment on the line(s) right above a block (the reason is required and shown in the doc):

    <!-- docs-test: skip: REASON -->                 the whole block is not run here
    <!-- docs-test: skip `COMMAND PREFIX`: REASON --> only the lines that start with that prefix are not run
    <!-- docs-test: exit N -->                        the block (a ``console`` example) exits with N
    <!-- docs-test: cluster: HOW -->                  needs a Ray cluster: tests/e2e/test_job_submit.py runs it
                                                      against its local token-auth cluster instead

``console`` blocks hold ``$ command`` lines followed by the output the doc shows; that output must appear.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from docs_blocks import Block, parse_blocks

# The README run (demo, its rerun, eval, sweep) is one fixture of ~7 min on 2 CPUs; the per-test default is 900 s.
pytestmark = [pytest.mark.stops_session_ray, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/OPERATIONS.md")
def test_every_shell_block_is_run_or_says_why_not() -> None:
    """The parser sees the documents' blocks; each one is run, or carries a stated reason in the doc itself."""
    blocks = [b for doc in DOCS for b in parse_blocks(doc)]
    readme = [b for b in blocks if b.doc == "README.md"]
    assert any("make demo" in b.script() for b in readme), "README's set-up block not found"
    assert any("raypipe tune -c sweep_demo" in b.script() for b in readme), "README's sweep command not found"
    for b in blocks:
        assert b.skip is None or len(b.skip) > 10, f"{b.where}: a skipped block needs a reason"
        assert b.cluster is None or b.doc != "README.md", f"{b.where}: README commands run without a cluster"
        assert b.skip is not None or b.script().strip(), f"{b.where}: nothing to run"
        for prefix, reason in b.skip_lines.items():
            assert prefix in b.text and len(reason) > 10, (b.where, prefix)
    assert sum(b.skip is None for b in blocks) >= 3
    assert any(b.cluster for b in blocks), "the token-auth block of docs/OPERATIONS.md runs against a local cluster"


# ------------------------------------------------------------------------------------------- running them


def _copy_checkout(dest: Path) -> None:
    """What a clone of this checkout holds: tracked files plus untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # ./presets -> raypipe/presets
            if not dst.is_symlink():
                dst.symlink_to(os.readlink(src))
        elif src.is_file():
            shutil.copy2(src, dst)


def _scratch_venv(dest: Path) -> None:
    """``.venv`` = this run's virtual environment, already installed: `make` finds its stamp newer than
    pyproject.toml and installs nothing; PYTHONPATH (below) makes the scratch copy's raypipe the one imported."""
    venv = dest / ".venv"
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.executable).parent, target_is_directory=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(sys.executable).parent}\n")
    stamp = venv / ".installed-stamp"
    stamp.touch()
    later = time.time() + 5
    os.utime(stamp, (later, later))


@dataclass
class Ran:
    block: Block
    rc: int
    output: str
    seconds: float


_MARK = "@@docs-test"


def _doc_script(blocks: list[Block]) -> str:
    """One bash script for the blocks of a document, in order, as a user types them into ONE shell (a `source`
    in one block holds for the next). A block stops the script at its first failing command (named on stderr)
    unless the doc states another exit code for it; markers on stdout delimit each block's output."""
    trap = "trap 'echo \"docs-test: command failed: $BASH_COMMAND\" >&2' ERR"
    lines = [trap]
    for i, block in enumerate(blocks):
        lines.append(f'echo "{_MARK} start {i} $SECONDS"')
        if block.exit_code == 0:
            lines += ["set -e", block.script(), "set +e", f'echo "{_MARK} end {i} 0 $SECONDS"']
        else:
            lines += ["trap - ERR", block.script(), "__rc=$?", trap, f'echo "{_MARK} end {i} $__rc $SECONDS"',
                      f'[ "$__rc" -eq {block.exit_code} ] || exit 1']
    return "\n".join(lines) + "\n"


def _run_doc(blocks: list[Block], cwd: Path, env: dict[str, str], timeout: float) -> list[Ran]:
    """Run ``blocks`` in one shell; a block's rc is its own (the shell's exit code for the block it stopped in)."""
    try:
        res = subprocess.run(["bash", "-c", _doc_script(blocks)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=timeout)
        shell_rc, out = res.returncode, res.stdout
    except subprocess.TimeoutExpired as exc:
        shell_rc, out = -1, f"{exc.stdout or ''}\ndocs-test: timed out after {timeout:.0f} s"
    ran: list[Ran] = []
    current, start, buf = None, 0.0, []
    for line in out.splitlines():
        if line.startswith(f"{_MARK} start "):
            _, _, i, t = line.split()
            current, start, buf = int(i), float(t), []
        elif line.startswith(f"{_MARK} end ") and current is not None:
            _, _, i, rc, t = line.split()
            ran.append(Ran(blocks[current], int(rc), "\n".join(buf), float(t) - start))
            current = None
        else:
            buf.append(line)
    if current is not None:  # the block the shell stopped in
        ran.append(Ran(blocks[current], shell_rc if shell_rc != 0 else -1, "\n".join(buf), float("nan")))
    return ran


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    # The demo starts a Ray instance of its own: the session's must be down (two on one host confuse Ray Train's
    # address discovery). This module is ordered last in the session for that reason (tests/conftest.py).
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    keep = os.environ.get("RAYPIPE_DOCS_SCRATCH")  # for working on this test: reuse a scratch folder (and its demo)
    dest = Path(keep) if keep else tmp_path_factory.mktemp("docs_clone")
    if keep and (dest / ".venv").exists():
        shutil.rmtree(dest / ".venv")
    dest.mkdir(parents=True, exist_ok=True)
    _copy_checkout(dest)
    _scratch_venv(dest)
    return dest


@pytest.fixture(scope="module")
def readme_run(scratch: Path) -> list[Ran]:
    """Every README block, in order, in one shell (stops at the first block that fails: later ones depend on it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env.update(PYTHONPATH=str(scratch), HF_HUB_OFFLINE="1", VIRTUAL_ENV=str(scratch / ".venv"))
    blocks = [b for b in parse_blocks("README.md") if b.skip is None and b.cluster is None]
    return _run_doc(blocks, scratch, env, timeout=1500)


def test_readme_commands_run_as_written(readme_run: list[Ran]) -> None:
    for r in readme_run:
        assert r.rc == r.block.exit_code, (
            f"{r.block.where}: exit {r.rc}, the doc expects {r.block.exit_code}\n{r.output[-6000:]}"
        )
        for line in r.block.expected_output():
            assert line in r.output, f"{r.block.where}: output lacks the documented line {line!r}\n{r.output[-3000:]}"
    ran = {r.block.where for r in readme_run}
    assert ran == {b.where for b in parse_blocks("README.md") if b.skip is None and b.cluster is None}
    print("\n".join(f"{r.block.where}: {r.seconds:.0f} s" for r in readme_run))


def test_demo_rerun_is_incremental(readme_run: list[Ran], scratch: Path) -> None:
    """The README's second `make demo`: no video embedded or labelled again, the training run reused."""
    assert all(r.rc == r.block.exit_code for r in readme_run), "a README command failed (see the test above)"
    demo_runs = [r for r in readme_run if "make demo" in r.block.script()]
    assert len(demo_runs) >= 2, "the README runs the demo twice (the second run is the incremental one)"
    report = json.loads((scratch / "demo_out" / "demo_report.json").read_text())  # written by the last demo run
    assert report["embed"]["videos_processed"] == 0 and report["embed"]["videos_skipped"] == report["embed"]["videos_listed"]
    assert report["label"]["labelled"] == 0 and report["label"]["skipped"] == report["label"]["videos_seen"] > 0
    assert report["timings_s"]["train"] < 15, report["timings_s"]  # a training run would take minutes
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{scratch / 'demo_out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raypipe")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'raypipe-train'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the demo trained once, however often it ran


def test_sweep_prints_every_trial_and_exports_the_best_config(readme_run: list[Ran], scratch: Path) -> None:
    """`raypipe tune -c sweep_demo` after the demo: every trial finished with a metric, the best config exported."""
    import yaml

    from raypipe.config import load_config

    assert all(r.rc == r.block.exit_code for r in readme_run), "a README command failed (see the test above)"
    sweep = next(r for r in readme_run if "raypipe tune -c sweep_demo" in r.block.script())
    sweep_dir = scratch / "demo_out" / "ray_results" / "sweep-demo"
    lines = sweep.output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("trial ") and "best val/f_sco" in line)
    header = re.split(r"\s{2,}", lines[top].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[top + 2 :] if re.match(r"^\w+_\d{5}\b", line)]
    assert len(rows) == 4, lines[top:]  # the preset's num_samples, each in the printed table
    for row in rows:
        assert float(row[header.index("best val/f_sco")]) >= 0 and row[header.index("status")] == "TERMINATED", row
    assert sum(row[0].endswith(" *") for row in rows) == 1 and "best trial" in sweep.output
    print("\n".join(lines[top - 1 : top + 2 + len(rows)]))  # the table as printed (shown with pytest -s)
    best = sweep_dir / "best_config.yaml"
    cfg = load_config(str(best))
    assert Path(cfg.train.taxonomy).is_absolute() and Path(cfg.train.data).is_dir()
    assert "tune" not in yaml.safe_load(best.read_text())
