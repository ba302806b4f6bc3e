"""[2] Student rollouts: a registry of generation engines behind one small interface.

An engine turns prompt token ids into sampled response token ids and can take the trainer's new
weights (`sync_weights`) after every optimizer step, so rollouts are always on-policy.
`make_rollout` packs the ids into the batch layout of `types.Rollout`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tipdistill.registry import Registry
from tipdistill.types import Rollout

ENGINES = Registry("rollout engine", "rollout.engine")
ENGINES["vllm"] = "tipdistill.rollout.vllm_engine:VLLMEngine"
ENGINES["hf"] = "tipdistill.rollout.hf_engine:HFEngine"


class RolloutEngine(Protocol):
    def generate(self, prompt_ids_P: list[list[int]], n: int, *, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, seed: int) -> list[list[int]]:
        """P*n responses grouped by prompt; each ends at (and includes) EOS if one was sampled.
        temperature 0 means greedy."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current weights so the next rollout is on-policy."""

    def sleep(self) -> None:
        """Between a rollout and the next sync: give the engine's accelerator memory to the update (may no-op)."""

    def wake(self) -> None:
        """Undo `sleep` before the weight sync."""

    def close(self) -> None: ...


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS (it was generated, so it is trained on)."""
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else list(ids)


def make_rollout(prompt_ids_P: list[list[int]], responses_B: list[list[int]], n: int, *, pad_id: int,
                 eos_id: int, max_tokens: int) -> Rollout:
    """Left-pad prompts, right-pad responses; the response mask comes from lengths, never from
    `== pad_id` (pad may equal EOS in real tokenizers, and the EOS must count)."""
    B = len(responses_B)
    prompts_B = [prompt_ids_P[i // n] for i in range(B)]
    Lp = max(len(p) for p in prompts_B)
    T = max(1, max(len(r) for r in responses_B))
    input_ids = torch.full((B, Lp + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, Lp + T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts_B, responses_B)):
        input_ids[b, Lp - len(p) : Lp] = torch.tensor(p, dtype=torch.long)
        attention[b, Lp - len(p) : Lp] = 1
        if r:
            input_ids[b, Lp : Lp + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[b, Lp : Lp + len(r)] = 1
            response_mask[b, : len(r)] = True
    truncated = torch.tensor([len(r) >= max_tokens and (not r or r[-1] != eos_id) for r in responses_B])
    return Rollout(input_ids, attention, response_mask, Lp, truncated, torch.arange(B) // n)
