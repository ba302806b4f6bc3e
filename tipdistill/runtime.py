"""The runtime seam: what the loop and the update step ask of the processes they run on.

Everything that would differ between one process and a job of N ranks (torchrun, FSDP2) goes through
this small object, so `train()` and `update_step()` never branch on the world size:

  is_main           only the main process writes metrics, checkpoints and reports
  sum(x)            a count or sum over every process (the kept tokens the loss divides by, metrics)
  unwrap(model)     the plain module behind a wrapper (for `save_pretrained`)
  full_weights(m)   (name, full tensor) pairs one at a time, for the rollout engine's weight sync
  device, autocast  where this process computes, and in what precision

`LocalRuntime` is the one-process implementation: every reduction is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, TypeVar

import torch

from tipdistill.precision import Precision, precision

Number = TypeVar("Number", int, float, torch.Tensor)


class Runtime(Protocol):
    device: torch.device

    @property
    def is_main(self) -> bool: ...

    def sum(self, x: Number) -> Number:
        """`x` summed over every process (the same type back)."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's weights as full tensors, gathered one at a time (never a whole state dict on one rank)."""

    def autocast(self): ...


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class LocalRuntime:
    """One process on one device."""

    device: torch.device
    precision: Precision = Precision(torch.float32, torch.float32)  # student weights in model.student_dtype (fp32 master), forwards in model.dtype

    @classmethod
    def from_config(cls, cfg) -> "LocalRuntime":
        return cls(pick_device(cfg.device), precision(cfg))

    @property
    def is_main(self) -> bool:
        return True

    def sum(self, x: Number) -> Number:
        return x

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(model.state_dict().items())

    def autocast(self):
        """Forwards in the compute dtype over the student's master weights (a no-op when they agree)."""
        return self.precision.autocast(self.device)
