"""Smoke runs of the benchmarks that have no test of their own: each starts, measures and prints its ratios on
a tiny problem, so that a change that breaks one shows in CI (their numbers come from full runs, not from here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                            text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_device_check_smoke(tmp_path: Path) -> None:
    """The prepared GPU check, every part on the CPU at toy sizes: each part exits 0 and $OUT holds the three files
    it names (the device tool brings back at most 8). Its bench_speed part is the benchmark's smoke run: at
    4x3x40x40 compile=True runs eager (policy._CPU_LAYOUT), timed as candidates of their own beside both compiled
    layouts, so every candidate and ratio the benchmark has on a CPU is printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "OUT": str(tmp_path), "DEVICE": "cpu",
           "SMOKE": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], capture_output=True, text=True,
                            env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bench_speed.txt", "device_check.log", "report.json"]
    report = json.loads((tmp_path / "report.json").read_text())
    log = (tmp_path / "device_check.log").read_text()
    assert {name: part["exit_status"] for name, part in report["parts"].items()} == dict.fromkeys(
        ["setup", "cuda_tests", "bench_epoch", "fit_priors", "bench_speed"], 0), log[-3000:]
    assert list(report["epochs"]) == ["none", "bf16"] and report["epochs"]["bf16"]["steps"] == 4  # 2 + 2 batches
    out = (tmp_path / "bench_speed.txt").read_text()
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


def test_bench_export_smoke() -> None:
    out = _run("bench_export.py", "--size", "16", "--draws", "10")
    assert "Rotate" in out and "Default policy" in out and "albumentations" in out
