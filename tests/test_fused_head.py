"""[4a]+[5] The fused LM-head pass: analytic gradients against autograd in float64 (-inf entries and
`vocab_width` truncation included), the fused kept-token loss against the peer-style naive loss, tied
embeddings, the statistics it hands out, bf16 numerics, and its memory behaviour.

Run: python -m pytest tests/test_fused_head.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import random_rollout, tiny_qwen
from tipdistill.fused_head import STATS, divergence_and_grad, head_pass, kept_token_loss
from tipdistill.losses import DIVERGENCES, naive_masked_loss
from tipdistill.scoring import token_stats
from tipdistill.teacher import response_hidden
from tipdistill.types import TokenStats

CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)]
NAMES = ["reverse_kl", "forward_kl", "jsd"]


def kl64(p, q):
    p, q = p.double(), q.double()
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p)).sum(-1)


# --- the analytic gradients, on logits ---------------------------------------------------------------------


def _logits_with_masked_entries(seed: int = 0, N: int = 6, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    s[0, 2] = t[0, 2] = -math.inf  # both heads mask an entry (a padded id)
    s[1, [3, 7]] = t[1, [3, 7]] = -math.inf
    s[2, 4] = -math.inf  # only the student gives it no mass: KL(T||S) is infinite there
    t[3, 5] = -math.inf  # only the teacher: KL(S||T) is infinite
    return s, t


@pytest.mark.parametrize("name, beta", CASES)
def test_analytic_gradient_matches_autograd_float64(name, beta):
    s, t = _logits_with_masked_entries()
    x = s.clone().requires_grad_(True)
    expected = DIVERGENCES.get(name)(x, t, beta)
    finite = torch.isfinite(expected)
    expected[finite].sum().backward()  # autograd of the definitions in losses.py, on the rows with a finite value
    value, grad = divergence_and_grad(s, t, name, beta)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)  # inf where the math says inf
    torch.testing.assert_close(grad[finite], x.grad[finite], rtol=1e-10, atol=1e-12)
    assert torch.isfinite(grad[finite]).all()
    assert (grad[finite][torch.isneginf(s[finite])] == 0).all()  # an entry without student mass gets no gradient
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        assert not finite[3] and finite[2]
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        assert not finite[2] and finite[3]


def test_analytic_gradient_fp32_logits_match_float64():
    s, t = _logits_with_masked_entries(seed=1, V=2000)
    for name, beta in CASES:
        v64, g64 = divergence_and_grad(s, t, name, beta)
        v32, g32 = divergence_and_grad(s.float(), t.float(), name, beta)
        ok = torch.isfinite(v64)
        torch.testing.assert_close(v32[ok].double(), v64[ok], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g32[ok].double(), g64[ok], rtol=1e-4, atol=1e-7)


# --- the fused loss against the naive one ------------------------------------------------------------------


def _setup(seed=0, B=3, T=7, H=5, Vs=11, Vt=11, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(H, Vs, bias=bias, dtype=dtype)
    teacher_head = torch.nn.Linear(H + 2, Vt, bias=False, dtype=dtype)  # its own hidden size
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(Vs, H, generator=g, dtype=dtype))
        teacher_head.weight.copy_(torch.randn(Vt, H + 2, generator=g, dtype=dtype))
        if bias:
            student_head.bias.copy_(torch.randn(Vs, generator=g, dtype=dtype))
    teacher_head.requires_grad_(False)
    sh = torch.randn(B, T, H, generator=g, dtype=dtype)
    th = torch.randn(B, T, H + 2, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1] = False  # an empty rollout
    return sh, th, mask, student_head, teacher_head


def _loss_and_grads(fn, sh, th, mask, student_head, teacher_head, **kw):
    sh = sh.clone().requires_grad_(True)
    student_head.zero_grad(set_to_none=True)
    loss, n = fn(sh, th, mask, student_head, teacher_head, **kw)
    (loss / max(n, 1)).backward()  # a non-unit upstream gradient, as in the update step
    bias = None if student_head.bias is None else student_head.bias.grad.clone()
    return loss.detach(), n, sh.grad.clone(), student_head.weight.grad.clone(), bias


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_naive_float64(name, chunk_size, bias):
    sh, th, mask, student_head, teacher_head = _setup(bias=bias)
    fused = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.3,
                            chunk_size=chunk_size)
    naive = _loss_and_grads(naive_masked_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.3)
    assert fused[1] == naive[1] == int(mask.sum())
    for a, b in zip(fused, naive):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_vocab_width_truncation_float64(name):
    """Heads padded to different widths (13 vs 11): the shared prefix only; padded head rows get no gradient."""
    sh, th, mask, student_head, teacher_head = _setup(Vs=13, Vt=11, bias=True)
    fused = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.6,
                            chunk_size=2, vocab_width=11)
    naive = _loss_and_grads(naive_masked_loss, sh, th, mask, student_head, teacher_head, divergence=name, beta=0.6,
                            vocab_width=11)
    for a, b in zip(fused, naive):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (fused[3][11:] == 0).all() and (fused[4][11:] == 0).all()
    if name == "reverse_kl":  # and by hand
        with torch.no_grad():
            ps = torch.softmax(student_head(sh[mask])[:, :11], -1)
            pt = torch.softmax(teacher_head(th[mask]), -1)
        torch.testing.assert_close(fused[0], kl64(ps, pt).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_partial_mask_trains_only_the_kept_positions(name):
    sh, th, mask, student_head, teacher_head = _setup(seed=3)
    keep = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) < 0.5)
    assert 0 < keep.sum() < mask.sum()
    fused = _loss_and_grads(kept_token_loss, sh, th, keep, student_head, teacher_head, divergence=name, beta=0.7, chunk_size=3)
    naive = _loss_and_grads(naive_masked_loss, sh, th, keep, student_head, teacher_head, divergence=name, beta=0.7)
    for a, b in zip(fused, naive):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (fused[2][~keep] == 0).all()  # no gradient reaches dropped positions


@pytest.mark.parametrize("bias", [False, True])
def test_an_unhooked_head_is_linear_to_the_fused_loss(bias):
    """The sharded student's head (`UnhookedHead`: its module's current weight, no FSDP2 hooks) takes the
    fused pass like the torch.nn.Linear it wraps: same loss, and the same gradients land in that weight."""
    from tipdistill.numerics import UnhookedHead

    sh, th, mask, student_head, teacher_head = _setup(bias=bias)
    plain = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence="reverse_kl", beta=0.5,
                            chunk_size=3)
    student_head.zero_grad(set_to_none=True)
    h = sh.clone().requires_grad_(True)
    loss, n = kept_token_loss(h, th, mask, UnhookedHead(student_head), teacher_head, "reverse_kl", 0.5, 3)
    (loss / max(n, 1)).backward()
    assert n == plain[1]
    torch.testing.assert_close(loss.detach(), plain[0], rtol=0, atol=0)
    torch.testing.assert_close(h.grad, plain[2], rtol=0, atol=0)
    torch.testing.assert_close(student_head.weight.grad, plain[3], rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(student_head.bias.grad, plain[4], rtol=0, atol=0)


def test_tied_embeddings_full_parameter_gradient_equals_the_naive_update():
    """A small Qwen with tied embedding / LM head (the embedded pair's layout): every parameter's gradient,
    the shared embedding = head weight included, equals the naive update's (float64)."""
    student, teacher = tiny_qwen(0, vocab=48, layers=2, tied=True).double(), tiny_qwen(1, vocab=48, layers=1, tied=True).double()
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    teacher.requires_grad_(False)
    rollout = random_rollout(48, (4, 6), (7, 3, 5, 7))
    rows = slice(0, 4)
    with torch.no_grad():
        t_hidden = response_hidden(teacher, rollout, rows)
    grads = []
    for keep_all in (True, False):
        keep = rollout.response_mask_B_T.clone()
        if not keep_all:
            keep[:, ::2] = False
        for fn, kw in ((kept_token_loss, {"chunk_size": 5}), (naive_masked_loss, {})):
            student.zero_grad(set_to_none=True)
            loss, n = fn(response_hidden(student, rollout, rows), t_hidden, keep, student.get_output_embeddings(),
                         teacher.get_output_embeddings(), "reverse_kl", 0.5, **kw)
            (loss / n).backward()
            grads.append({name: p.grad.clone() for name, p in student.named_parameters()})
    for fused, naive in (grads[0:2], grads[2:4]):
        assert fused.keys() == naive.keys() and "model.embed_tokens.weight" in fused
        for name in naive:
            torch.testing.assert_close(fused[name], naive[name], rtol=1e-9, atol=1e-12, msg=name)


def test_stats_out_are_the_statistics_of_the_kept_positions():
    sh, th, mask, student_head, teacher_head = _setup(seed=5)
    stats = TokenStats.zeros(mask)
    loss, n = kept_token_loss(sh.requires_grad_(True), th, mask, student_head, teacher_head, "reverse_kl", 0.5, 4, stats_out=stats)
    ref = token_stats(sh.detach(), th, mask, student_head, teacher_head, 3)
    for name in ("h", "rkl", "fkl"):
        got, want = getattr(stats, f"{name}_B_T"), getattr(ref, f"{name}_B_T")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert (got[~mask] == 0).all()
    assert float(loss.detach()) == pytest.approx(float(ref.rkl_B_T[mask].double().sum()), rel=1e-6)  # the loss is the rkl statistic


def test_all_masked_is_zero_without_nan():
    sh, th, mask, student_head, teacher_head = _setup()
    sh = sh.clone()
    sh[0, 0] = math.nan  # padding garbage must not leak into an empty loss
    sh.requires_grad_(True)
    loss, n = kept_token_loss(sh, th, torch.zeros_like(mask), student_head, teacher_head, "reverse_kl", 0.5, 4)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert (sh.grad == 0).all()


def test_low_precision_inputs_give_an_fp32_loss():
    sh, th, mask, student_head, teacher_head = _setup(dtype=torch.bfloat16)
    loss, n = kept_token_loss(sh.requires_grad_(True), th, mask, student_head, teacher_head, "reverse_kl", 0.5, 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(sh.grad.float()).all() and student_head.weight.grad.dtype == torch.bfloat16


def test_bf16_autocast_rounds_operands_and_accumulates_in_fp32():
    """Under bf16 autocast (the dtype policy's compute dtype over fp32 master weights) the pass multiplies
    bf16-rounded operands with fp32 accumulation, the numbers of a bf16 GEMM with fp32 output on CUDA:
    equal to a float64 computation on those rounded operands, and the weight gradient stays fp32."""
    sh, th, mask, student_head, teacher_head = _setup(seed=7, H=64, Vs=3000, Vt=3000, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _loss_and_grads(kept_token_loss, sh, th, mask, student_head, teacher_head, divergence="reverse_kl", beta=0.5,
                                chunk_size=4)
    rounded = [x.to(torch.bfloat16).double() for x in (sh, th, student_head.weight.detach(), teacher_head.weight.detach())]
    s_head64 = torch.nn.Linear(64, 3000, bias=False, dtype=torch.float64)
    t_head64 = torch.nn.Linear(66, 3000, bias=False, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():
        s_head64.weight.copy_(rounded[2])
        t_head64.weight.copy_(rounded[3])
    ref = _loss_and_grads(naive_masked_loss, rounded[0], rounded[1], mask, s_head64, t_head64, divergence="reverse_kl", beta=0.5)
    assert fused[0].dtype == torch.float32 and fused[3].dtype == torch.float32
    torch.testing.assert_close(fused[0].double(), ref[0], rtol=2e-6, atol=1e-6)
    # the gradient matmuls take bf16 operands too (G rounded on CUDA; fp32 here), so compare loosely
    torch.testing.assert_close(fused[3].double(), ref[3], rtol=1e-2, atol=1e-5)


# --- memory behaviour ----------------------------------------------------------------------------------------


def _saved_numels(fn, *args, **kw):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = fn(*args, **kw)
    return loss, n, numels


@pytest.mark.parametrize("name", NAMES)
def test_the_fused_loss_keeps_no_tokens_by_vocab_tensor_for_backward(name):
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
    assert max(numels) <= max(K * H, V * H, B * T), max(numels)  # hidden states and their grads, the head grad, indices
    loss.backward()
    loss_naive, _, numels_naive = _saved_numels(naive_masked_loss, sh, th, keep, student_head, teacher_head, name, 0.5)
    assert max(numels_naive) >= K * V  # the naive path does hold (tokens x vocab) state: the test can fail
    torch.testing.assert_close(loss, loss_naive, atol=1e-4, rtol=1e-5)


class _Allocations(TorchDispatchMode):
    """Counts tensors that ops create (not in-place / out= results) with at least `threshold` elements."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold, self.count = threshold, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {x.untyped_storage().data_ptr() for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.numel() >= self.threshold and x.untyped_storage().data_ptr() not in given:
                self.count += 1
        return out


def test_statistics_allocate_no_chunk_by_vocab_tensor_per_chunk():
    """8 chunks of 32 positions over V = 1000: the pass allocates its two logits buffers once and reuses them
    (and cache-sized row blocks below a chunk's size). The pre-fused statistics allocated 18 (chunk x V)
    temporaries per chunk here (two logits, two log-softmaxes, the student's exp twice, the teacher's once,
    the isneginf/where/sub/mul of the entropy and both KLs)."""
    B, T, H, V, chunk = 4, 64, 8, 1000, 32
    g = torch.Generator().manual_seed(0)
    heads = [torch.nn.Linear(H, V, bias=False) for _ in range(2)]
    sh, th = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    with _Allocations(chunk * V // 2) as allocations:
        stats = token_stats(sh, th, mask, heads[0], heads[1], chunk, reads=STATS)
    assert allocations.count == 2, allocations.count
    assert torch.isfinite(stats.fkl_B_T).all()


def test_statistics_compute_fkl_only_when_read():
    sh, th, mask, student_head, teacher_head = _setup(seed=2)
    some = token_stats(sh, th, mask, student_head, teacher_head, 4, reads=frozenset({"h"}))
    every = token_stats(sh, th, mask, student_head, teacher_head, 4, reads=STATS)
    assert some.fkl_B_T is None and every.fkl_B_T is not None
    torch.testing.assert_close(some.h_B_T, every.h_B_T)
    torch.testing.assert_close(some.rkl_B_T, every.rkl_B_T)  # h and rkl always: the metrics read them


def test_head_pass_rows_gather_per_chunk_equals_pre_gathered():
    sh, th, mask, student_head, teacher_head = _setup(seed=9)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    a = head_pass(sh.reshape(-1, 5), th.reshape(-1, 7), student_head, teacher_head, rows_N=idx, want=STATS, chunk_rows=2)
    b = head_pass(sh.reshape(-1, 5)[idx], th.reshape(-1, 7)[idx], student_head, teacher_head, want=STATS, chunk_rows=5)
    for k in STATS:
        torch.testing.assert_close(a.stats[k], b.stats[k])
