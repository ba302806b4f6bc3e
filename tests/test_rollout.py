"""Response mask, the one stop rule and the one-position shift: only generated tokens (stop id
included) are trained, and a response that did not end on a stop id is counted as truncated."""

import pytest
import torch

from tipdistill.rollout import TokenRules, make_rollout, token_rules
from tipdistill.teacher import response_hidden

PAD, EOS, EOS2 = 0, 1, 2
RULES = TokenRules(stop_ids=(EOS, EOS2), pad_id=PAD, n_token_ids=30, context=16)


def test_cut_keeps_the_first_generated_stop_id():
    assert RULES.cut([5, 6, EOS, 7, 8]) == [5, 6, EOS]
    assert RULES.cut([5, EOS2, 6, EOS]) == [5, EOS2]  # any stop id ends the response
    assert RULES.cut([5, 6]) == [5, 6]


def test_truncated_means_not_ended_on_a_stop_id():
    # cut by max_tokens, cut by the context (shorter than max_tokens), ended on either stop id (even at max_tokens)
    assert RULES.truncated([5, 6, 7, 8]) and RULES.truncated([5]) and RULES.truncated([])
    assert not RULES.truncated([5, 6, 7, EOS2]) and not RULES.truncated([EOS])


def test_mask_from_lengths_not_from_pad_id():
    # pad == eos, as in many real tokenizers: the EOS the student generated must still count.
    rules = TokenRules(stop_ids=(PAD,), pad_id=PAD, n_token_ids=30, context=16)
    prompts = [[10, 11, 12], [13]]
    responses = [[20, 21, PAD], [22], [], [23, 24, 25, 26]]  # 2 rollouts per prompt; PAD acts as EOS here
    r = make_rollout(prompts, responses, 2, rules)
    assert r.prompt_len == 3
    assert r.response_mask_B_T.tolist() == [
        [True, True, True, False], [True, False, False, False], [False] * 4, [True] * 4]
    # left-padded prompts, right-padded responses
    assert r.input_ids_B_L[2].tolist() == [PAD, PAD, 13, PAD, PAD, PAD, PAD]
    assert r.attention_mask_B_L[2].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert r.attention_mask_B_L[3].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert r.prompt_index_B.tolist() == [0, 0, 1, 1]
    assert r.truncated_B.tolist() == [False, True, True, True]
    assert r.position_ids_B_L[3].tolist() == [0, 0, 0, 1, 2, 3, 4]


def test_budgets_leave_room_in_the_context_and_a_full_prompt_is_an_error():
    from tipdistill.config import ConfigError

    assert RULES.budgets([[5] * 3, [5] * 12], max_tokens=8) == [8, 4]  # 12 + 4 = the 16-position context
    with pytest.raises(ConfigError, match="a prompt of 16 tokens leaves no room for a response in the 16-position context; fix:"):
        RULES.budgets([[5] * 3, [5] * 16], max_tokens=8)


def test_rules_from_tokenizer_and_generation_config(tmp_path):
    """Stop ids = tokenizer EOS + generation-config EOS ids (deduplicated, tokenizer's first); no pad token
    (Llama-3.1) pads with the first stop id; padded LM-head rows start at the tokenizer's size."""
    from transformers import GenerationConfig

    from standins import build_tokenizer

    qwen, llama = build_tokenizer("qwen"), build_tokenizer("llama31")
    q = token_rules(qwen, 64, GenerationConfig(eos_token_id=qwen.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])))
    assert qwen.convert_ids_to_tokens(list(q.stop_ids)) == ["<|im_end|>", "<|endoftext|>"] and q.pad_id == qwen.pad_token_id
    assert q.n_token_ids == len(qwen) == 261 and q.masked_ids(264) == [261, 262, 263] and q.masked_ids(261) == []
    assert llama.pad_token_id is None
    ids = llama.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    lr = token_rules(llama, 64, GenerationConfig(eos_token_id=ids))
    assert llama.convert_ids_to_tokens(list(lr.stop_ids)) == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    assert lr.pad_id == llama.eos_token_id
    assert token_rules(llama, 64, GenerationConfig()).stop_ids == (llama.eos_token_id,)  # no generation config ids


class _Echo(torch.nn.Module):
    """A stand-in backbone whose hidden state at column c is the input id at c (to see the shift)."""

    def __init__(self):
        super().__init__()
        self.model = self

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        return type("O", (), {"last_hidden_state": input_ids[..., None].float()})()


def test_response_hidden_is_shifted_by_one():
    r = make_rollout([[10, 11, 12]], [[20, 21, EOS]], 1, RULES)
    h = response_hidden(_Echo(), r, slice(0, 1))
    # response token t is predicted from column prompt_len + t - 1: last prompt token, then 20, 21
    assert h[0, :, 0].tolist() == [12.0, 20.0, 21.0]
