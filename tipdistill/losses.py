"""[5] Masked divergence over kept positions only: project just the kept hidden states, chunk by chunk.

The memory saving of TIP lives here. `kept_token_loss` never holds a (kept tokens x vocab) tensor with
autograd state: each chunk's LM-head projection and divergence run inside a non-reentrant activation
checkpoint, so autograd keeps only the chunk's hidden states and recomputes the logits in backward.
`naive_masked_loss` is the peer-style baseline (all logits with grad, mask afterwards), kept for tests
and benchmarks. Losses return `(sum, count)`; the caller divides (mean over kept tokens, TIP Eq. 9).

Divergences take logits [N, V] and follow the conventions of `numerics.py` (fp32 at least, full
vocabulary, -inf logits are zero probability, never NaN).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _chunk_divergence_sum(
    s_C_H: torch.Tensor,
    t_C_H: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    divergence_fn: Callable,
    beta: float,
    vocab_width: Optional[int],
) -> torch.Tensor:
    """Sum of the divergence over one chunk. Runs under checkpoint: everything here is recomputed in
    backward, so only (s_C_H, t_C_H) stay alive between forward and backward."""
    with torch.no_grad():  # the teacher is frozen; recomputing its chunk logits beats holding K x V
        t_logits_C_V = head_logits(teacher_head, t_C_H, vocab_width)
    s_logits_C_V = head_logits(student_head, s_C_H, vocab_width)
    return divergence_fn(s_logits_C_V, t_logits_C_V, beta).sum()


def kept_token_loss(
    student_hidden_B_T_H: torch.Tensor,
    teacher_hidden_B_T_H: torch.Tensor,
    keep_mask_B_T: torch.Tensor,
    student_head: Head,
    teacher_head: Head,
    divergence: str,
    beta: float,
    chunk_size: int,
    vocab_width: Optional[int] = None,
) -> tuple[torch.Tensor, int]:
    """Divergence summed over the kept positions only -> (loss_sum scalar with grad, n_kept).

    `*_hidden_B_T_H[b, t]` is the final hidden state that predicts response token t (already shifted).
    Memory: O(chunk_size x V) logits at any time, forward and backward; O(K x H) hidden states.
    """
    divergence_fn = DIVERGENCES.get(divergence)
    B, T, H = student_hidden_B_T_H.shape
    idx_K = keep_mask_B_T.reshape(-1).nonzero().squeeze(1)  # host sync: the count sizes the loop
    n_kept = int(idx_K.numel())
    if n_kept == 0:
        # An empty sum is 0 with a grad path, and cannot pick up NaN/inf from padding positions.
        return student_hidden_B_T_H.reshape(-1)[:0].sum(), 0

    # One gather and one split: their backwards are a single index_put and a single cat. Slicing in a
    # loop instead would make every chunk's backward allocate a full K x H zero tensor.
    s_K_H = student_hidden_B_T_H.reshape(B * T, H)[idx_K]
    with torch.no_grad():
        t_K_H = teacher_hidden_B_T_H.reshape(B * T, -1)[idx_K]
    loss_sum = None
    for s_C_H, t_C_H in zip(s_K_H.split(chunk_size), t_K_H.split(chunk_size)):
        # Non-reentrant checkpoint: autograd saves the chunk inputs only; logits and log-softmax are
        # rebuilt in backward. The function is deterministic, so the RNG state need not be stashed.
        chunk_sum = checkpoint(
            _chunk_divergence_sum, s_C_H, t_C_H, student_head, teacher_head, divergence_fn, beta, vocab_width,
            use_reentrant=False, preserve_rng_state=False,
        )
        loss_sum = chunk_sum if loss_sum is None else loss_sum + chunk_sum
    return loss_sum, n_kept


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
    every position, masked afterwards. Correct but saves no memory; for tests and the benchmark only."""
    divergence_fn = DIVERGENCES.get(divergence)
    B, T, H = student_hidden_B_T_H.shape
    with torch.no_grad():
        t_logits_BT_V = head_logits(teacher_head, teacher_hidden_B_T_H.reshape(B * T, -1), vocab_width)
    s_logits_BT_V = head_logits(student_head, student_hidden_B_T_H.reshape(B * T, H), vocab_width)
    div_BT = divergence_fn(s_logits_BT_V, t_logits_BT_V, beta)
    mask_BT = mask_B_T.reshape(-1)
    return torch.where(mask_BT, div_BT, 0.0).sum(), int(mask_BT.sum())
