"""The benchmark scripts the README and docs/ tell users to run still start.

They are not run here (speed is measured in the benchmarks, never in tests), but a script
whose imports broke when code moved (``benchmarks/ray_engine.py`` imported a function
``throughput.py`` no longer had) fails before printing a figure; ``--help`` catches that.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_named_in_the_readme_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the measured figures live in docs/
    named = set(re.findall(r"benchmarks/(\w+\.py)", "\n".join(p.read_text(encoding="utf-8") for p in pages)))
    assert len(named) >= 5 and named <= {p.name for p in BENCHMARKS}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_starts(script: Path):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=script.parent.parent
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
