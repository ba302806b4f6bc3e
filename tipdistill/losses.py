"""[5] The registered per-token divergences (autograd, on logits) and the peer-style reference loss.

The loss the update trains with is `fused_head.kept_token_loss`: the same divergences with analytic
gradients, fused with the LM heads over the kept positions only. The functions here are the
definitions it is tested against (values and gradients, float64): `DIVERGENCES` by name (also the
config's list of loss names), `naive_masked_loss` the peer-style baseline (all logits with grad, mask
afterwards). Losses return `(sum, count)`; the caller divides (mean over kept tokens, TIP Eq. 9).

Divergences take logits [N, V] and follow the conventions of `numerics.py` (fp32 at least, full
vocabulary, -inf logits are zero probability, never NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tipdistill.numerics import Head, head_logits, kl_logp, upcast
from tipdistill.registry import Registry

DIVERGENCES = Registry("loss", "loss.name")


# --- the registered per-token divergences --------------------------------------------------------------


@DIVERGENCES.register("reverse_kl")
def reverse_kl(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """rkl = KL(P_S || P_T) per token [N]: the OPD/TIP training loss (mode-seeking). `beta` unused."""
    s_logp = F.log_softmax(upcast(student_logits_N_V), dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits_N_V), dim=-1)
    return kl_logp(s_logp, t_logp)


@DIVERGENCES.register("forward_kl")
def forward_kl(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """fkl = KL(P_T || P_S) per token [N] (mass-covering). `beta` unused."""
    s_logp = F.log_softmax(upcast(student_logits_N_V), dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits_N_V), dim=-1)
    return kl_logp(t_logp, s_logp)


@DIVERGENCES.register("jsd")
def jsd(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD(beta) per token [N], TRL's `GKDTrainer.generalized_jsd_loss` convention (GKD Eq. 1):

        M = beta * P_T + (1 - beta) * P_S
        JSD = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)      for 0 < beta < 1
        beta = 0 -> KL(P_T || P_S) (forward KL),  beta = 1 -> KL(P_S || P_T) (reverse KL)

    The endpoints are substituted exactly, as TRL does: the interior value tends to 0 at both ends
    (JSD ~ beta * fkl near 0, ~ (1 - beta) * rkl near 1), so the loss scale jumps at beta = 0 and 1;
    only the gradient direction is continuous there.
    """
    if beta <= 0.0:
        return forward_kl(student_logits_N_V, teacher_logits_N_V)
    if beta >= 1.0:
        return reverse_kl(student_logits_N_V, teacher_logits_N_V)
    s_logp = F.log_softmax(upcast(student_logits_N_V), dim=-1)
    t_logp = F.log_softmax(upcast(teacher_logits_N_V), dim=-1)
    # log M by logsumexp; entries where both are -inf are taken out first, because logsumexp's
    # backward at (-inf, -inf) is exp(nan) and would poison the gradient even behind a where.
    both_zero = torch.isneginf(s_logp) & torch.isneginf(t_logp)
    parts = torch.stack([s_logp + math.log1p(-beta), t_logp + math.log(beta)])
    m_logp = torch.logsumexp(torch.where(both_zero, 0.0, parts), dim=0)
    m_logp = torch.where(both_zero, -math.inf, m_logp)
    return beta * kl_logp(t_logp, m_logp) + (1.0 - beta) * kl_logp(s_logp, m_logp)


# --- losses over positions ----------------------------------------------------------------------------


def naive_masked_loss(
    student_hidden_B_T_H: torch.Tensor,
    teacher_hidden_B_T_H: torch.Tensor,
    mask_B_T: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    divergence: str,
    beta: float,
    vocab_width: Optional[int] = None,
) -> tuple[torch.Tensor, int]:
    """Peer-style reference -> (loss_sum, count): whole-batch (B*T x V) logits with grad, divergence at
    every position, masked afterwards. Correct but saves no memory; the tests' reference."""
    divergence_fn = DIVERGENCES.get(divergence)
    B, T, H = student_hidden_B_T_H.shape
    with torch.no_grad():
        t_logits_BT_V = head_logits(teacher_head, teacher_hidden_B_T_H.reshape(B * T, -1), vocab_width)
    s_logits_BT_V = head_logits(student_head, student_hidden_B_T_H.reshape(B * T, H), vocab_width)
    div_BT = divergence_fn(s_logits_BT_V, t_logits_BT_V, beta)
    mask_BT = mask_B_T.reshape(-1)
    return torch.where(mask_BT, div_BT, 0.0).sum(), int(mask_BT.sum())
