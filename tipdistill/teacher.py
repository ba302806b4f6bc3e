"""[3] The teacher: final hidden states on the student's exact token ids, without grad, and its LM head.

The teacher scores the tokens the student sampled, under the same prompt rendering (P17). It hands
on hidden states, not logits: the statistics and the loss project them through `Teacher.head` chunk
by chunk, so no (tokens x vocab) teacher tensor is ever held. `response_hidden` is the forward both
models share (the student's runs in the update step, with grad).
"""

from __future__ import annotations

import torch

from tipdistill.runtime import Runtime
from tipdistill.types import Rollout


def response_hidden(model, rollout: Rollout, rows: slice) -> torch.Tensor:
    """Final hidden states [b, T, H] at the positions that predict each response token.

    The logit at column c scores the token at c + 1, so response token t (column Lp + t) is
    predicted from column Lp + t - 1: the one-position shift.
    """
    Lp, T = rollout.prompt_len, rollout.response_mask_B_T.shape[1]
    out = model.model(
        input_ids=rollout.input_ids_B_L[rows],
        attention_mask=rollout.attention_mask_B_L[rows],
        position_ids=rollout.position_ids_B_L[rows],
        use_cache=False,  # a scoring forward: building a KV cache would only cost memory
    )
    return out.last_hidden_state[:, Lp - 1 : Lp - 1 + T]


class Teacher:
    """The frozen teacher of a run.

    `offload` (the `teacher_offload` knob) keeps the body off the device except while it scores: with one
    process two-phase placement (body on CPU, visiting the device per scoring pass), in a sharded job
    FSDP2's CPU offload of the body's shards. The LM head stays on the device either way (a copy when
    tied to the embedding) because every statistics and loss chunk needs it. `runtime.place_teacher`
    decides.
    """

    def __init__(self, model, runtime: Runtime, offload: bool = False):
        self.model, self.runtime, self.offload = model, runtime, offload
        self.head, self._scoring = runtime.place_teacher(model, offload)

    @torch.no_grad()
    def hidden_states(self, rollout: Rollout, micro_batch_size: int) -> torch.Tensor:
        """[B, T, H] hidden states predicting every response position, one forward per micro-batch."""
        with self.runtime.autocast(), self._scoring():
            return torch.cat([response_hidden(self.model, rollout, rows) for rows in rollout.micro_batches(micro_batch_size)])
