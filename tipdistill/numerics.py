"""[4]-[5] Numerics shared by the statistics (scoring.py) and the loss (losses.py): the LM-head
projection and entropy / KL on log-probabilities.

One home, so the numbers a selector ranks by and the numbers the loss trains on are computed by the
same code. Conventions: at least fp32 (fp64 passes through, so tests can compare to 1e-6), sums over
the full (shared) vocabulary, and 0 * log 0 = 0 for -inf log-probabilities (masked vocabulary
entries), never NaN, in the forward and in the gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# hidden [..., H] -> logits [..., V]: model.lm_head, a linear head (`is_linear`: the fused pass of fused_head.py uses
# its weight directly; the loss needs one), or any callable (statistics and references: it may mask entries with -inf)
Head = Callable[[torch.Tensor], torch.Tensor]


class UnhookedHead:
    """A linear LM head applied to whatever weight its module holds now, without the module's hooks: FSDP2
    swaps the gathered weight in and out (tipdistill/distributed.py), and a hooked call per chunk would add
    collectives that ranks with different chunk counts do not share. `weight`/`bias` are the module's
    current ones, for the fused pass that multiplies by them directly."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.head.bias

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.head.weight, self.head.bias)


def is_linear(head: Head) -> bool:
    """A head that is `hidden @ weight.T + bias` with readable weight and bias: a torch.nn.Linear or one
    applied unhooked (the sharded student's, `UnhookedHead`)."""
    return isinstance(head, (torch.nn.Linear, UnhookedHead))


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32/fp64 unchanged (fp64 lets tests compare to 1e-6)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def head_logits(head: Head, hidden_N_H: torch.Tensor, vocab_width: Optional[int]) -> torch.Tensor:
    """Project through an LM head, upcast, and keep the shared vocabulary prefix `[:vocab_width]`."""
    logits_N_V = upcast(head(hidden_N_H))
    return logits_N_V if vocab_width is None else logits_N_V[..., :vocab_width]


def kl_logp(logp_N_V: torch.Tensor, logq_N_V: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, [N]. Entries with p = 0 (logp = -inf) contribute exactly 0.

    The `where` sits on the log-ratio, not on the product, so the gradient is NaN-free too
    (p * where(...) has finite factors; a where around the product would backprop 0 * nan).
    """
    logratio_N_V = torch.where(torch.isneginf(logp_N_V), 0.0, logp_N_V - logq_N_V)
    return (logp_N_V.exp() * logratio_N_V).sum(-1)


def entropy_logp(logp_N_V: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats per row, [N]; 0 * log 0 = 0."""
    return -(logp_N_V.exp() * torch.where(torch.isneginf(logp_N_V), 0.0, logp_N_V)).sum(-1)
