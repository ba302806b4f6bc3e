"""Typed containers passed between the pipeline stages; field names carry their shapes.

B = sequences in the update batch, L = prompt + response columns, T = response positions,
H = hidden size, V = vocabulary (logits width), K = kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """[2] Student rollouts as one batch: prompt left-padded to `prompt_len`, response right-padded.

    Column `prompt_len + t` holds response token t; it is predicted by the hidden state at column
    `prompt_len + t - 1` (the one-position shift).
    """

    input_ids_B_L: torch.Tensor  # long [B, L]
    attention_mask_B_L: torch.Tensor  # long [B, L], 0 at padding
    response_mask_B_T: torch.Tensor  # bool [B, T], True at tokens the student generated (EOS included)
    prompt_len: int  # columns of (left-padded) prompt
    truncated_B: torch.Tensor  # bool [B], response did not end on a stop id (cut by max_completion_length or the context)
    prompt_index_B: torch.Tensor  # long [B], index of the prompt each sequence answers

    @property
    def position_ids_B_L(self) -> torch.Tensor:
        """Positions that skip left padding, so padded and unpadded sequences see the same positions."""
        return (self.attention_mask_B_L.cumsum(-1) - 1).clamp(min=0)

    @property
    def response_ids_B_T(self) -> torch.Tensor:
        return self.input_ids_B_L[:, self.prompt_len :]

    def micro_batches(self, size: int) -> list[slice]:
        """Row slices of at most `size` sequences: one forward (and backward) each."""
        B = self.input_ids_B_L.shape[0]
        return [slice(i, min(i + size, B)) for i in range(0, B, size)]

    def to(self, device: torch.device) -> "Rollout":
        """The batch tensors on `device` (the per-sequence flags stay where they are: only metrics read them)."""
        return Rollout(self.input_ids_B_L.to(device), self.attention_mask_B_L.to(device), self.response_mask_B_T.to(device),
                       self.prompt_len, self.truncated_B, self.prompt_index_B)


@dataclass
class TokenStats:
    """[4a] Per-token statistics of the response positions, computed without grad in fp32.

    All tensors are [B, T] float32 and zero where `mask_B_T` is False.
    """

    h_B_T: torch.Tensor  # student entropy / ln|V|, in [0, 1]
    rkl_B_T: torch.Tensor  # KL(student || teacher): delta_t in TIP, and the default loss
    fkl_B_T: torch.Tensor  # KL(teacher || student): used by the q3 ranking only
    mask_B_T: torch.Tensor  # bool [B, T], valid response tokens
