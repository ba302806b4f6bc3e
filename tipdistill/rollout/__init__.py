"""[2] Student rollouts: a registry of generation engines behind one small interface.

An engine turns prompt token ids into sampled response token ids and can take the trainer's new
weights (`sync_weights`) after every optimizer step, so rollouts are always on-policy.
`make_rollout` packs the ids into the batch layout of `types.Rollout`.

`TokenRules` is the one place that says which ids end a response (the tokenizer's EOS plus every
EOS id of the model's generation config, as vLLM stops on them), which id pads, which LM-head rows
may never be sampled, and how many positions a prompt and its response may use. Both engines, the
rollout mask and the truncation flag read it, so the two engines cannot disagree on where a
response ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from tipdistill.errors import ConfigError
from tipdistill.registry import Registry
from tipdistill.types import Rollout

ENGINES = Registry("rollout engine", "rollout.engine")
ENGINES["vllm"] = "tipdistill.rollout.vllm_engine:VLLMEngine"
ENGINES["hf"] = "tipdistill.rollout.hf_engine:HFEngine"


class RolloutEngine(Protocol):
    rules: TokenRules

    def generate(self, prompt_ids_P: list[list[int]], n: int, *, temperature: float, top_p: float,
                 top_k: int, max_tokens: int, seed: int, first: int = 0) -> list[list[int]]:
        """P*n responses grouped by prompt, sampled from exactly the student's distribution (no sampling
        field taken from the model's generation_config.json), never a padded-head id. Each ends at (and
        includes) its first stop id, or is cut at `max_tokens` or at the context. temperature 0 = argmax.
        `first`: the index of the first response in the whole batch when this process samples a share of it
        (seeds follow global indices where the engine can seed each response: vLLM)."""

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights (`runtime.full_weights(student)`) so the next rollout is on-policy."""

    def sleep(self) -> None:
        """Between a rollout and the next sync: give the engine's accelerator memory to the update (may no-op)."""

    def wake(self) -> None:
        """Undo `sleep` before the weight sync."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class TokenRules:
    """Where responses stop, what pads, what is never sampled, and how long a rollout may be."""

    stop_ids: tuple[int, ...]  # any of these ends a response (and is kept, so it is trained on)
    pad_id: int  # filler under attention mask 0; the tokenizer's pad, else the first stop id (Llama-3.1 has none)
    n_token_ids: int  # ids the tokenizer can decode; LM-head rows at or above it are padding, masked in sampling
    context: int  # positions a prompt plus its response may use

    def budgets(self, prompt_ids_P: list[list[int]], max_tokens: int) -> list[int]:
        """New tokens each prompt may get: max_tokens, or less where the prompt leaves less room in the
        context (the response is then cut there and counted as truncated). A prompt that leaves no room
        at all is an error: there is nothing to sample or train on."""
        out = [min(max_tokens, self.context - len(p)) for p in prompt_ids_P]
        if min(out) < 1:
            longest = max(len(p) for p in prompt_ids_P)
            raise ConfigError(f"a prompt of {longest} tokens leaves no room for a response in the {self.context}-position context; "
                              "fix: drop such problems from task.path, or raise rollout.max_model_len up to the student's context")
        return out

    def truncated(self, response: list[int]) -> bool:
        """Cut off (by max_tokens or by the context) rather than ended by the model."""
        return not response or response[-1] not in self.stop_ids

    def cut(self, ids: list[int]) -> list[int]:
        """Keep tokens up to and including the first stop id (it was generated, so it is trained on)."""
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                return list(ids[: i + 1])
        return list(ids)

    def masked_ids(self, head_width: int) -> list[int]:
        """LM-head rows past the tokenizer: untrained padding (Qwen: 267-271 of them) that decodes to nothing."""
        return list(range(self.n_token_ids, head_width))


def generation_config_of(model_dir: str, trust_remote_code: bool = False):
    """The model's generation config as vLLM reads it: generation_config.json, else the model config's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code))


def token_rules(tokenizer, context: int, generation_config) -> TokenRules:
    """Stop ids: the tokenizer's EOS plus the generation config's EOS ids (Qwen: <|im_end|> and
    <|endoftext|>; Llama-3.1: <|eot_id|>, <|eom_id|>, <|end_of_text|>), the set vLLM stops on.
    Pad: the tokenizer's, else the first stop id. Only the EOS ids are read from the generation config."""
    extra = generation_config.eos_token_id
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    ids = ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + extra
    if not ids:
        raise ConfigError("neither the tokenizer nor the generation config names an EOS token, so no response could end; "
                          "fix: use a model whose tokenizer has an eos_token")
    stop_ids = tuple(dict.fromkeys(int(i) for i in ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    n_token_ids = max(max(tokenizer.get_vocab().values()) + 1, len(tokenizer))
    return TokenRules(stop_ids=stop_ids, pad_id=int(pad_id), n_token_ids=n_token_ids, context=int(context))


def make_rollout(prompt_ids_P: list[list[int]], responses_B: list[list[int]], n: int, rules: TokenRules) -> Rollout:
    """Left-pad prompts, right-pad responses; the response mask comes from lengths, never from
    `== pad_id` (pad may equal EOS in real tokenizers, and the EOS must count)."""
    B = len(responses_B)
    prompts_B = [prompt_ids_P[i // n] for i in range(B)]
    Lp = max(len(p) for p in prompts_B)
    T = max(1, max(len(r) for r in responses_B))
    input_ids = torch.full((B, Lp + T), rules.pad_id, dtype=torch.long)
    attention = torch.zeros((B, Lp + T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts_B, responses_B)):
        input_ids[b, Lp - len(p) : Lp] = torch.tensor(p, dtype=torch.long)
        attention[b, Lp - len(p) : Lp] = 1
        if r:
            input_ids[b, Lp : Lp + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[b, Lp : Lp + len(r)] = 1
            response_mask[b, : len(r)] = True
    truncated = torch.tensor([rules.truncated(r) for r in responses_B])
    return Rollout(input_ids, attention, response_mask, Lp, truncated, torch.arange(B) // n)
