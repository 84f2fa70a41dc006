"""The TST losses against a direct float64 implementation of Eq. 1 and Eq. 2, and their numerical stability."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffaug import DiffAugError
from diffaug.distill import kd_loss, log_one_minus_softmax, tst_loss


def kd_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float, w_ce: float, w_kl: float) -> float:
    s, t = s.double(), t.double()
    p_s = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    ce = -torch.log(p_s[torch.arange(len(y)), y])
    q_t = torch.exp(t / tau) / torch.exp(t / tau).sum(1, keepdim=True)
    q_s = torch.exp(s / tau) / torch.exp(s / tau).sum(1, keepdim=True)
    kl = (q_t * (torch.log(q_t) - torch.log(q_s))).sum(1)
    return float((w_ce * ce + w_kl * tau**2 * kl).mean())


def tst_reference(t: torch.Tensor, s: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    t, s = t.double(), s.double()
    rows = torch.arange(len(y))
    p_t = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    p_s = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    return float((alpha * -torch.log(p_t[rows, y]) + beta * -torch.log(1 - p_s[rows, y])).mean())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), batch=st.integers(1, 8), classes=st.integers(2, 12),
       scale=st.floats(0.1, 8.0), tau=st.sampled_from([1.0, 2.0, 4.0]), w=st.floats(0.0, 2.0))
def test_losses_match_float64_formulas(seed: int, batch: int, classes: int, scale: float, tau: float, w: float) -> None:
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(batch, classes, generator=g) * scale, torch.randn(batch, classes, generator=g) * scale
    y = torch.randint(classes, (batch,), generator=g)
    # float32 arithmetic: a relative error of 1e-5 is a few ulps of the terms; the KL term is a difference of
    # log-probabilities of size ~log(C), each off by an ulp (~1e-7), times tau^2 = 16: hence abs 1e-5.
    assert float(kd_loss(s, t, y, tau, w, 2 - w)) == pytest.approx(kd_reference(s, t, y, tau, w, 2 - w), rel=1e-5, abs=1e-5)
    assert float(tst_loss(t, s, y, w, 2 - w)) == pytest.approx(tst_reference(t, s, y, w, 2 - w), rel=1e-5, abs=1e-6)


def test_golden_values() -> None:
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]])
    y = torch.tensor([0, 2])
    # Values from the float64 formulas above, written out so that a change in either shows.
    assert float(tst_loss(t, s, y)) == pytest.approx(tst_reference(t, s, y, 1, 1), rel=1e-6)
    assert float(tst_loss(t, s, y)) == pytest.approx(3.2725, abs=1e-4)  # by hand: (0.862 + 1.540 + 1.741 + 2.402) / 2
    assert float(kd_loss(s, t, y)) == pytest.approx(kd_reference(s, t, y, 4.0, 1, 1), rel=1e-6)
    assert float(kd_loss(s, t, y)) == pytest.approx(1.3371, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stable_for_huge_logits(dtype: torch.dtype) -> None:
    """p_S[y] rounds to exactly 1: log(1 - p + eps) would give log(eps); the exact value is -(z_y - z_other)."""
    s = torch.tensor([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]], dtype=dtype)
    y = torch.tensor([0, 1])
    # Exact for the logits as stored (bfloat16 stores 1e4 as 9984): log(1 - p_y) = logsumexp(others) - z_y.
    z = s.double()
    exact = [float(torch.logsumexp(z[0, 1:], 0) - z[0, 0]), float(torch.logsumexp(z[1, [0, 2]], 0) - z[1, 1])]
    assert log_one_minus_softmax(s, y).tolist() == pytest.approx(exact, rel=1e-6)
    loss = tst_loss(s, s, y)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(-sum(exact) / 2, rel=1e-6)  # teacher CE ~ 0
    assert torch.isfinite(kd_loss(s, s.flip(1), y))
    s.requires_grad_(True)
    tst_loss(s, s, y).backward()
    assert torch.isfinite(s.grad).all()


def test_student_term_grows_as_the_student_gets_it_right() -> None:
    y = torch.tensor([0])
    wrong, right = torch.tensor([[0.0, 3.0]]), torch.tensor([[3.0, 0.0]])
    teacher = torch.tensor([[3.0, 0.0]])
    assert float(tst_loss(teacher, right, y)) > float(tst_loss(teacher, wrong, y))


def test_bad_inputs_raise() -> None:
    with pytest.raises(DiffAugError, match=r"targets must be integer class indices of shape \(2,\); got torch.float32"):
        tst_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(DiffAugError, match=r"same shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DiffAugError, match=r"at least 2 classes"):
        tst_loss(torch.randn(2, 1), torch.randn(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DiffAugError, match=r"temperature must be positive"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)
