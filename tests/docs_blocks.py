"""Shell code blocks of the docs, with their ``docs-test`` markers (used by tests/e2e/test_docs.py and
tests/e2e/test_job_submit.py; the marker syntax is described in test_docs.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip(?:\s+`([^`]+)`)?\s*:\s*(\S.*)$")
_EXIT = re.compile(r"^exit\s+(\d+)$")
_CLUSTER = re.compile(r"^cluster\s*:\s*(\S.*)$")


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None  # reason the whole block is not run
    skip_lines: dict[str, str] = field(default_factory=dict)  # command prefix -> reason
    exit_code: int = 0
    cluster: str | None = None  # run by test_job_submit.py against its local cluster (not in the docs run)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def script(self) -> str:
        """What bash runs: the block without skipped lines (a ``console`` block: its ``$`` lines only)."""
        if self.lang == "console":
            return "\n".join(line[2:] for line in self.text.splitlines() if line.startswith("$ "))
        return "\n".join(
            line for line in self.text.splitlines()
            if not any(line.lstrip().startswith(prefix) for prefix in self.skip_lines)
        )

    def expected_output(self) -> list[str]:
        if self.lang != "console":
            return []
        return [line for line in self.text.splitlines() if line.strip() and not line.startswith("$ ")]


def parse_blocks(doc: str) -> list[Block]:
    """Every fenced code block of ``doc`` with a shell language, with the markers above it."""
    lines = (REPO / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in SHELL_LANGS:
            block = Block(doc, start + 1, lang, "\n".join(lines[start + 1 : j]))
            k = start - 1
            while k >= 0 and (marker := _MARKER.match(lines[k])):
                _apply_marker(block, marker.group(1))
                k -= 1
            blocks.append(block)
        i = j + 1
    return blocks


def _apply_marker(block: Block, text: str) -> None:
    if m := _SKIP.match(text):
        if m.group(1):
            block.skip_lines[m.group(1)] = m.group(2)
        else:
            block.skip = m.group(2)
    elif m := _EXIT.match(text):
        block.exit_code = int(m.group(1))
    elif m := _CLUSTER.match(text):
        block.cluster = m.group(1)
    else:
        raise ValueError(f"{block.where}: unknown docs-test marker {text!r}")


