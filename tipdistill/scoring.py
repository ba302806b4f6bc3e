"""[4a] Per-token statistics: normalised student entropy h, rkl = KL(S||T) and fkl = KL(T||S) per response token.

Computed without grad and chunk by chunk through the LM heads, so at most (chunk_size x V) logits exist at
once: the statistics only rank tokens, they are never differentiated. Also the batch normalisation used
by the selector scores and the 2x2 quadrant reading aid of the TIP paper.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tipdistill.numerics import Head, entropy_logp, head_logits, kl_logp
from tipdistill.types import TokenStats


@torch.no_grad()
def token_stats(
    student_hidden_B_T_H: torch.Tensor,
    teacher_hidden_B_T_H: torch.Tensor,
    mask_B_T: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    chunk_size: int,
    vocab_width: Optional[int] = None,
) -> TokenStats:
    """h, rkl, fkl at the valid positions of `mask_B_T`, as fp32 [B, T] tensors (0 elsewhere).

    `*_hidden_B_T_H[b, t]` is the hidden state that predicts response token t. `vocab_width` keeps the
    shared prefix of LM heads padded to different widths; h divides by ln of the width actually used.
    """
    B, T = mask_B_T.shape
    device = mask_B_T.device
    s_BT_H = student_hidden_B_T_H.reshape(B * T, -1)
    t_BT_H = teacher_hidden_B_T_H.reshape(B * T, -1)
    idx_N = mask_B_T.reshape(-1).nonzero().squeeze(1)
    h_BT, rkl_BT, fkl_BT = (torch.zeros(B * T, dtype=torch.float32, device=device) for _ in range(3))
    for idx_C in idx_N.split(chunk_size):
        # Gather per chunk: no N x H copy, and only this chunk's logits are alive.
        s_logp_C_V = F.log_softmax(head_logits(student_head, s_BT_H[idx_C], vocab_width), dim=-1)
        t_logp_C_V = F.log_softmax(head_logits(teacher_head, t_BT_H[idx_C], vocab_width), dim=-1)
        h_BT[idx_C] = (entropy_logp(s_logp_C_V) / math.log(s_logp_C_V.shape[-1])).float()
        rkl_BT[idx_C] = kl_logp(s_logp_C_V, t_logp_C_V).float()
        fkl_BT[idx_C] = kl_logp(t_logp_C_V, s_logp_C_V).float()
        del s_logp_C_V, t_logp_C_V
    return TokenStats(h_B_T=h_BT.view(B, T), rkl_B_T=rkl_BT.view(B, T), fkl_B_T=fkl_BT.view(B, T), mask_B_T=mask_B_T.bool())


def _quantile(x_N: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) via sort: torch.quantile caps its input size.
    An exact rank returns that element (no interpolation: inf * 0 would be NaN next to an infinite value)."""
    xs_N = x_N.sort().values
    pos = q * (xs_N.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, xs_N.numel() - 1)
    if pos == lo:
        return xs_N[lo]
    return xs_N[lo] + (xs_N[hi] - xs_N[lo]) * (pos - lo)


def _minmax(x_N: torch.Tensor, clip_quantile: Optional[float]) -> torch.Tensor:
    """Clip at the upper quantile (optional), then scale the finite values to [0, 1]; +inf maps to 1.

    An infinite reverse KL (the teacher gives -inf where the student has mass) is the largest possible
    divergence: it ranks with the largest finite value instead of turning the batch's scale into inf
    and itself into NaN. A constant input maps to 0.
    """
    if clip_quantile is not None and clip_quantile < 1.0:
        x_N = x_N.clamp(max=_quantile(x_N, clip_quantile))
    inf_N = torch.isposinf(x_N)
    lo = x_N.min()
    hi = torch.where(inf_N, lo, x_N).max()  # the largest finite value (no host sync)
    span = hi - lo
    scaled_N = torch.where(span > 0, (x_N - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return torch.where(inf_N, 1.0, scaled_N)


def normalise(
    stats: TokenStats, entropy_clip_quantile: Optional[float] = 0.98, rkl_clip_quantile: Optional[float] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_hat_B_T, rkl_hat_B_T) in [0, 1] over the batch's valid tokens, fp32, 0 outside the mask.

    h is clipped at its `entropy_clip_quantile` so a few near-uniform positions do not squash the rest;
    the paper does not clip delta, so `rkl_clip_quantile` defaults to None.
    """
    mask_B_T = stats.mask_B_T
    h_hat_B_T = torch.zeros_like(stats.h_B_T)
    rkl_hat_B_T = torch.zeros_like(stats.rkl_B_T)
    if bool(mask_B_T.any()):
        h_hat_B_T[mask_B_T] = _minmax(stats.h_B_T[mask_B_T], entropy_clip_quantile)
        rkl_hat_B_T[mask_B_T] = _minmax(stats.rkl_B_T[mask_B_T], rkl_clip_quantile)
    return h_hat_B_T, rkl_hat_B_T


def quadrants(stats: TokenStats, entropy_threshold: float, rkl_threshold: float) -> torch.Tensor:
    """Quadrant id per token, long [B, T]: 1 high h & high rkl, 2 high h & low rkl, 3 low h & high rkl
    (overconfident), 4 low h & low rkl; 0 outside the mask. "High" means strictly above the threshold."""
    high_h = stats.h_B_T > entropy_threshold
    high_d = stats.rkl_B_T > rkl_threshold
    q_B_T = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return torch.where(stats.mask_B_T, q_B_T, 0).long()


def quadrant_fractions(q_B_T: torch.Tensor, where_B_T: torch.Tensor) -> dict[str, float]:
    """Share of the `where_B_T` tokens in each quadrant: {"q1": .., "q2": .., "q3": .., "q4": ..}; zeros if none."""
    where_B_T = where_B_T.bool()
    n = int(where_B_T.sum())
    if n == 0:
        return {f"q{i}": 0.0 for i in range(1, 5)}
    counts_5 = torch.bincount(q_B_T[where_B_T].long(), minlength=5).tolist()
    return {f"q{i}": counts_5[i] / n for i in range(1, 5)}
