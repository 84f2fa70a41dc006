"""The distillation experiment harness (benchmarks/bench_distill.py): a one-seed, one-epoch smoke run of every arm
on both tasks, its resume, and the statistics behind its tables."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_distill.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_smoke_run_of_every_arm_on_both_tasks_and_its_resume(tmp_path: Path) -> None:
    args = ["--epochs", "1", "--teacher-epochs", "1", "--seeds", "0", "--jobs", "1",
            "--results", str(tmp_path / "runs.json"), "--cache-dir", str(tmp_path / "teachers")]
    out = _run(*args, "--split", "validation")
    assert "2 teachers and 10 runs to go" in out
    stored = json.loads((tmp_path / "runs.json").read_text())
    assert len(stored["runs"]) == 10 and len(stored["teachers"]) == 2
    arms = {(r["config"]["task"], r["config"]["arm"]) for r in stored["runs"]}
    assert arms == {(t, a) for t in ("mnist", "photos") for a in ("student", "kd", "fixed", "randaugment", "tst")}
    for r in stored["runs"]:
        assert 0 <= r["result"]["validation"] <= 1 and 0 <= r["result"]["test"] <= 1
        assert r["result"]["validation"] == r["result"]["validation_curve"][-1]
        if r["config"]["arm"] == "tst":
            assert r["result"]["search"] and set(r["result"]["policy"]) >= {"Rotate", "Invert"}
    assert "| tst − kd | 1 |" in out and "photos, 1 epochs, validation accuracy" in out
    again = _run(*args, "--split", "validation")  # resumed: nothing is trained twice
    assert "10 of 10 runs already" in again and "0 teachers and 0 runs to go" in again
    assert json.loads((tmp_path / "runs.json").read_text()) == stored
    test = _run(*args, "--split", "test")  # the same runs, their test numbers: nothing trained again
    assert "10 of 10 runs already" in test and "photos, 1 epochs, test accuracy" in test

    # The dose arms: frozen replays the same seed's tst-long policy, pruned leaves out Invert and Solarize.
    out = _run(*args, "--split", "validation", "--tasks", "mnist", "--arms", "tst-long", "frozen", "pruned",
               "--long-search-steps", "3")
    assert "0 teachers and 3 runs to go" in out and "| tst-long − frozen | 1 |" in out
    runs = {r["config"]["arm"]: r for r in json.loads((tmp_path / "runs.json").read_text())["runs"]
            if r["config"]["task"] == "mnist"}
    assert runs["tst-long"]["config"]["search_steps"] == 3 == runs["frozen"]["config"]["search_steps"]
    assert set(runs["tst-long"]["result"]["logits"]) == {"probability_logits", "magnitude_logits"}
    block = runs["tst-long"]["result"]["search"][0]
    assert {"max_dp", "max_dm", "teacher_accuracy", "grad_cosine"} <= set(block)
    assert "search" not in runs["frozen"]["result"] and "search" not in runs["pruned"]["result"]
    assert runs["frozen"]["result"]["policy"] == runs["tst-long"]["result"]["policy"]
    assert runs["tst-long"]["result"]["policy"] != runs["pruned"]["result"]["policy"]
    assert set(runs["pruned"]["result"]["policy"]) == {*runs["tst-long"]["result"]["policy"]} - {"Invert", "Solarize"}


def test_records_of_the_first_format_are_read_as_one_split() -> None:
    old = {"config": {"task": "mnist", "arm": "kd", "seed": 0, "split": "validation"},
           "result": {"accuracy": 0.9, "seconds": 1.0}}
    assert _bench()._upgrade(old) == {"config": {"task": "mnist", "arm": "kd", "seed": 0},
                                      "result": {"validation": 0.9, "seconds": 1.0}}


def test_equivalence_is_two_one_sided_tests_at_the_margin() -> None:
    bench = _bench()
    # mean 0.125, sd 0.0957, n = 4: 90 % half-width 2.353 * 0.0957 / 2 = 0.113, inside (-0.5, 0.5).
    assert bench.equivalence([0.0, 0.1, 0.2, 0.2]) == "equivalent (90 % [+0.01, +0.24])"
    assert bench.equivalence([0.45, 0.55, 0.5, 0.5]).startswith("not shown")  # the interval crosses +0.5
    assert bench.equivalence([1.0]) == "n/a"


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    bench = _bench()
    differences = [1.0, 2.5, -0.5, 3.0, 1.5]
    mean, half = bench.paired_interval(differences)
    assert mean == pytest.approx(1.5)
    # t(0.975, 4 degrees of freedom) = 2.776 (a table value), times the standard error of the mean.
    assert half == pytest.approx(2.776 * statistics.stdev(differences) / math.sqrt(5))
    assert math.isnan(bench.paired_interval([1.0])[1])


def test_settings_grid_is_the_product_over_the_defaults() -> None:
    bench = _bench()
    grid = bench._parse_settings(["magnitude_sampling=mean,uniform", "search_lr=0.01,0.1"])
    assert len(grid) == 4 and grid[1]["search_lr"] == 0.1 and grid[1]["magnitude_sampling"] == "mean"
    assert all(g["beta"] == bench.DEFAULTS["beta"] for g in grid)
    with pytest.raises(SystemExit, match=r"--set must be NAME=V1\[,V2...\] with NAME one of"):
        bench._parse_settings(["colour=1"])


def test_epochs_for_every_task_or_per_task() -> None:
    bench = _bench()
    assert bench._parse_epochs(["80"]) == {"*": [80]}
    assert bench._parse_epochs(["mnist=80", "photos=40", "photos=20"]) == {"mnist": [80], "photos": [40, 20]}
    with pytest.raises(SystemExit, match=r"--epochs takes E or TASK=E with TASK one of \['mnist', 'photos'\]; got 'cifar=3'"):
        bench._parse_epochs(["cifar=3"])


def test_report_pairs_arms_and_settings_by_seed() -> None:
    bench = _bench()

    def record(arm: str, seed: int, accuracy: float, **settings) -> dict:
        config = {"task": "mnist", "arm": arm, "seed": seed, "epochs": 2, "teacher_epochs": 1,
                  "settings": {**bench.DEFAULTS, **settings}}
        return {"config": config, "result": {"validation": accuracy}}

    runs = [record("kd", s, 0.90 + 0.01 * s) for s in range(3)]
    runs += [record("tst", s, 0.91 + 0.01 * s + 0.001 * s) for s in range(3)]
    runs += [record("tst", s, 0.92 + 0.01 * s, search_lr=0.1) for s in range(3)]
    text = bench.report(runs, "validation")
    # tst - kd per seed: +1.0, +1.1, +1.2 points; mean +1.1, interval 4.303 * 0.1 / sqrt(3) = 0.25 wide each side.
    # The 90 % interval for the equivalence test: 2.920 * 0.1 / sqrt(3) = 0.17 each side, outside +-0.5.
    assert "| tst − kd | 3 | +1.10 [+0.85, +1.35] | not shown (90 % [+0.93, +1.27]) |" in text
    assert "| mnist | tst | {'search_lr': 0.1} − default | 3 | +0.90 [+0.65, +1.15] |" in text


def test_policy_movement_reads_the_two_numbers_of_a_full_policy() -> None:
    """policy() also states what the numbers mean (dicts, sentences); the movement averages only p and m."""
    from diffaug import ReferencePolicy

    policies = [ReferencePolicy(probability={"Rotate": p}, magnitude={"Rotate": 0.9}).policy() for p in (0.7, 0.9)]
    moved = _bench().policy_movement(policies)
    assert moved["probability"] == pytest.approx(0.3, abs=1e-6)  # (0.2 + 0.4) / 2, float32 logits
    assert moved["ops"]["Rotate"] == {"probability": 0.8, "magnitude": 0.9}
