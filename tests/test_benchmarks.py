"""Smoke runs of the benchmarks that have no test of their own: each starts, measures and prints its ratios on
a tiny problem, so that a change that breaks one shows in CI (their numbers come from full runs, not from here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_speed_smoke() -> None:
    # At 4x3x40x40 compile=True runs eager (policy._CPU_LAYOUT), timed as candidates of their own beside both
    # compiled layouts: every candidate and ratio the benchmark has on a CPU.
    out = _run("bench_speed.py", "--shapes", "4x40", "--repeats", "1")
    assert "== 4x3x40x40" in out and "composed / residual geometry" in out
    assert "eager* layout for eval forwards here, eager* for train steps" in out
    ops = [line.split()[-2] for line in out.splitlines() if line.strip().startswith("ours train fwd+bwd")]
    assert ops and int(ops[0]) > 0  # the dispatched-op count was measured


def test_bench_overhead_smoke() -> None:
    out = _run("bench_overhead.py", "--batch", "4", "--rounds", "1")
    assert out.count("ratio") == 2


def test_bench_fidelity_smoke() -> None:
    out = _run("bench_fidelity.py", "--count", "4")
    assert "Rotate" in out and "Brightness" in out
