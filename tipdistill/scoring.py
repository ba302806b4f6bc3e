"""[4a] Per-token statistics: normalised student entropy h, rkl = KL(S||T) and fkl = KL(T||S) per response token.

Computed without grad and chunk by chunk through the LM heads (the fused pass of fused_head.py), so at
most (chunk_size x V) logits exist at once: the statistics only rank tokens, they are never
differentiated. fkl only when something reads it (the q3 selector, `analyze`). Also the batch normalisation used
by the selector scores and the 2x2 quadrant reading aid of the TIP paper.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tipdistill.fused_head import STATS, Workspace, head_pass
from tipdistill.numerics import Head
from tipdistill.types import TokenStats


# The statistics the metrics and quadrants always read; a selector adds what its rule reads (`Selector.reads`).
METRIC_STATS = frozenset({"h", "rkl"})


@torch.no_grad()
def token_stats(
    student_hidden_B_T_H: torch.Tensor,
    teacher_hidden_B_T_H: torch.Tensor,
    mask_B_T: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    chunk_size: Optional[int],
    vocab_width: Optional[int] = None,
    *,
    reads: frozenset = STATS,
    workspace: Optional[Workspace] = None,
) -> TokenStats:
    """h, rkl (and fkl if `reads` has it) at the valid positions of `mask_B_T`, as fp32 [B, T] tensors
    (0 elsewhere); fkl is None when not asked for, so nothing can read a value that was not computed.

    `*_hidden_B_T_H[b, t]` is the hidden state that predicts response token t. `vocab_width` keeps the
    shared prefix of LM heads padded to different widths; h divides by ln of the width actually used.
    One fused pass (`fused_head.head_pass`): per chunk two logits buffers, per row block one exp of each
    head, every statistic a row dot product, no (chunk x V) tensor allocated after the first chunk.
    """
    B, T = mask_B_T.shape
    want = METRIC_STATS | (frozenset(reads) & STATS)
    idx_N = mask_B_T.reshape(-1).nonzero().squeeze(1)
    result = head_pass(student_hidden_B_T_H.reshape(B * T, -1), teacher_hidden_B_T_H.reshape(B * T, -1), student_head,
                       teacher_head, rows_N=idx_N, vocab_width=vocab_width, want=want, chunk_rows=chunk_size, workspace=workspace)
    out = {}
    for name in ("h", "rkl", "fkl"):
        if name in want:
            x_BT = torch.zeros(B * T, dtype=torch.float32, device=mask_B_T.device)
            x_BT[idx_N] = result.stats[name]
            out[name] = x_BT.view(B, T)
    return TokenStats(h_B_T=out["h"], rkl_B_T=out["rkl"], fkl_B_T=out.get("fkl"), mask_B_T=mask_B_T.bool())


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
