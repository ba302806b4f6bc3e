"""[2] `rollout=hf`: transformers `generate` behind the engine interface.

It samples from the trainer's own module, so `sync_weights` has nothing to copy; it is the
reference engine for debugging and for machines without vLLM.
"""

from __future__ import annotations

import torch

from tipdistill.rollout import cut_at_eos


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids_P: list[list[int]], n: int, *, temperature: float, top_p: float,
                top_k: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Left-padded batched generation; sampling is seeded per call under a forked RNG so that
    generation never disturbs (or is disturbed by) the trainer's random stream."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(model.parameters()).device
    Lp = max(len(p) for p in prompt_ids_P)
    ids = torch.tensor([[pad] * (Lp - len(p)) + p for p in prompt_ids_P], device=device)
    mask = torch.tensor([[0] * (Lp - len(p)) + [1] * len(p) for p in prompt_ids_P], device=device)
    greedy = temperature == 0.0
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, num_return_sequences=1 if greedy else n,
                             pad_token_id=pad, eos_token_id=eos, **kwargs)
    model.train(was_training)
    responses = [cut_at_eos(row[Lp:].tolist(), eos) for row in out]
    if greedy and n > 1:  # greedy samples are identical: generate once, repeat
        responses = [r for r in responses for _ in range(n)]
    return responses


class HFEngine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompt_ids_P, n, *, temperature, top_p, top_k, max_tokens, seed):
        return hf_generate(self.model, self.tokenizer, prompt_ids_P, n, temperature=temperature, top_p=top_p,
                           top_k=top_k, max_tokens=max_tokens, seed=seed)

    def sync_weights(self, model) -> None:
        assert model is self.model, "HFEngine samples from the trainer's module; nothing to sync"

    def sleep(self) -> None:  # the trainer's own module: nothing separate to free
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
