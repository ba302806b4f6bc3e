"""Typed containers passed between the pipeline stages; field names carry their shapes.

The shape legend of every tensor (and per-item list) name in the project, e.g. `keep_mask_B_T`:
  B  sequences in the update batch (prompts x rollouts per prompt)
  L  prompt + response columns of a sequence
  T  response positions
  H  hidden size
  V  vocabulary (logits width; the shared prefix of both heads)
  K  kept positions (the tokens the loss trains on)
  N  positions flattened over the batch (a 2-D view whose rows are tokens, e.g. logits_N_V)
  C  positions of one chunk (an LM-head chunk), or of one row of a selection (R x C)
  R  rows a selection ranks over: B per sequence, 1 per batch; in the fused LM-head pass, the rows of one
     elementwise block of a chunk
  S  per-token statistics stacked (h, rkl, fkl: those a pass computed)
  P  prompts;  G  rollouts per prompt
Two letters together are one flattened axis: BT = B * T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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

    All tensors are [B, T] float32 and zero where `mask_B_T` is False. fkl is None when the step did not
    compute it (only the q3 selector reads it): absent, never a placeholder.
    """

    h_B_T: torch.Tensor  # student entropy / ln|V|, in [0, 1]
    rkl_B_T: torch.Tensor  # KL(student || teacher): delta_t in TIP, and the default loss
    mask_B_T: torch.Tensor  # bool [B, T], valid response tokens
    fkl_B_T: Optional[torch.Tensor] = None  # KL(teacher || student): used by the q3 ranking only

    @classmethod
    def zeros(cls, mask_B_T: torch.Tensor) -> "TokenStats":
        """All three statistics as zeros, to be filled in place (selector=full: by its loss pass)."""
        h, rkl, fkl = (torch.zeros(mask_B_T.shape, dtype=torch.float32, device=mask_B_T.device) for _ in range(3))
        return cls(h_B_T=h, rkl_B_T=rkl, fkl_B_T=fkl, mask_B_T=mask_B_T.bool())

    def rows(self, rows: slice) -> "TokenStats":
        """The statistics of a row slice (a micro-batch), as views: writing into them writes here."""
        return TokenStats(self.h_B_T[rows], self.rkl_B_T[rows], self.mask_B_T[rows],
                          None if self.fkl_B_T is None else self.fkl_B_T[rows])
