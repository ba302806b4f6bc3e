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

    Measured on every `stride`-th weight of each tensor, about `sample` weights in all (every weight below
    that; integer strides stay exact at any tensor size). The sample is strided views joined by one
    `torch.cat`, so it costs a few MB and a handful of kernels per step however many tensors the model
    has (a gather per tensor was ~900 kernel launches: 0.02 s of a 0.19 s step on an H200)."""

    NO_STEP = {"optim/update_ratio": 0.0, "optim/update_moved_frac": 0.0}

    def __init__(self, optimizer: torch.optim.Optimizer, sample: int = 1 << 20, cat=None):
        """`cat` joins every process's sample (`runtime.cat`); with sharded parameters (DTensor) each
        process samples its own shard."""
        self.optimizer = optimizer
        self.cat = cat or (lambda x_N: x_N)
        self.params = [p for group in optimizer.param_groups for p in group["params"] if _local(p).numel()]
        self.stride = max(1, sum(_local(p).numel() for p in self.params) // sample)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return _local(t).detach().reshape(-1)[:: self.stride]

    @torch.no_grad()
    def _master_sample(self) -> torch.Tensor:
        if not self.params:
            return torch.zeros(0)
        w_N = torch.cat([self._view(p) for p in self.params]).float()  # a copy: the step cannot change it
        comps = [self.optimizer.state.get(p, {}).get("kahan_comp") for p in self.params]
        comps = [c if torch.is_tensor(c) and _local(c).numel() == _local(p).numel() else None for c, p in zip(comps, self.params)]
        if any(c is not None for c in comps):  # Kahan: the master weight is the bf16 weight plus its compensation
            w_N += torch.cat([torch.zeros_like(self._view(p)) if c is None else self._view(c) for c, p in zip(comps, self.params)]).float()
        return w_N

    def __call__(self) -> dict:
        """`optimizer.step()`, and the metrics of the update it applied."""
        before_N = self._master_sample()
        self.optimizer.step()
        delta_N = self.cat(self._master_sample() - before_N)
        before_N = self.cat(before_N)
        ratio, moved = torch.stack([delta_N.norm() / before_N.norm().clamp_min(1e-30), (delta_N != 0).float().mean()]).tolist()
        return {"optim/update_ratio": ratio, "optim/update_moved_frac": moved}
