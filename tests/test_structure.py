"""The structural promises of docs/internals.md (issue #11), kept: scripts/check_structure.py
must find no core-path function over 40 lines and no read of the engine's internals outside
radixserve/engine.py. A branch that breaks either fails here, with the offending lines listed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_functions_are_short_and_engine_internals_stay_inside():
    result = subprocess.run([sys.executable, "scripts/check_structure.py"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "over 40 lines: 0" in result.stdout and "outside the engine: 0" in result.stdout
