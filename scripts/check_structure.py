"""Two structural promises of docs/internals.md, measured (issue #11):

1. The core path (engine, scheduler, cache, runner, step, CUDA graphs, attention) has no
   function over about 40 lines (docstring and comments included: what a reader reads).
2. Nothing outside radixserve/engine.py reads the engine's internals (`cache`, `scheduler`,
   `runner`, `requests`, `loaded`, `sampler`, `guide_factory`): the server, the advisor, the
   benchmarks and the tests use its public surface. Found by name: an attribute read on an
   expression whose last name says "engine" (`engine.cache`, `server.engine.runner`,
   `self._engine.requests`). Profilers that time internals on purpose are listed in PROBES.

    python scripts/check_structure.py [--max-lines 40]      # exit status 1 if anything is over

Run from the repository root.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

CORE = ["radixserve/engine.py", "radixserve/scheduler.py", "radixserve/runner.py", "radixserve/step.py",
        "radixserve/cuda_graphs.py", "radixserve/cache/*.py", "radixserve/model/*attention*.py"]
ENGINE_INTERNALS = {"cache", "scheduler", "runner", "requests", "loaded", "sampler", "guide_factory"}
SCANNED = ["radixserve/**/*.py", "tests/**/*.py", "bench/**/*.py"]
# Device profilers that time the runner's graphs and kernels directly, across code versions.
PROBES = {"bench/bench_gpu.py", "bench/profile_decode_b32.py", "bench/bench_host_step.py",
          "bench/guided_overhead.py", "bench/bench_tiers_gpu.py", "bench/probe_b32_in_sequence.py",
          "bench/probe_steps.py", "bench/bench_admission.py"}
# White-box tests of the tier wiring: they spy on the forward (bitwise logits), and read the cost
# model, the store's counters and the pending transfers, which no public surface should carry;
# and the decode graphs' host buffer checked against every step the runner is given.
WHITE_BOX = {"tests/engine/test_tiers.py", "tests/engine/test_cache_policy.py", "tests/engine/test_decode_graph_buffer.py"}


def long_functions(root: Path, max_lines: int) -> list[tuple[int, str, str, int]]:
    """(lines, file, qualified name, first line) of every function longer than max_lines."""
    found = []
    for pattern in CORE:
        for path in sorted(root.glob(pattern)):
            tree = ast.parse(path.read_text())
            for node, qualname in _functions(tree):
                lines = node.end_lineno - node.lineno + 1
                if lines > max_lines:
                    found.append((lines, str(path.relative_to(root)), qualname, node.lineno))
    return sorted(found, reverse=True)


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, prefix + node.name
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def engine_internal_reads(root: Path) -> list[tuple[str, int, str]]:
    """(file, line, source text) of each read of an engine internal outside the engine."""
    found = []
    for pattern in SCANNED:
        for path in sorted(root.glob(pattern)):
            rel = str(path.relative_to(root))
            if rel == "radixserve/engine.py" or rel in PROBES or rel in WHITE_BOX:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS and _names_an_engine(node.value):
                    found.append((rel, node.lineno, ast.unparse(node)))
    return found


def _names_an_engine(expr: ast.expr) -> bool:
    name = expr.attr if isinstance(expr, ast.Attribute) else expr.id if isinstance(expr, ast.Name) else ""
    return "engine" in name.lower() and "config" not in name.lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-lines", type=int, default=40)
    args = parser.parse_args()
    root = Path.cwd()
    over = long_functions(root, args.max_lines)
    print(f"core-path functions over {args.max_lines} lines: {len(over)}")
    for lines, path, name, lineno in over:
        print(f"  {lines:4d}  {path}:{lineno}  {name}")
    reads = engine_internal_reads(root)
    print(f"reads of engine internals outside the engine: {len(reads)}")
    for path, lineno, text in reads:
        print(f"  {path}:{lineno}  {text}")
    return 1 if over or reads else 0


if __name__ == "__main__":
    sys.exit(main())
