"""Response mask and the one-position shift: only generated tokens (EOS included) are trained."""

import torch

from tipdistill.rollout import cut_at_eos, make_rollout
from tipdistill.train import response_hidden

PAD, EOS = 0, 1


def test_cut_at_eos_keeps_the_generated_eos():
    assert cut_at_eos([5, 6, EOS, 7, 8], EOS) == [5, 6, EOS]
    assert cut_at_eos([5, 6], EOS) == [5, 6]


def test_mask_from_lengths_not_from_pad_id():
    # pad == eos, as in many real tokenizers: the EOS the student generated must still count.
    prompts = [[10, 11, 12], [13]]
    responses = [[20, 21, PAD], [22], [], [23, 24, 25, 26]]  # 2 rollouts per prompt; PAD acts as EOS here
    r = make_rollout(prompts, responses, 2, pad_id=PAD, eos_id=PAD, max_tokens=4)
    assert r.prompt_len == 3
    assert r.response_mask_B_T.tolist() == [
        [True, True, True, False], [True, False, False, False], [False] * 4, [True] * 4]
    # left-padded prompts, right-padded responses
    assert r.input_ids_B_L[2].tolist() == [PAD, PAD, 13, PAD, PAD, PAD, PAD]
    assert r.attention_mask_B_L[2].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert r.attention_mask_B_L[3].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert r.prompt_index_B.tolist() == [0, 0, 1, 1]
    assert r.truncated_B.tolist() == [False, False, False, True]
    assert r.position_ids_B_L[3].tolist() == [0, 0, 0, 1, 2, 3, 4]


class _Echo(torch.nn.Module):
    """A stand-in backbone whose hidden state at column c is the input id at c (to see the shift)."""

    def __init__(self):
        super().__init__()
        self.model = self

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        return type("O", (), {"last_hidden_state": input_ids[..., None].float()})()


def test_response_hidden_is_shifted_by_one():
    r = make_rollout([[10, 11, 12]], [[20, 21, EOS]], 1, pad_id=PAD, eos_id=EOS, max_tokens=8)
    h = response_hidden(_Echo(), r, slice(0, 1))
    # response token t is predicted from column prompt_len + t - 1: last prompt token, then 20, 21
    assert h[0, :, 0].tolist() == [12.0, 20.0, 21.0]
