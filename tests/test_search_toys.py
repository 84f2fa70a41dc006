"""Stage II optimises what it claims, on toys whose answer is known (benchmarks/bench_estimator.py holds the toys
and prints the README's table): the relaxed-Bernoulli gradient of one op's apply probability against the exact
p (1 - p) (L(aug) - L(x)), and Eq. 2's search against a grid optimum, with its runaway when the teacher term goes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_estimator.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_estimator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_relaxed_bernoulli_gradient_is_unbiased_at_the_default_temperature_and_shrinks_when_warm() -> None:
    torch.set_num_threads(1)
    bench = _bench()
    exact, cold = bench.estimator_draws(0.05, draws=400)
    _, warm = bench.estimator_draws(1.0, draws=400)
    standard_error = float(cold.std()) / math.sqrt(len(cold))
    # At tau = 0.05 the relaxed gate is almost a hard one: the draws' mean is the exact gradient within 4 standard
    # errors of a 400-draw mean (seeded, so the test is deterministic; 4 SE keeps it from resting on luck).
    assert abs(float(cold.mean()) - exact) < 4 * standard_error
    # ... at the price of noise: one draw's spread exceeds the gradient itself (what a single Stage II step sees).
    assert float(cold.std()) > abs(exact)
    # At tau = 1 the relaxation biases the gradient toward zero by far more than its own standard error.
    warm_error = float(warm.std()) / math.sqrt(len(warm))
    assert 0 < float(warm.mean()) < exact - 10 * warm_error
    assert float(warm.std()) < float(cold.std())


def test_eq2_search_reaches_the_grid_optimum_and_runs_away_without_the_teacher() -> None:
    torch.set_num_threads(1)
    bench = _bench()
    optimum = bench.toy_grid_optimum()  # 0.001 apart
    assert 0.05 < optimum < 0.95  # an interior optimum: the two terms pull against each other
    path = bench.toy_search(alpha=1.0)
    found = 1 / (1 + math.exp(-path[-1]))
    assert abs(found - optimum) <= 0.002  # within two grid steps
    runaway = bench.toy_search(alpha=0.0)
    # The student term alone keeps pushing m to its bound (the mirror image fools every student answer).
    assert 1 / (1 + math.exp(-runaway[-1])) > 0.99
    assert runaway[-1] > runaway[len(runaway) // 2] > runaway[99] > 0
