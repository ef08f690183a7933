"""Every benchmark script still starts: its imports resolve and it parses its flags.
(A moved function once left a benchmark importing a name that was no longer there,
and another timing nothing: this catches the first kind at once.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_")
                 and p.name != "make_model.py")


def test_the_benchmarks_are_found() -> None:
    assert {"fleet.py", "attest_rate.py", "encrypt_throughput.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_starts(script: Path) -> None:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower() or done.stdout.strip(), done.stdout
