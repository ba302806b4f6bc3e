"""[6] The dtype policy: fp32 master weights for the trainable student, `model.dtype` as compute dtype.

- `model.dtype` (float32 | bfloat16) is the compute dtype: the teacher's and vLLM's weights are stored in
  it, and the student runs its forward under autocast to it. The weight sync casts to it.
- `model.student_dtype` is the dtype of the weights the optimizer updates: float32 by default (master
  weights). bfloat16 (pure bf16, 6 bytes per parameter less) only with `optim=adamw_kahan`.

Why: next to a bf16 weight w any change below about |w|/512 rounds away (6e-5 next to 0.02), and an
AdamW step moves a weight by about lr, so at the paper's lr of 1e-6 plain AdamW on bf16 weights
leaves nearly every weight bit-identical while the loss and gradient norm look normal. torch-optimi's
AdamW with Kahan summation keeps the rounding error of every bf16 update in a bf16 compensation
buffer and adds it back on the next step, so small updates accumulate as they would in fp32.

Bytes per student parameter (weights + gradients + AdamW moments [+ compensation]):
fp32 master 4 + 4 + 8 = 16; pure bf16 with Kahan 2 + 2 + 4 + 2 = 10; plain AdamW on bf16 (refused) 8.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tipdistill.config import ConfigError, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # teacher and vLLM weights; the student's forward under autocast
    student: torch.dtype  # the student's parameters, i.e. what the optimizer updates

    def autocast(self, device: torch.device):
        """The context for every forward of the update step (and of HF rollouts): bf16 matmuls over fp32
        master weights. A no-op when the weights already are the compute dtype."""
        if self.compute == self.student:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.compute)


def precision(cfg: TrainConfig) -> Precision:
    return Precision(compute=DTYPES[cfg.model.dtype], student=DTYPES[cfg.model.student_dtype])


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """AdamW on fp32 master weights (`optim=adamw`), or torch-optimi's Kahan-compensated AdamW on bf16
    weights (`optim=adamw_kahan`). Same update rule and eps as torch's AdamW either way."""
    params = [p for p in params if p.requires_grad]
    o = cfg.optim
    if o.name == "adamw":
        low = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
        if low:  # the config check refuses this combination; this guards every other way in
            raise ConfigError(f"plain AdamW on {'/'.join(low)} weights rounds away every update smaller than about |w|/512; "
                              "fix: keep model.student_dtype=float32 (fp32 master weights) or use optim=adamw_kahan")
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    from optimi import AdamW

    return AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, kahan_sum=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a DTensor); the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


class UpdateMeter:
    """One optimizer step, measured: `optim/update_ratio` = |applied update| / |weights| and
    `optim/update_moved_frac` = the share of weights the step changed, both on the optimizer's master
    weights (fp32 parameters, or bf16 parameters plus their Kahan compensation). A run whose weights do
    not move shows 0 at step 1.

    Measured on a fixed, evenly strided sample of at most `sample` weights spread over every tensor
    (all of them below that), so it costs a few MB and two gathers per step however big the model."""

    NO_STEP = {"optim/update_ratio": 0.0, "optim/update_moved_frac": 0.0}

    def __init__(self, optimizer: torch.optim.Optimizer, sample: int = 1 << 20, cat=None):
        """`cat` joins every process's sample (`runtime.cat`); with sharded parameters (DTensor) each
        process samples its own shard."""
        self.optimizer = optimizer
        self.cat = cat or (lambda x_N: x_N)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        share = min(1.0, sample / max(1, sum(_local(p).numel() for p in params)))
        self.index = []
        for p in params:
            n = _local(p).numel()
            k = max(1, math.ceil(n * share))
            # integer arithmetic: a float32 linspace rounds past the last index above 2**24 weights
            idx = None if k >= n else torch.arange(k, device=_local(p).device) * (n - 1) // max(1, k - 1)
            self.index.append((p, idx))

    @torch.no_grad()
    def _master_sample(self) -> torch.Tensor:
        parts = []
        for p, idx in self.index:
            w = _local(p).detach().reshape(-1)
            w = (w if idx is None else w[idx]).float()
            comp = self.optimizer.state.get(p, {}).get("kahan_comp")
            if torch.is_tensor(comp) and _local(comp).numel() == _local(p).numel():
                c = _local(comp).reshape(-1)
                w = w + (c if idx is None else c[idx]).float()
            parts.append(w)
        return torch.cat(parts)  # a copy: the step cannot change it

    def __call__(self) -> dict:
        """`optimizer.step()`, and the metrics of the update it applied."""
        before = self._master_sample()
        self.optimizer.step()
        delta = self.cat(self._master_sample() - before)
        before = self.cat(before)
        return {"optim/update_ratio": float(delta.norm() / before.norm().clamp_min(1e-30)),
                "optim/update_moved_frac": float((delta != 0).float().mean())}
