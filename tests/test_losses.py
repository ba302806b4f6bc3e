"""[5] Divergences against formulas written out in float64 (the fused loss against them: test_fused_head.py).

Run: python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from tipdistill.losses import DIVERGENCES, forward_kl, jsd, reverse_kl

NAMES = ["reverse_kl", "forward_kl", "jsd"]


def kl64(p, q):
    """KL(p || q) per row, written out: sum_v p_v * (ln p_v - ln q_v), with 0 * ln 0 = 0."""
    p, q = p.double(), q.double()
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def probs64(logits):
    return torch.softmax(logits.double(), dim=-1)


def test_registry_names():
    assert set(DIVERGENCES) == set(NAMES)
    with pytest.raises(LookupError, match="loss.name"):
        DIVERGENCES.get("kl")


def test_hand_worked_two_token_vocab():
    # P_S = (1/2, 1/2), P_T = (3/4, 1/4)
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert reverse_kl(s, t).item() == pytest.approx(rkl, abs=1e-6)
    assert forward_kl(s, t).item() == pytest.approx(fkl, abs=1e-6)
    assert abs(rkl - fkl) > 1e-2  # the direction matters on this example
    # JSD(1/2) with M = (5/8, 3/8)
    m = (0.625, 0.375)
    js = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert jsd(s, t, 0.5).item() == pytest.approx(js, abs=1e-6)


def test_masked_vocab_entry_is_zero_probability():
    # A third, -inf entry must change nothing (and give no NaN).
    s = torch.tensor([[0.0, 0.0, -math.inf]])
    t = torch.tensor([[math.log(3.0), 0.0, -math.inf]])
    for name in NAMES:
        fn = DIVERGENCES.get(name)
        assert fn(s, t, 0.3).item() == pytest.approx(fn(s[:, :2], t[:, :2], 0.3).item(), abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_divergences_match_float64_formulas(dtype):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(6, 7, generator=g)).to(dtype)
    t = (3 * torch.randn(6, 7, generator=g)).to(dtype)
    ps, pt = probs64(s), probs64(t)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    out = reverse_kl(s, t)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), kl64(ps, pt), atol=tol, rtol=tol)
    torch.testing.assert_close(forward_kl(s, t).double(), kl64(pt, ps), atol=tol, rtol=tol)
    for beta in (0.1, 0.5, 0.9):
        m = beta * pt + (1 - beta) * ps  # TRL/GKD: M = beta P_T + (1 - beta) P_S
        expected = beta * kl64(pt, m) + (1 - beta) * kl64(ps, m)
        torch.testing.assert_close(jsd(s, t, beta).double(), expected, atol=tol, rtol=tol)


def test_identical_logits_give_zero():
    x = torch.randn(5, 9)
    for name in NAMES:
        assert DIVERGENCES.get(name)(x, x.clone(), 0.4).abs().max().item() < 1e-6


def test_jsd_endpoints_and_direction():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(jsd(s, t, 0.0), forward_kl(s, t))
    torch.testing.assert_close(jsd(s, t, 1.0), reverse_kl(s, t))
    # Near the ends the interior formula is the matching KL scaled by beta (resp. 1 - beta): this pins
    # which distribution carries which weight in M (a swapped mixture would flip the two).
    eps = 1e-5
    torch.testing.assert_close(jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-3, atol=1e-6)


def test_neg_inf_logits_have_finite_gradients():
    # Both models mask the same vocabulary entries (e.g. a padded head): values and grads stay finite.
    s = torch.tensor([[0.5, -1.0, -math.inf, 2.0], [0.0, -math.inf, 1.0, -math.inf]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, -math.inf, -0.5], [2.0, -math.inf, 0.0, -math.inf]])
    for name in NAMES:
        for beta in (0.0, 0.5, 1.0):
            s.grad = None
            out = DIVERGENCES.get(name)(s, t, beta)
            assert torch.isfinite(out).all(), (name, beta)
            out.sum().backward()
            assert torch.isfinite(s.grad).all(), (name, beta)
            assert (s.grad[torch.isinf(s)] == 0).all()


def test_support_mismatch_is_inf_only_where_the_math_says():
    # The student has mass on entry 2 where the teacher has none: KL(S||T) = inf, KL(T||S) finite.
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0, -math.inf]])
    assert reverse_kl(s, t).item() == math.inf
    assert forward_kl(s, t).item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert math.isfinite(jsd(s, t, 0.5).item())
