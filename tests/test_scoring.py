"""[4a] Per-token statistics, normalisation and quadrants on hand-computable numbers.

Run: python -m pytest tests/test_scoring.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import stats_of
from tipdistill.scoring import normalise, quadrant_fractions, quadrants, token_stats

IDENTITY = torch.nn.Identity()  # hidden == logits: the tests write the distributions down directly


def kl64(p, q):
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p)).sum(-1)


def entropy64(p):
    p = p.double()
    return -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)


def test_hand_worked_three_token_vocab():
    # position 0: P_S = (1/2, 1/2, 0), P_T = (3/4, 1/4, 0); position 1: identical distributions.
    s = torch.tensor([[[0.0, 0.0, -math.inf], [1.0, 2.0, 3.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0, -math.inf], [1.0, 2.0, 3.0]]])
    st = token_stats(s, t, torch.ones(1, 2, dtype=torch.bool), IDENTITY, IDENTITY, chunk_size=1)
    assert st.h_B_T[0, 0].item() == pytest.approx(math.log(2) / math.log(3), abs=1e-6)
    assert st.rkl_B_T[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert st.fkl_B_T[0, 0].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert st.rkl_B_T[0, 0].item() != pytest.approx(st.fkl_B_T[0, 0].item(), abs=1e-3)
    assert st.rkl_B_T[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert st.fkl_B_T[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    for x in (st.h_B_T, st.rkl_B_T, st.fkl_B_T):
        assert x.dtype == torch.float32


def test_uniform_student_has_h_one():
    s = torch.zeros(1, 1, 5)
    st = token_stats(s, s, torch.ones(1, 1, dtype=torch.bool), IDENTITY, IDENTITY, chunk_size=4)
    assert st.h_B_T.item() == pytest.approx(1.0, abs=1e-6)


def _random_case(seed=0, B=3, T=9, H=6, V=17):
    g = torch.Generator().manual_seed(seed)
    sh, th = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    student_head, teacher_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[-1] = False
    return sh, th, mask, student_head, teacher_head


def test_matches_float64_formulas_and_is_zero_outside_mask():
    sh, th, mask, student_head, teacher_head = _random_case()
    sh[~mask] = math.nan  # padding garbage must not leak anywhere
    st = token_stats(sh, th, mask, student_head, teacher_head, chunk_size=4)
    with torch.no_grad():
        ps = torch.softmax(student_head(sh[mask]).double(), -1)
        pt = torch.softmax(teacher_head(th[mask]).double(), -1)
    torch.testing.assert_close(st.h_B_T[mask].double(), entropy64(ps) / math.log(17), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.rkl_B_T[mask].double(), kl64(ps, pt), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.fkl_B_T[mask].double(), kl64(pt, ps), atol=1e-6, rtol=1e-5)
    for x in (st.h_B_T, st.rkl_B_T, st.fkl_B_T):
        assert (x[~mask] == 0).all() and torch.isfinite(x).all()
    assert torch.equal(st.mask_B_T, mask)


def test_chunked_equals_unchunked_and_no_grad():
    sh, th, mask, student_head, teacher_head = _random_case(seed=1)
    sh.requires_grad_(True)
    ref = token_stats(sh, th, mask, student_head, teacher_head, chunk_size=10_000)
    for chunk in (1, 3, 5):
        st = token_stats(sh, th, mask, student_head, teacher_head, chunk_size=chunk)
        for a, b in ((st.h_B_T, ref.h_B_T), (st.rkl_B_T, ref.rkl_B_T), (st.fkl_B_T, ref.fkl_B_T)):
            torch.testing.assert_close(a, b)
            assert not a.requires_grad


def test_vocab_width_uses_shared_prefix():
    sh, th, mask, _, teacher_head = _random_case(seed=2, V=10)
    student_head = torch.nn.Linear(6, 14)  # padded to a wider head
    st = token_stats(sh, th, mask, student_head, teacher_head, chunk_size=4, vocab_width=10)
    with torch.no_grad():
        ps = torch.softmax(student_head(sh[mask])[:, :10].double(), -1)
        pt = torch.softmax(teacher_head(th[mask]).double(), -1)
    torch.testing.assert_close(st.h_B_T[mask].double(), entropy64(ps) / math.log(10), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.rkl_B_T[mask].double(), kl64(ps, pt), atol=1e-6, rtol=1e-5)


def test_empty_mask():
    sh, th, mask, student_head, teacher_head = _random_case()
    st = token_stats(sh, th, torch.zeros_like(mask), student_head, teacher_head, chunk_size=4)
    assert (st.h_B_T == 0).all()
    h_hat, rkl_hat = normalise(st)
    assert (h_hat == 0).all() and (rkl_hat == 0).all()


# --- normalise ------------------------------------------------------------------------------------------


def test_normalise_constant_batch_gives_zeros_not_nan():
    st = stats_of([[0.3, 0.3, 0.3], [0.3, 0.3, 0.0]], [[2.0] * 3, [2.0, 2.0, 0.0]], mask=[[True] * 3, [True, True, False]])
    h_hat, rkl_hat = normalise(st, 0.98, 0.9)
    assert (h_hat == 0).all() and (rkl_hat == 0).all()


def test_normalise_minmax_and_mask():
    st = stats_of([[0.2, 0.4, 0.6, 0.9]], [[1.0, 3.0, 5.0, 100.0]], mask=[[True, True, True, False]])
    h_hat, rkl_hat = normalise(st, entropy_clip_quantile=1.0)
    torch.testing.assert_close(h_hat, torch.tensor([[0.0, 0.5, 1.0, 0.0]]))
    torch.testing.assert_close(rkl_hat, torch.tensor([[0.0, 0.5, 1.0, 0.0]]))


def test_normalise_entropy_clip():
    # h = 0, 1, ..., 99 (scaled) plus one outlier; the 0.5 quantile clips everything above the median.
    h = [[i / 1000 for i in range(100)] + [0.9]]
    st = stats_of(h, [[float(i) for i in range(101)]])
    q = torch.tensor(h).quantile(0.5).item()
    h_hat, rkl_hat = normalise(st, entropy_clip_quantile=0.5)
    expected = (torch.tensor(h).clamp(max=q)) / q
    torch.testing.assert_close(h_hat, expected)
    assert h_hat.max() == 1.0 and (h_hat[0, 51:] == 1.0).all()
    # rkl is not clipped by default: plain min-max of 0..100
    torch.testing.assert_close(rkl_hat, torch.arange(101.0)[None] / 100)
    # ...and is clipped when asked
    _, rkl_hat = normalise(st, 0.98, rkl_clip_quantile=0.5)
    assert (rkl_hat[0, 50:] == 1.0).all() and rkl_hat[0, 25].item() == pytest.approx(0.5)


def test_normalise_maps_infinite_rkl_to_one_and_scales_the_finite_values():
    st = stats_of([[0.2, 0.4, 0.6, 0.8]], [[1.0, math.inf, 3.0, 5.0]])
    _, rkl_hat = normalise(st, entropy_clip_quantile=1.0)
    torch.testing.assert_close(rkl_hat, torch.tensor([[0.0, 1.0, 0.5, 1.0]]))
    _, rkl_hat = normalise(st, entropy_clip_quantile=1.0, rkl_clip_quantile=0.5)  # the clip sees the inf too
    assert torch.isfinite(rkl_hat).all() and rkl_hat[0, 1] == 1.0
    every = stats_of([[0.2, 0.4]], [[math.inf, math.inf]])
    assert normalise(every)[1].tolist() == [[1.0, 1.0]]


# --- quadrants ------------------------------------------------------------------------------------------


def test_quadrants_by_hand():
    st = stats_of(
        [[0.9, 0.9, 0.05, 0.05, 0.2, 0.9]],
        [[1.0, 0.01, 1.0, 0.01, 0.1, 5.0]],
        mask=[[True, True, True, True, True, False]],
    )
    q = quadrants(st, entropy_threshold=0.1, rkl_threshold=0.1)
    assert q.dtype == torch.long
    # position 4 sits exactly on the rkl threshold: "high" is strict, so it is low -> Q2
    assert q.tolist() == [[1, 2, 3, 4, 2, 0]]
    fr = quadrant_fractions(q, st.mask_B_T)
    assert fr == pytest.approx({"q1": 0.2, "q2": 0.4, "q3": 0.2, "q4": 0.2})
    kept = torch.tensor([[True, False, True, False, False, False]])
    assert quadrant_fractions(q, kept) == pytest.approx({"q1": 0.5, "q2": 0.0, "q3": 0.5, "q4": 0.0})
    assert quadrant_fractions(q, torch.zeros_like(kept)) == {"q1": 0.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}
