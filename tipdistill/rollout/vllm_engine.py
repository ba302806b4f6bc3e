"""[2] `rollout=vllm` (default): vLLM in the training process, weights synced in place every step.

In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so `sync_weights` can hand the trainer's tensors to
the engine's `reload_weights` without a copy through another process. Each sequence gets its own
sampling seed derived from (call seed, index), so runs reproduce and the n samples of a prompt differ.
"""

from __future__ import annotations

import os


class VLLMEngine:
    def __init__(self, model_dir: str, cfg, *, dtype: str, seed: int, max_model_len: int, device: str):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        kwargs = dict(
            model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
            max_num_seqs=cfg.max_num_seqs, seed=seed,
        )
        if device == "cuda":
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                          tensor_parallel_size=cfg.tensor_parallel_size)
        else:
            # A chunked prefill makes vLLM rewind the seeded sampler of the cut request
            # (`Generator.set_offset`), which CPU generators do not have: the step crashes with
            # "CPU Generator does not use offset". Whole prefills only, with a budget that fits one.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_model_len))
        self.llm = LLM(**kwargs)
        # Rotary layers own no checkpoint weights; vLLM warns "Failed to load weights" for them on every
        # in-place reload, and then (correctly) keeps their tables. Silence that one logger.
        import logging

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        # Sleep mode needs CUDA's memory pool; on CPU sleep()/wake() are no-ops.
        self.sleep_mode = device == "cuda" and cfg.enable_sleep_mode
        self.asleep = False

    def generate(self, prompt_ids_P, n, *, temperature, top_p, top_k, max_tokens, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids_P for _ in range(n)]
        params = [
            SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                           max_tokens=max_tokens, seed=(seed * 1_000_003 + i) % (2**31), detokenize=False)
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def sync_weights(self, model) -> None:
        """Copy the trainer's weights into the engine in place (no reload from disk)."""
        state = model.state_dict()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})

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
