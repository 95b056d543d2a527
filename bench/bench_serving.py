"""The serving suite (prefix caching on vs off over HTTP), as a bench/ script.

    .venv/bin/python bench/bench_serving.py [radixserve bench suite options]

Same as `radixserve bench suite ...` (see radixserve/benchmark/); writes the section
serving-<label> of docs/benchmarks.md and its PNGs under docs/bench/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from radixserve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "suite", *sys.argv[1:]]))
