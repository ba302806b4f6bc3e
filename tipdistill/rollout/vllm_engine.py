"""[2] `rollout=vllm` (default): vLLM in the training process, weights synced in place every step.

In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so `sync_weights` can hand the trainer's tensors to
the engine's `reload_weights` without a copy through another process. Each sequence gets its own
sampling seed derived from (call seed, index), so runs reproduce and the n samples of a prompt differ.

Exactly the student's distribution: `generation_config="vllm"` keeps vLLM's neutral defaults instead of
the model's generation_config.json, and every SamplingParams field that shapes the distribution is set.
vLLM still stops on the generation config's EOS ids; `TokenRules.stop_ids` holds the same ids and is
passed as `stop_token_ids`, so this engine and the HF one stop on one set.

In a torchrun job every rank runs its own engine inside the trainer's process group
(`distributed_executor_backend="external_launcher"`): each samples its rank's share of the prompts,
each response seeded by its index in the whole batch, so the batch does not depend on how it is split.
With `rollout.tensor_parallel_size=k` (CUDA) k consecutive ranks form one engine; they pool their
prompts, generate them together and each keeps its own responses.
"""

from __future__ import annotations

import os

from tipdistill.models import DTYPES
from tipdistill.rollout import TokenRules


class VLLMEngine:
    def __init__(self, model_dir: str, cfg, rules: TokenRules, *, dtype: str, seed: int, device: str):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        kwargs = dict(
            model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=rules.context,
            max_num_seqs=cfg.max_num_seqs, seed=seed, generation_config="vllm",
        )
        from tipdistill.launch import launched

        # A torchrun job: this rank's engine joins the trainer's process group. Asked of the environment, not of
        # torch.distributed: a one-process vLLM engine initialises a group of its own, and the next engine of the
        # same process must not take that for a job.
        job = launched()
        if job:
            kwargs.update(distributed_executor_backend="external_launcher")
        # ranks that submit to one engine (torchrun with tensor parallelism); one process drives its own TP workers
        self.tp = cfg.tensor_parallel_size if device == "cuda" and job else 1
        if device == "cuda":
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                          tensor_parallel_size=cfg.tensor_parallel_size)
        else:
            # A chunked prefill makes vLLM rewind the seeded sampler of the cut request
            # (`Generator.set_offset`), which CPU generators do not have: the step crashes with
            # "CPU Generator does not use offset". Whole prefills only, with a budget that fits one.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, rules.context))
        self.llm = LLM(**kwargs)
        self.rules, self.dtype = rules, DTYPES[dtype]
        # Padded LM-head rows are never sampled: a -inf bias on them (Qwen: 267 ids), or, when the padding
        # outnumbers the real ids (model=embedded_wide), the real ids as the allowed list. Per request, so short.
        masked = rules.masked_ids(self.llm.llm_engine.model_config.get_vocab_size())
        if len(masked) <= rules.n_token_ids:
            self.mask_kw = {"logit_bias": dict.fromkeys(masked, float("-inf"))} if masked else {}
        else:
            self.mask_kw = {"allowed_token_ids": list(range(rules.n_token_ids))}
        # Rotary layers own no checkpoint weights; vLLM warns "Failed to load weights" for them on every
        # in-place reload, and then (correctly) keeps their tables. Silence that one logger.
        import logging

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        # Sleep mode needs CUDA's memory pool; on CPU sleep()/wake() are no-ops.
        self.sleep_mode = device == "cuda" and cfg.enable_sleep_mode
        self.asleep = False

    def generate(self, prompt_ids_P, n, *, temperature, top_p, top_k, max_tokens, seed, first=0):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        budgets = self.rules.budgets(prompt_ids_P, max_tokens)
        shares = self._pool(prompt_ids_P, budgets, first)
        prompts, params = [], []
        for share_P, budgets_P, share_first in shares:
            for i in range(len(share_P) * n):
                prompts.append(TokensPrompt(prompt_token_ids=share_P[i // n]))
                params.append(SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k, min_p=0.0, repetition_penalty=1.0,
                                             presence_penalty=0.0, frequency_penalty=0.0, min_tokens=0, max_tokens=budgets_P[i // n],
                                             stop_token_ids=list(self.rules.stop_ids), ignore_eos=False, **self.mask_kw,
                                             seed=(seed * 1_000_003 + share_first + i) % (2**31), detokenize=False))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        start = sum(len(share_P) for share_P, _, _ in shares[: self._tp_rank()]) * n
        return [self.rules.cut(list(o.outputs[0].token_ids)) for o in outs[start : start + len(prompt_ids_P) * n]]

    def _tp_rank(self) -> int:
        if self.tp == 1:
            return 0
        from vllm.distributed.parallel_state import get_tp_group

        return get_tp_group().rank_in_group

    def _pool(self, prompt_ids_P, budgets, first: int) -> list:
        """[(prompts, budgets, first)] of every rank of this engine's tensor-parallel group, in rank order:
        its ranks must all submit the same requests."""
        if self.tp == 1:
            return [(prompt_ids_P, budgets, first)]
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        shares = [None] * self.tp
        dist.all_gather_object(shares, (prompt_ids_P, budgets, first), group=get_tp_group().cpu_group)
        return shares

    def sync_weights(self, weights) -> None:
        """Copy the trainer's weights into the engine in place (no reload from disk); `weights` yields
        (name, full tensor) pairs one at a time, so the engine takes them as they are gathered, each cast
        to the engine's dtype (fp32 master weights -> bf16 engine)."""
        cast = ((name, t.detach().to(self.dtype)) for name, t in weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": cast})

    def sleep(self) -> None:
        """After a rollout: level 1 frees the KV cache and moves vLLM's weights to CPU memory, so the
        teacher pass and the update get that GPU memory. The weights are synced on wake anyway."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        del self.llm
