"""[2] `rollout=hf`: transformers `generate` behind the engine interface.

It samples from the trainer's own module, so `sync_weights` has nothing to copy; it is the
reference engine for debugging and for machines without vLLM.

Seeds: one per call (transformers draws every sequence of a batch from one random stream), so a
response depends on the batch it was drawn in. With several ranks each rank's call is seeded from
(seed, index of its first response), so ranks draw different streams, but a 2-rank run does not draw
the same responses as one process would (the vLLM engine does: it seeds each response). With FSDP2
the sharded student's forwards are collectives, so every rank keeps stepping until all are done
(`synced_gpus`).

Exactly the student's distribution: transformers fills every generation field left unset from the
model's generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05-1.1, top_k 20, top_p 0.8)
and then from its own defaults (top_k 50). So every field that changes the distribution is set here,
and the model's own generation config is set aside for the call.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from tipdistill.rollout import TokenRules


def generation_config(rules: TokenRules, *, greedy: bool, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                      masked_ids: list[int], num_return_sequences: int):
    """Every field that shapes the sampled distribution, set to the student's own (neutral) value."""
    from transformers import GenerationConfig

    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(
        **sampling, max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=1, num_return_sequences=num_return_sequences,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, renormalize_logits=False, remove_invalid_values=False,
        suppress_tokens=masked_ids or None,  # padded LM-head rows: -inf, in greedy too
        eos_token_id=list(rules.stop_ids), pad_token_id=rules.pad_id, use_cache=True,
    )


@contextmanager
def _own_generation_config(model):
    """Fields left None in the call's config are filled from `model.generation_config` (the hub file):
    replace it with an empty one for the duration of the call."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def hf_generate(model, rules: TokenRules, prompt_ids_P: list[list[int]], n: int, *, temperature: float, top_p: float,
                top_k: int, max_tokens: int, seed: int = 0, autocast=None, synced: bool = False) -> list[list[int]]:
    """Left-padded batched generation; sampling is seeded per call under a forked RNG so that
    generation never disturbs (or is disturbed by) the trainer's random stream."""
    budgets = rules.budgets(prompt_ids_P, max_tokens)
    device = next(model.parameters()).device
    Lp = max(len(p) for p in prompt_ids_P)
    ids = torch.tensor([[rules.pad_id] * (Lp - len(p)) + p for p in prompt_ids_P], device=device)
    mask = torch.tensor([[0] * (Lp - len(p)) + [1] * len(p) for p in prompt_ids_P], device=device)
    greedy = temperature == 0.0
    head_width = model.get_output_embeddings().weight.shape[0]
    config = generation_config(rules, greedy=greedy, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max(budgets),
                               masked_ids=rules.masked_ids(head_width), num_return_sequences=1 if greedy else n)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _own_generation_config(model), (autocast or nullcontext)():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced)
    model.train(was_training)
    per_prompt = 1 if greedy else n
    # A prompt with less room than max_tokens: its response stops where the context ends.
    responses = [rules.cut(row[Lp : Lp + budgets[i // per_prompt]].tolist()) for i, row in enumerate(out)]
    if greedy and n > 1:  # greedy samples are identical: generate once, repeat
        responses = [r for r in responses for _ in range(n)]
    return responses


class HFEngine:
    def __init__(self, model, rules: TokenRules, autocast=None, synced: bool = False):
        """`autocast`: the trainer's compute-dtype context, so rollouts come from the same function the loss sees.
        `synced`: the model is sharded over several ranks (each rank generates its own share)."""
        self.model, self.rules, self.autocast, self.synced = model, rules, autocast, synced

    def generate(self, prompt_ids_P, n, *, temperature, top_p, top_k, max_tokens, seed, first=0):
        return hf_generate(self.model, self.rules, prompt_ids_P, n, temperature=temperature, top_p=top_p, top_k=top_k,
                           max_tokens=max_tokens, seed=(seed + first) % 2**63, autocast=self.autocast, synced=self.synced)

    def sync_weights(self, weights) -> None:
        """Nothing to copy: the engine samples from the trainer's own module."""

    def sleep(self) -> None:  # the trainer's own module: nothing separate to free
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
