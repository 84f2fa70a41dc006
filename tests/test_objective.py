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
    with pytest.raises(DiffAugError, match=r"targets must be integer class indices of shape \(2,\); got float32"):
        tst_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(DiffAugError, match=r"same shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DiffAugError, match=r"at least 2 classes"):
        tst_loss(torch.randn(2, 1), torch.randn(2, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DiffAugError, match=r"temperature must be a positive finite number"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0)


def dkd_reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, tau: float) -> float:
    """Zhao et al. (2022), Eq. 7, in float64 straight from the definitions."""
    p_s, p_t = torch.softmax(s.double() / tau, 1), torch.softmax(t.double() / tau, 1)
    total = 0.0
    for i, label in enumerate(y.tolist()):
        b_s = torch.stack([p_s[i, label], 1 - p_s[i, label]])
        b_t = torch.stack([p_t[i, label], 1 - p_t[i, label]])
        tckd = (b_t * (b_t / b_s).log()).sum()
        others = [c for c in range(s.shape[1]) if c != label]
        q_s, q_t = p_s[i, others] / (1 - p_s[i, label]), p_t[i, others] / (1 - p_t[i, label])
        nckd = (q_t * (q_t / q_s).log()).sum()
        total += float(alpha * tckd + beta * nckd)
    return tau**2 * total / len(y)


def dist_reference(s: torch.Tensor, t: torch.Tensor, beta: float, gamma: float, tau: float) -> float:
    """Huang et al. (2022), Eqs. 4-6 and 8, in float64: Pearson correlations within samples and within classes."""
    p_s, p_t = torch.softmax(s.double() / tau, 1), torch.softmax(t.double() / tau, 1)

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt()))

    inter = 1 - sum(pearson(p_s[i], p_t[i]) for i in range(len(s))) / len(s)
    intra = 1 - sum(pearson(p_s[:, c], p_t[:, c]) for c in range(s.shape[1])) / s.shape[1]
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dkd_and_dist_match_their_papers_formulas_in_float64(seed: int, tau: float) -> None:
    from diffaug.distill import dist_loss, dkd_loss

    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    for alpha, beta in ((1.0, 8.0), (0.5, 2.0)):
        got = float(dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=tau))
        assert got == pytest.approx(dkd_reference(s, t, y, alpha, beta, tau), rel=1e-5)
    for beta, gamma in ((1.0, 1.0), (2.0, 0.5)):
        got = float(dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau))
        # float32 softmaxes and the 1e-8 in the correlations' denominators: within 1e-5 relative at these sizes.
        assert got == pytest.approx(dist_reference(s, t, beta, gamma, tau), rel=1e-5)
    # Identical logits distil nothing.
    assert float(dkd_loss(s, s, y)) == pytest.approx(0.0, abs=1e-5)
    assert float(dist_loss(s, s)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dkd_and_dist_are_finite_at_huge_half_precision_logits(dtype: torch.dtype) -> None:
    from diffaug.distill import dist_loss, dkd_loss

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(8, 10, generator=g) * 1e4).to(dtype).requires_grad_()
    t = (torch.randn(8, 10, generator=g) * 1e4).to(dtype)
    y = t.float().argmax(1)  # the teacher is certain: p_t[y] rounds to 1, 1 - p_t[y] to 0
    for loss in (dkd_loss(s, t, y), dist_loss(s, t, temperature=4.0)):
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


def test_logit_kd_names_and_stage_three_loss() -> None:
    from diffaug.distill.objective import logit_kd, stage_three_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    torch.testing.assert_close(stage_three_loss(s, t, y, logit_kd("kd", 4.0), 0.7, 1.3),
                               kd_loss(s, t, y, 4.0, 0.7, 1.3))
    with pytest.raises(DiffAugError, match=r"kd must be one of \['kd', 'dkd', 'dist'\]"):
        logit_kd("crd")
    with pytest.raises(DiffAugError, match="temperature must be a positive finite number"):
        logit_kd("dkd", temperature=-1)
