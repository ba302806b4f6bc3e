"""[4a]+[5] The fused LM-head pass: both heads' logits, the per-token statistics, the divergence and its
analytic gradient, one chunk of positions at a time, with no autograd through a (tokens x vocab) tensor.

Why: at a large vocabulary the LM heads are the update's cost. Counted in LM-head matmuls over N
response positions with K kept: the peer-style update does 4N (student and teacher logits, grad of
the hidden states, grad of the head), an activation-checkpointed chunk loss 2N (statistics) + 6K
(forward, recompute, gradients); this pass does 2N (statistics) + 4K, and 4N at `selector=full`, whose
statistics come out of its loss pass. Anchors that fuse the head with the loss the same way:
Liger-Kernel's fused linear cross-entropy / JSD, Apple's cut-cross-entropy.

Per chunk of C positions (`CHUNK_ROWS`):
  1. S = h_s W_s^T, T = h_t W_t^T into two preallocated (C x V) buffers (fp32; fp64 passes through);
  2. per block of rows (`BLOCK_ROWS`: cache-sized on CPU): shift by the row max, exp, the statistics as
     row dot products, the divergence and its gradient G with respect to the student logits, written
     over T; every (rows x V) tensor is a preallocated `Workspace` buffer;
  3. grad_h = G W_s (C x H) and grad_W += G^T h_s (V x H, fp32 accumulation).
`kept_token_loss` wraps this in an autograd Function whose backward hands grad_h and grad_W on
(scaled by the upstream gradient): the backbone backpropagates once from the kept hidden states, and
a head tied to the input embedding gets both gradients added by autograd as usual.

Analytic gradients with respect to the student logits z (p = softmax(z), q the teacher's):
  reverse KL  KL(p||q):   p * (log p - log q - KL(p||q))
  forward KL  KL(q||p):   p - q
  JSD(beta), M = beta q + (1 - beta) p (TRL's convention, `losses.jsd`): (1 - beta) p * (log p - log M - KL(p||M))
Conventions of `numerics.py`: 0 * log 0 = 0 for -inf logits (a head that masks entries; a linear head
never gives -inf, so only other callables pay for the guard), sums over the shared vocabulary prefix.
Precision: sums over a 152k-wide row are torch's (cascade) row sums of elementwise products; a single
fp32 dot over the row lost 1e-4 of the loss. Under bf16 autocast (CUDA) the matmuls take bf16
operands with fp32 outputs and accumulation (`out_dtype`); elsewhere the operands are rounded to the
compute dtype and multiplied in fp32, which gives the same numbers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from tipdistill.numerics import Head, is_linear
from tipdistill.types import TokenStats

STATS = frozenset({"h", "rkl", "fkl"})  # what the pass can hand out per token
_ORDER = ("h", "rkl", "fkl")

# Rows per LM-head chunk, per device type: the default of `scoring.chunk_size` and `loss.chunk_size`.
# scripts/bench_chunk.py measures the choice on a device (README "Chunk size"). CPU: 128 rows in 8-row
# blocks, the first version's setting: the sweep has not yet run on a quiet 2-core box (README);
# CUDA: the sweep's pick on an H200 (2026-11-29, bf16, V=151,936: 2048 x 512 took 0.105 s for 8,192
# rows with 3.6 GiB of buffers; 512 x 128, the earlier guess, 0.124 s with 0.9 GiB).
CHUNK_ROWS = {"cpu": 128, "cuda": 2048}
# Rows per elementwise block: on CPU a block of the (C x V) buffers small enough to stay in the caches
# while a dozen passes run over it (DRAM bandwidth, not arithmetic, bounds them otherwise); on CUDA
# a fraction of the chunk, which bounds the scratch buffers.
BLOCK_ROWS = {"cpu": 8, "cuda": 512}


def default_chunk(device: torch.device) -> int:
    return CHUNK_ROWS.get(device.type, CHUNK_ROWS["cpu"])


class Workspace:
    """Named buffers reused by every chunk of one update step's statistics and loss passes.

    A (C x V) tensor allocated per chunk costs page faults (CPU) or allocator churn; reusing one
    buffer makes the pass's peak memory exactly its buffers. Drop the workspace to free them.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous [rows, cols] view of buffer `name` (grown, never shrunk, when too small)."""
        n = rows * cols
        buf = self._flat.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            self._flat.pop(name, None)  # free the old one before allocating
            buf = self._flat[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(rows, cols)


# --- matmuls with fp32 accumulation -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _native_low_precision(device: torch.device) -> bool:
    """bf16 operands with an fp32 output and accumulation in one GEMM (`out_dtype`: torch >= 2.8, CUDA).
    Tried once per device on tiny tensors, so a build without it falls back instead of failing."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        out = torch.zeros(2, 2, dtype=torch.float32, device=device)
        torch.mm(a, a, out_dtype=torch.float32, out=out)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool((out == 4).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out = a @ b (or out += a @ b), in out's dtype; bf16 operands only where `_native_low_precision`."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if accumulate:
        return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


@dataclass
class _Operand:
    """One head prepared for a pass: weight [V, H] and bias sliced to the shared vocabulary and cast once
    to the matmul dtype; or, for a head that is not linear, the callable itself."""

    head: Head
    vocab: int
    compute: torch.dtype = torch.float32
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, head: Head, vocab_width: Optional[int], compute: torch.dtype, mm_dtype: torch.dtype, buf: torch.dtype,
           probe: torch.Tensor) -> "_Operand":
        if not is_linear(head):
            vocab = head(probe[:1]).shape[-1] if vocab_width is None else vocab_width
            return cls(head, vocab, compute)
        vocab = head.weight.shape[0] if vocab_width is None else vocab_width
        weight = head.weight.detach()[:vocab].to(compute).to(mm_dtype)  # rounded to the compute dtype, as autocast would
        bias = None if head.bias is None else head.bias.detach()[:vocab].to(compute).to(buf)
        return cls(head, vocab, compute, weight, bias)

    @property
    def linear(self) -> bool:
        return self.weight is not None

    def project(self, hidden_C_H: torch.Tensor, out_C_V: torch.Tensor) -> torch.Tensor:
        if not self.linear:  # any callable head: it may mask entries with -inf
            return out_C_V.copy_(self.head(hidden_C_H)[..., : self.vocab])
        _mm(hidden_C_H.to(self.compute).to(self.weight.dtype), self.weight.t(), out_C_V)
        return out_C_V if self.bias is None else out_C_V.add_(self.bias)


# --- one block of rows: statistics, divergence, gradient --------------------------------------------------------


def _shift(x_R_V: torch.Tensor) -> None:
    """x -= its row max, in place (a row of -inf stays -inf rather than turning NaN)."""
    m_R1 = x_R_V.amax(-1, keepdim=True)
    x_R_V.sub_(m_R1.masked_fill_(torch.isneginf(m_R1), 0.0))


def _dot(a_R_V: torch.Tensor, b_R_V: torch.Tensor, tmp_R_V: torch.Tensor, masked: bool) -> torch.Tensor:
    """sum_v a_v b_v per row [R]. `masked`: where a is 0 (no mass, a -inf logit) the term is 0 even against
    an infinite or NaN b (0 * log 0 = 0)."""
    torch.mul(a_R_V, b_R_V, out=tmp_R_V)
    if masked:
        tmp_R_V.masked_fill_(a_R_V == 0, 0.0)
    return tmp_R_V.sum(-1)


def _block(S: torch.Tensor, T: torch.Tensor, scratch: list[torch.Tensor], want: frozenset, loss: Optional[str], beta: float,
           masked: bool) -> dict[str, torch.Tensor]:
    """Statistics `want` and the divergence `loss` of R rows of logits S (student) and T (teacher), [R, V].

    S and T are overwritten; with a loss, T ends as G and the result's "scale" [R] is such that
    scale * G is the gradient of the loss with respect to S (the row factor is applied on the
    cheap side of the gradient matmuls). Returns [R] tensors: the statistics, "loss", "scale".
    """
    Et, Es, D, tmp = scratch
    out: dict[str, torch.Tensor] = {}
    # student and teacher log-probabilities, kept implicitly: log p = S' - log zs with S' = S - max
    _shift(T)
    torch.exp(T, out=Et)
    zt = Et.sum(-1)
    _shift(S)
    torch.exp(S, out=Es)
    zs = Es.sum(-1)
    log_zs, log_zt = zs.log(), zt.log()
    c = log_zt - log_zs  # log p - log q = (S' - T') + c
    if "h" in want:
        out["h"] = (log_zs - _dot(Es, S, tmp, masked) / zs) / math.log(S.shape[-1])
    if want & {"rkl", "fkl"} or loss in ("reverse_kl", "forward_kl"):
        torch.sub(S, T, out=D)  # D = S' - T'
        if "rkl" in want or loss == "reverse_kl":
            out["rkl"] = _dot(Es, D, tmp, masked) / zs + c
        if "fkl" in want or loss == "forward_kl":
            out["fkl"] = -_dot(Et, D, tmp, masked) / zt - c
    if loss is None:
        return out
    if loss == "reverse_kl":  # G = exp(S') * (D + c - rkl), gradient = G / zs
        out["loss"] = out["rkl"]
        torch.add(D, (c - out["rkl"])[:, None], out=T)
        T.mul_(Es)
        out["scale"] = 1.0 / zs
    elif loss == "forward_kl":  # G = exp(S') - exp(T') * zs / zt, gradient = G / zs
        out["loss"] = out["fkl"]
        torch.addcmul(Es, Et, (-zs / zt)[:, None], out=T)
        out["scale"] = 1.0 / zs
    else:  # jsd, 0 < beta < 1; the endpoints are the two KLs (`losses.jsd`)
        out["loss"] = _jsd_block(S, T, Es, Et, zs, zt, D, tmp, beta, masked)
        out["scale"] = torch.ones_like(zs)
    if masked and loss != "forward_kl":
        T.masked_fill_(Es == 0, 0.0)  # no mass, no gradient (0 * inf above)
    return out


def _jsd_block(S, T, Es, Et, zs, zt, M, tmp, beta: float, masked: bool) -> torch.Tensor:
    """Generalized JSD per row, G over T, from shifted logits S', T' and their exps (see `_block`).

    With a = log((1 - beta) p), b = log(beta q), log M = logaddexp(a, b), A = a - log M, B = b - log M:
    JSD = <beta q, B> + <(1 - beta) p, A> - beta log beta - (1 - beta) log(1 - beta) and the gradient
    is (1 - beta) p * (A - <(1 - beta) p, A> / (1 - beta)).
    """
    lb, l1b = math.log(beta), math.log1p(-beta)
    S.sub_((zs.log() - l1b)[:, None])  # a
    T.sub_((zt.log() - lb)[:, None])  # b
    torch.logaddexp(S, T, out=M)
    S.sub_(M)  # A
    T.sub_(M)  # B
    Es.mul_(((1.0 - beta) / zs)[:, None])  # (1 - beta) p
    Et.mul_((beta / zt)[:, None])  # beta q
    a_dot = _dot(Es, S, tmp, masked)
    value = _dot(Et, T, tmp, masked) + a_dot - beta * lb - (1.0 - beta) * l1b
    torch.sub(S, (a_dot / (1.0 - beta))[:, None], out=T)
    T.mul_(Es)
    return value


def _at_endpoints(divergence: Optional[str], beta: float) -> Optional[str]:
    """JSD at beta = 0 is the forward KL and at 1 the reverse KL, substituted exactly (`losses.jsd`)."""
    if divergence == "jsd" and beta <= 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta >= 1.0:
        return "reverse_kl"
    return divergence


@torch.no_grad()
def divergence_and_grad(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, divergence: str,
                        beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's per-row divergence [N] and its analytic gradient with respect to the student logits
    [N, V], on logits given directly (-inf entries allowed): what the tests hold against autograd."""
    divergence = _at_endpoints(divergence, beta)
    buf = torch.float64 if student_logits_N_V.dtype == torch.float64 else torch.float32
    S, T = student_logits_N_V.to(buf).clone(), teacher_logits_N_V.to(buf).clone()
    res = _block(S, T, [torch.empty_like(S) for _ in range(4)], frozenset(), divergence, beta, masked=True)
    return res["loss"], T * res["scale"][:, None]


# --- the pass -------------------------------------------------------------------------------------------------


@dataclass
class HeadPass:
    """What one pass hands back: per-token statistics [N] (fp32), and with a loss its sum and gradients."""

    stats: dict[str, torch.Tensor]
    loss_sum: Optional[torch.Tensor] = None  # scalar, fp32 (fp64 for fp64 inputs)
    grad_hidden_N_H: Optional[torch.Tensor] = None
    grad_weight: Optional[torch.Tensor] = None  # the student head's weight, full width (zero past vocab_width)
    grad_bias: Optional[torch.Tensor] = None


def _compute_dtype(device: torch.device, x: torch.Tensor) -> torch.dtype:
    """The ambient autocast dtype (the dtype policy's compute dtype), else the hidden states' own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return x.dtype


@torch.no_grad()
def head_pass(student_hidden_N_H: torch.Tensor, teacher_hidden_N_H: torch.Tensor, student_head: Head, teacher_head: Head, *,
              rows_N: Optional[torch.Tensor] = None, vocab_width: Optional[int] = None, want: frozenset = frozenset(),
              loss: Optional[str] = None, beta: float = 0.5, grads: bool = False, chunk_rows: Optional[int] = None,
              workspace: Optional[Workspace] = None) -> HeadPass:
    """Statistics `want` (subset of STATS) and, with `loss`, the divergence summed over the positions and
    (with `grads`) its gradients, chunk by chunk.

    Positions: the rows of `*_hidden_N_H`, or the rows `rows_N` of them (gathered per chunk, no N x H copy).
    """
    device = student_hidden_N_H.device
    N = student_hidden_N_H.shape[0] if rows_N is None else rows_N.numel()
    loss = _at_endpoints(loss, beta)
    compute = _compute_dtype(device, student_hidden_N_H)
    buf = torch.float64 if compute == torch.float64 else torch.float32
    mm_dtype = compute if (compute == buf or _native_low_precision(device)) else buf
    ws = workspace or Workspace()
    C = chunk_rows or default_chunk(device)
    R = min(C, BLOCK_ROWS.get(device.type, C))
    with torch.autocast(device.type, enabled=False):  # explicit dtypes below
        s_op = _Operand.of(student_head, vocab_width, compute, mm_dtype, buf, student_hidden_N_H)
        t_op = _Operand.of(teacher_head, vocab_width, compute, mm_dtype, buf, teacher_hidden_N_H)
        V = s_op.vocab
        masked = not (s_op.linear and t_op.linear)
        if grads and not s_op.linear:
            raise TypeError(f"the fused loss needs a linear student LM head (torch.nn.Linear), got {type(student_head).__name__}")
        stats = {k: torch.zeros(N, dtype=torch.float32, device=device) for k in _ORDER if k in want}
        loss_sum = torch.zeros((), dtype=buf, device=device) if loss else None
        grad_h = grad_w = grad_b = None
        if grads:
            weight = student_head.weight
            grad_h = torch.empty(N, student_hidden_N_H.shape[1], dtype=student_hidden_N_H.dtype, device=device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype, device=device)
            grad_b = None if s_op.bias is None else torch.zeros(student_head.bias.shape, dtype=grad_w.dtype, device=device)
        for start in range(0, N, C):
            sl = slice(start, min(start + C, N))
            idx = None if rows_N is None else rows_N[sl]
            s_C_H = student_hidden_N_H[sl] if idx is None else student_hidden_N_H[idx]
            t_C_H = teacher_hidden_N_H[sl] if idx is None else teacher_hidden_N_H[idx]
            n = s_C_H.shape[0]
            S = s_op.project(s_C_H, ws.take("student", n, V, buf, device))
            T = t_op.project(t_C_H, ws.take("teacher", n, V, buf, device))
            scale_C = torch.empty(n, dtype=buf, device=device) if loss else None
            for r in range(0, n, R):
                rs = slice(r, min(r + R, n))
                scratch = [ws.take(f"scratch{i}", rs.stop - r, V, buf, device) for i in range(4)]
                res = _block(S[rs], T[rs], scratch, want, loss, beta, masked)
                for k in stats:
                    stats[k][start + r : start + rs.stop] = res[k].float()
                if loss:
                    loss_sum += res["loss"].sum()
                    scale_C[rs] = res["scale"]
            if grads:
                G = T if mm_dtype == buf else ws.take("grad_lowp", n, V, mm_dtype, device).copy_(T)
                gh = _mm(G, s_op.weight, torch.empty(n, grad_w.shape[1], dtype=buf, device=device))
                grad_h[sl] = gh.mul_(scale_C[:, None])
                hs = (s_C_H.to(compute).to(buf) * scale_C[:, None]).to(mm_dtype)  # the row factor on the cheap side
                _mm(G.t(), hs, grad_w[:V], accumulate=True)
                if grad_b is not None:
                    grad_b[:V] += torch.mv(T.t(), scale_C).to(grad_b.dtype)
    return HeadPass(stats, loss_sum, grad_h, grad_w, grad_b)


# --- the kept-token loss: an autograd Function around the pass ------------------------------------------------


class _FusedLoss(torch.autograd.Function):
    """loss_sum (and non-differentiable statistics) forward; backward hands on the gradients the
    forward already computed, scaled by the upstream gradient (usually 1 / kept tokens)."""

    @staticmethod
    def forward(ctx, s_K_H, weight, bias, t_K_H, student_head, teacher_head, vocab_width, divergence, beta, want, chunk_rows,
                workspace):
        result = head_pass(s_K_H.detach(), t_K_H, student_head, teacher_head, vocab_width=vocab_width, want=want,
                           loss=divergence, beta=beta, grads=True, chunk_rows=chunk_rows, workspace=workspace)
        ctx.save_for_backward(result.grad_hidden_N_H, result.grad_weight, result.grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        stats_S_K = torch.stack([result.stats[k] for k in _ORDER if k in want]) if want else s_K_H.new_zeros(0, s_K_H.shape[0])
        ctx.mark_non_differentiable(stats_S_K)
        return result.loss_sum.to(torch.float32 if s_K_H.dtype != torch.float64 else torch.float64), stats_S_K

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.used:
            raise RuntimeError("the fused kept-token loss scales its saved gradients in place: backward runs once")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if not bool(grad_loss == 1):  # the usual 1 / n_kept: scale in place, no second V x H tensor
            grad_h.mul_(grad_loss.to(grad_h.dtype))
            grad_w.mul_(grad_loss.to(grad_w.dtype))
            if grad_b is not None:
                grad_b.mul_(grad_loss.to(grad_b.dtype))
        grad_w = grad_w.to(ctx.weight_dtype)  # pure-bf16 weights: accumulated in fp32, handed back in bf16
        grad_b = None if grad_b is None else grad_b.to(ctx.weight_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def kept_token_loss(
    student_hidden_B_T_H: torch.Tensor,
    teacher_hidden_B_T_H: torch.Tensor,
    keep_mask_B_T: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    divergence: str,
    beta: float,
    chunk_size: Optional[int],
    vocab_width: Optional[int] = None,
    *,
    stats_out: Optional[TokenStats] = None,
    workspace: Optional[Workspace] = None,
) -> tuple[torch.Tensor, int]:
    """Divergence summed over the kept positions -> (loss_sum scalar with grad, n_kept), fused (see module doc).

    `*_hidden_B_T_H[b, t]` is the final hidden state that predicts response token t (already shifted).
    `stats_out` (TokenStats of [B, T] tensors): h, rkl, fkl of the kept positions are written into it, from
    the same pass (`selector=full` keeps every token, so it needs no statistics pass of its own).
    Memory: the workspace's chunk buffers, K x H hidden states and their gradient, one V x H head gradient.
    """
    B, T, H = student_hidden_B_T_H.shape
    idx_K = keep_mask_B_T.reshape(-1).nonzero().squeeze(1)  # host sync: the count sizes the loop
    n_kept = int(idx_K.numel())
    if n_kept == 0:
        # An empty sum is 0 with a grad path, and cannot pick up NaN/inf from padding positions.
        return student_hidden_B_T_H.reshape(-1)[:0].sum(), 0
    if not is_linear(student_head):
        raise TypeError(f"the fused loss needs a linear student LM head (torch.nn.Linear), got {type(student_head).__name__}")
    # One gather: its backward is one index_put, so the backbone backpropagates once from K x H.
    s_K_H = student_hidden_B_T_H.reshape(B * T, H)[idx_K]
    t_K_H = teacher_hidden_B_T_H.detach().reshape(B * T, -1)[idx_K]
    want = STATS if stats_out is not None else frozenset()
    loss_sum, stats_S_K = _FusedLoss.apply(s_K_H, student_head.weight, student_head.bias, t_K_H, student_head, teacher_head,
                                           vocab_width, divergence, beta, want, chunk_size, workspace)
    if stats_out is not None:
        for i, name in enumerate(k for k in _ORDER if k in want):
            getattr(stats_out, f"{name}_B_T").view(-1)[idx_K] = stats_S_K[i]
    return loss_sum, n_kept
