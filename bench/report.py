"""Writes benchmark results into docs/benchmarks.md, one marked section per benchmark.

Every section carries the command that produced it, the machine and the date, so each figure
quoted anywhere in the project can be traced back and reproduced.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
_HEADER = """# Benchmarks

Every figure here was written by a script in bench/, with the command, the machine and the date
beside it. Re-run the command to reproduce a section; it replaces only its own section.
Comparisons are ratios measured side by side in one run (these machines are noisy).
"""


def machine_description() -> str:
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        return f"{gpu}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]  # other work on the machine skews absolute figures; ratios hold better
    return (
        f"CPU only: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load:.1f} at the end of the run"
    )


def command_line() -> str:
    script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([".venv/bin/python", script, *map(shlex.quote, sys.argv[1:])])


def update_section(
    name: str,
    title: str,
    body: str,
    path: Path = BENCHMARKS_MD,
    *,
    command: str | None = None,
    machine: str | None = None,
    date: str | None = None,
) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md.

    command / machine / date default to this process's; give them when the results were
    measured elsewhere (a `radixserve bench` run on the GPU machine, rendered here)."""
    stamp = date or datetime.date.today().isoformat()
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"- command: `{command or command_line()}`\n- machine: {machine or machine_description()}\n- date: {stamp}\n\n"
        f"{body.strip()}\n<!-- END {name} -->"
    )
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
