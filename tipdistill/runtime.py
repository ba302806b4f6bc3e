"""The runtime seam: what the loop and the update step ask of the processes they run on.

Everything that would differ between one process and a job of N ranks (torchrun, FSDP2) goes through
this small object, so `train()` and `update_step()` never branch on the world size:

  is_main, world_size  only the main process writes metrics, checkpoints' shared files and reports
  main_first()      the main process runs a block first (prepares a cache), the others after it
  share(n)          this process's contiguous share of n items (prompts, held-out problems)
  sum(x)            a count or sum over every process (rewards, losses, evaluation counts)
  gather_rows(x)    a [B, T] tensor of every process stacked in rank order: the whole batch (TIP's
                    normalisation, per_batch ranking and metrics see it), and this process's rows in it
  cat(x)            1-d tensors of every process concatenated (the update-size sample)
  load_model        a model on this process's device (sharded with FSDP2 in a job of N ranks)
  place_teacher     where the frozen teacher's body lives and its LM head (resident for every loss chunk)
  lm_head(model)    the student's LM head as the statistics and the loss call it, chunk by chunk
  unwrap(model)     the plain module behind a wrapper
  full_weights(m)   (name, full tensor) pairs one at a time, for the rollout engine's weight sync
  grad_norm(t)      a gradient norm from clip_grad_norm_ as a float (a DTensor when sharded)
  checkpoints       how checkpoints are written and read (one format per runtime, checkpoint.py)
  device, autocast  where this process computes, and in what precision

`LocalRuntime` is the one-process implementation: every reduction is the identity. The job of N
ranks is `tipdistill.distributed.DistributedRuntime`; `distributed.make_runtime` picks by how the process started.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ContextManager, Iterator, Protocol, TypeVar

import torch

from tipdistill import checkpoint
from tipdistill.precision import Precision, precision

Number = TypeVar("Number", int, float, torch.Tensor)


class Runtime(Protocol):
    device: torch.device
    world_size: int
    checkpoints: checkpoint.Checkpoints

    @property
    def is_main(self) -> bool: ...

    def main_first(self) -> ContextManager:
        """The main process runs the block first (e.g. writes a cache), the others after it is done."""

    def share(self, n: int) -> slice:
        """This process's contiguous share of n items (all of them with one process)."""

    def sum(self, x: Number) -> Number:
        """`x` summed over every process (the same type back)."""

    def gather_rows(self, x_B_T: torch.Tensor) -> tuple[torch.Tensor, slice]:
        """Every process's [B_r, T_r] rows stacked in rank order (columns zero-padded to the widest), and
        the rows of this process in that stack."""

    def cat(self, x_N: torch.Tensor) -> torch.Tensor:
        """Every process's 1-d `x_N` concatenated in rank order."""

    def load_model(self, name: str, dtype: str, *, trainable: bool, trust_remote_code: bool = False,
                   gradient_checkpointing: bool = False, offload: bool = False) -> torch.nn.Module: ...

    def place_teacher(self, model: torch.nn.Module, offload: bool) -> tuple[Callable, Callable[[], ContextManager]]:
        """(LM head callable, context in which the body scores) of the frozen teacher."""

    def lm_head(self, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's weights as full tensors, gathered one at a time (never a whole state dict on one rank)."""

    def grad_norm(self, total_norm: torch.Tensor) -> float: ...

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
    world_size: int = 1
    checkpoints: checkpoint.Checkpoints = field(default_factory=checkpoint.PretrainedCheckpoints)

    @classmethod
    def from_config(cls, cfg) -> "LocalRuntime":
        return cls(pick_device(cfg.device), precision(cfg))

    @property
    def is_main(self) -> bool:
        return True

    def main_first(self) -> ContextManager:
        return nullcontext()

    def share(self, n: int) -> slice:
        return slice(0, n)

    def sum(self, x: Number) -> Number:
        return x

    def gather_rows(self, x_B_T: torch.Tensor) -> tuple[torch.Tensor, slice]:
        return x_B_T, slice(0, x_B_T.shape[0])

    def cat(self, x_N: torch.Tensor) -> torch.Tensor:
        return x_N

    def load_model(self, name: str, dtype: str, *, trainable: bool, trust_remote_code: bool = False,
                   gradient_checkpointing: bool = False, offload: bool = False) -> torch.nn.Module:
        from tipdistill import models  # transformers' Auto classes: only where a model is loaded (tests/test_imports.py)

        model = models.load_model(name, dtype, self.device, trainable=trainable, trust_remote_code=trust_remote_code)
        if gradient_checkpointing:  # non-reentrant: works with the frozen inputs and the chunked loss
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def place_teacher(self, model: torch.nn.Module, offload: bool):
        """`offload` is two-phase placement: the body on CPU except while it scores, the head resident."""
        if not offload:
            return model.get_output_embeddings(), nullcontext
        from tipdistill import models

        head = models.resident_head(model, self.device)
        model.model.to("cpu")
        return head, partial(models.visiting, model.model, self.device, True)

    def lm_head(self, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return model.get_output_embeddings()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(model.state_dict().items())

    def grad_norm(self, total_norm: torch.Tensor) -> float:
        return float(total_norm)

    def autocast(self):
        """Forwards in the compute dtype over the student's master weights (a no-op when they agree)."""
        return self.precision.autocast(self.device)
