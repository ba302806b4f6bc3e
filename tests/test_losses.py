"""[5] Divergences against formulas written out in float64, and the lean kept-token loss against the naive one.

Run: python -m pytest tests/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from tipdistill.losses import DIVERGENCES, forward_kl, jsd, kept_token_loss, naive_masked_loss, reverse_kl

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


# --- kept_token_loss vs naive_masked_loss ----------------------------------------------------------------


def _setup(seed=0, B=3, T=7, H=5, Vs=11, Vt=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, Vs, bias=False, dtype=dtype)
    teacher_head = torch.nn.Linear(H, Vt, bias=False, dtype=dtype)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(Vs, H, generator=g, dtype=dtype))
        teacher_head.weight.copy_(torch.randn(Vt, H, generator=g, dtype=dtype))
    teacher_head.requires_grad_(False)
    sh = torch.randn(B, T, H, generator=g, dtype=dtype)
    th = torch.randn(B, T, H, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1] = False  # an empty rollout
    return sh, th, mask, student_head, teacher_head


def _loss_and_grads(fn, sh, th, mask, student_head, teacher_head, **kw):
    sh = sh.clone().requires_grad_(True)
    student_head.weight.grad = None
    loss, n = fn(sh, th, mask, student_head, teacher_head, **kw)
    loss.backward()
    return loss.detach(), n, sh.grad.clone(), student_head.weight.grad.clone()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_kept_full_mask_equals_naive(name, chunk_size):
    sh, th, mask, student_head, teacher_head = _setup()
    lean = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.3, chunk_size=chunk_size)
    naive = _loss_and_grads(naive_masked_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.3)
    assert lean[1] == naive[1] == int(mask.sum())
    for a, b in zip((lean[0], lean[2], lean[3]), (naive[0], naive[2], naive[3])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_kept_partial_mask_equals_naive_on_kept_tokens(name):
    sh, th, mask, student_head, teacher_head = _setup(seed=3)
    g = torch.Generator().manual_seed(4)
    keep = mask & (torch.rand(mask.shape, generator=g) < 0.5)
    assert 0 < keep.sum() < mask.sum()
    lean = _loss_and_grads(kept_token_loss, sh, th, keep, student_head, teacher_head, divergence=name, beta=0.7, chunk_size=3)
    naive = _loss_and_grads(naive_masked_loss, sh, th, keep, student_head, teacher_head, divergence=name, beta=0.7)
    # and by hand: the divergence of each kept row, from the float64 formula
    ps = probs64(student_head(sh[keep]).detach())
    pt = probs64(teacher_head(th[keep]))
    if name == "reverse_kl":
        torch.testing.assert_close(lean[0], kl64(ps, pt).sum(), atol=1e-9, rtol=1e-9)
    assert lean[1] == naive[1] == int(keep.sum())
    for a, b in zip((lean[0], lean[2], lean[3]), (naive[0], naive[2], naive[3])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (lean[2][~keep] == 0).all()  # no gradient reaches dropped positions


def test_vocab_width_prefix():
    sh, th, mask, student_head, teacher_head = _setup(Vs=13, Vt=11)
    lean = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence="reverse_kl", beta=0.5, chunk_size=2, vocab_width=11)
    naive = _loss_and_grads(naive_masked_loss, sh, th, mask, student_head, teacher_head, divergence="reverse_kl", beta=0.5, vocab_width=11)
    torch.testing.assert_close(lean[0], naive[0])
    torch.testing.assert_close(lean[3], naive[3])
    assert (lean[3][11:] == 0).all()  # padded head rows get no gradient
    ps, pt = probs64(student_head(sh[mask])[:, :11].detach()), probs64(teacher_head(th[mask]))
    torch.testing.assert_close(lean[0], kl64(ps, pt).sum())


def test_all_masked_is_zero_without_nan():
    sh, th, mask, student_head, teacher_head = _setup()
    sh = sh.clone()
    sh[0, 0] = math.nan  # padding garbage must not leak into an empty loss
    sh.requires_grad_(True)
    loss, n = kept_token_loss(sh, th, torch.zeros_like(mask), student_head, teacher_head, "reverse_kl", 0.5, 4)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert (sh.grad == 0).all()


def test_low_precision_inputs_give_fp32_loss():
    sh, th, mask, student_head, teacher_head = _setup(dtype=torch.bfloat16)
    loss, n = kept_token_loss(sh.requires_grad_(True), th, mask, student_head, teacher_head, "reverse_kl", 0.5, 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(sh.grad.float()).all()


def _saved_numels(fn, *args, **kw):
    """Element counts of every tensor autograd saves for backward during fn's forward."""
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = fn(*args, **kw)
    return loss, n, numels


@pytest.mark.parametrize("name", NAMES)
def test_lean_path_saves_no_tokens_by_vocab_tensor(name):
    B, T, H, V, K, chunk = 2, 40, 8, 1000, 50, 16
    g = torch.Generator().manual_seed(0)
    student_head = torch.nn.Linear(H, V, bias=False)
    teacher_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    sh = torch.randn(B, T, H, generator=g, requires_grad=True)
    th = torch.randn(B, T, H, generator=g)
    keep = torch.zeros(B * T, dtype=torch.bool)
    keep[torch.randperm(B * T, generator=g)[:K]] = True
    keep = keep.view(B, T)

    loss, n, numels = _saved_numels(kept_token_loss, sh, th, keep, student_head, teacher_head, name, 0.5, chunk)
    assert n == K and numels, "hooks saw nothing: the check would be vacuous"
    assert max(numels) < K * V, f"lean path saved a tensor of {max(numels)} elements (K*V = {K * V})"
    assert max(numels) <= max(chunk * H, V * H, B * T)  # chunk inputs, the head weight, indices at most
    loss.backward()  # the recompute in backward works

    loss_naive, _, numels_naive = _saved_numels(naive_masked_loss, sh, th, keep, student_head, teacher_head, name, 0.5)
    assert max(numels_naive) >= K * V  # the naive path does hold (tokens x vocab) state: the test can fail
    torch.testing.assert_close(loss, loss_naive, atol=1e-4, rtol=1e-5)
