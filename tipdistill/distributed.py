"""Several processes in one job: torchrun, FSDP2 for student and teacher, TIP over the whole batch.

`torchrun --nproc_per_node N -m tipdistill train ...` starts N copies of the CLI; each finds RANK and
WORLD_SIZE in its environment, joins one process group (NCCL for CUDA tensors, gloo for CPU tensors,
one group for both) and runs `train()` with a `DistributedRuntime`. PyTorch's own stack does the work:

- the student is sharded with FSDP2 (`fully_shard`): each decoder layer is a unit, the input embedding
  and the LM head are one unit (one tensor when tied, as in small Qwen models and the embedded pair; the
  head is called chunk by chunk outside the backbone's forward, which FSDP2's grouped modules allow),
  the backbone `model.model` is the root. The statistics and the loss apply the head to that unit's
  unsharded weight directly (`lm_head`), so the number of chunks, which differs between ranks, never
  changes the sequence of collectives. Gradients are summed, not averaged, because the loss is already
  divided by the kept count of the whole batch. With bf16 compute FSDP2 all-gathers bf16 copies of the
  fp32 master shards and reduces gradients in fp32 (`MixedPrecisionPolicy`), and the update runs under
  the same autocast as one process (tipdistill/precision.py);
- the teacher is frozen and sharded the same way except its LM head, which every rank keeps whole
  (resident for every statistics and loss chunk, so h, KL(S||T), KL(T||S) stay exact over the full
  vocabulary); `teacher_offload` keeps its body's shards on CPU (`CPUOffloadPolicy`, CUDA only);
- rank 0 alone reads the weights from disk; the other ranks build the model on the meta device and
  receive the weights by broadcast (`set_model_state_dict(..., broadcast_from_rank0=True)`), so host
  memory holds one copy per node, not one per rank;
- TIP's batch statistics are computed on the whole batch: `gather_rows` stacks every rank's per-token
  statistics in rank order (the order of one process's batch, since each rank takes a contiguous share
  of the prompts), so the entropy clip quantile, min-max normalisation, per_batch ranking (ties to the
  earlier position, row-major over the whole batch) and every selector's random draws are those of one
  process on the same batch. They are [B, T] numbers, not [B, T, V] logits.

Imports torch and transformers only (the GPU box has no Hydra or vLLM).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from tipdistill import checkpoint, models
from tipdistill.errors import ConfigError
from tipdistill.launch import launched
from tipdistill.numerics import UnhookedHead
from tipdistill.precision import Precision, precision
from tipdistill.runtime import LocalRuntime, Number, Runtime, pick_device


def start() -> None:
    """Join the job's process group (once per process). One group serves both kinds of tensors: CUDA
    tensors go through NCCL, CPU tensors through gloo (a CPU mesh on a GPU host needs gloo: torch #132471)."""
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def launch_time() -> float:
    """Rank 0's clock, the same on every rank: each rank composes the Hydra config itself, and run
    directories named after the time must not differ by a second between ranks (hydra #2070)."""
    t = torch.tensor([time.time()], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def finish() -> None:
    """Leave the process group once every rank is done (after the rollout engines are closed)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def make_runtime(cfg) -> Runtime:
    """A job started by torchrun (or any launcher that sets RANK/WORLD_SIZE) runs sharded, on any number
    of ranks including one; a plain process runs as before."""
    if launched():
        start()
        return DistributedRuntime.from_config(cfg)
    return LocalRuntime.from_config(cfg)


def _check_shares(cfg, world_size: int) -> None:
    if cfg.prompts_per_step % world_size:  # every rank must run as many (FSDP-collective) forwards per step as the others
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} (the global batch) does not split evenly over the {world_size} "
                          f"ranks of this job; fix: a multiple of {world_size}")
    if cfg.task.eval_size < world_size:
        raise ConfigError(f"task.eval_size={cfg.task.eval_size} is less than the {world_size} ranks; fix: task.eval_size >= {world_size}")
    if cfg.optim.name != "adamw":
        raise ConfigError(f"optim={cfg.optim.name} is not supported in a torchrun job (torch-optimi's Kahan AdamW on FSDP2's "
                          "sharded parameters is untested); fix: fp32 master weights with optim=adamw")


@dataclass
class DistributedRuntime:
    """One rank of a job: FSDP2-sharded models, sums and gathers through the default process group."""

    device: torch.device
    precision: Precision
    rank: int
    world_size: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh over every rank, on `device`'s type
    checkpoints: checkpoint.Checkpoints = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            self.checkpoints = checkpoint.ShardedCheckpoints(self)

    @classmethod
    def from_config(cls, cfg) -> "DistributedRuntime":
        from torch.distributed.device_mesh import init_device_mesh

        world_size, r = dist.get_world_size(), dist.get_rank()
        _check_shares(cfg, world_size)
        device = pick_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(device, precision(cfg), r, world_size, init_device_mesh(device.type, (world_size,)))

    # --- which rank does what -------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def share(self, n: int) -> slice:
        """Contiguous shares, the first n % world ranks one item larger: rank order is item order."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # --- reductions -----------------------------------------------------------------------------------

    def sum(self, x: Number) -> Number:
        if isinstance(x, torch.Tensor):
            y = x.detach().clone()
            dist.all_reduce(y)
            return y
        t = torch.tensor([x], dtype=torch.float64 if isinstance(x, float) else torch.int64)  # CPU: through gloo
        dist.all_reduce(t)
        return type(x)(t.item())

    def _sizes(self, shape: tuple[int, ...], device: torch.device) -> list[list[int]]:
        local = torch.tensor(shape, dtype=torch.int64, device=device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return [s.tolist() for s in out]

    def gather_rows(self, x_B_T: torch.Tensor) -> tuple[torch.Tensor, slice]:
        sizes = self._sizes(tuple(x_B_T.shape[:2]), x_B_T.device)
        B_max, T_max = max(s[0] for s in sizes), max(s[1] for s in sizes)
        padded = x_B_T.new_zeros((B_max, T_max, *x_B_T.shape[2:]))
        padded[: x_B_T.shape[0], : x_B_T.shape[1]] = x_B_T
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        start = sum(s[0] for s in sizes[: self.rank])
        return torch.cat([p[: s[0]] for p, s in zip(parts, sizes)]), slice(start, start + x_B_T.shape[0])

    def cat(self, x_N: torch.Tensor) -> torch.Tensor:
        rows, _ = self.gather_rows(x_N[None, :])
        sizes = self._sizes((x_N.shape[0],), x_N.device)
        return torch.cat([row[: s[0]] for row, s in zip(rows, sizes)])

    # --- models ---------------------------------------------------------------------------------------

    def load_model(self, name: str, dtype: str, *, trainable: bool, trust_remote_code: bool = False,
                   gradient_checkpointing: bool = False, offload: bool = False) -> torch.nn.Module:
        """Rank 0 reads the checkpoint into CPU memory; the others build the model on the meta device.
        After sharding, every rank's shards are filled by broadcast from rank 0, buffers too (rotary
        tables are not in the state dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.is_main:
            model = models.load_model(name, dtype, torch.device("cpu"), trainable=trainable, trust_remote_code=trust_remote_code)
            full = model.state_dict()
        else:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[dtype], trust_remote_code=trust_remote_code)
            model.train(trainable)
            model.requires_grad_(trainable)
            full = {}
        if gradient_checkpointing:  # before sharding: HF wraps each decoder layer's call, FSDP2 hooks run inside
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.shard(model, trainable=trainable, offload=offload)
        if not self.is_main:
            model.to_empty(device=self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        with torch.no_grad():
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        return model

    def shard(self, model: torch.nn.Module, *, trainable: bool, offload: bool = False) -> None:
        """FSDP2 in place: the student's layout when `trainable`, else the frozen teacher's."""
        if trainable:
            self._shard_student(model)
        else:
            self._shard_teacher(model, offload)

    def _mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        p = self.precision
        if p.compute == p.student:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=p.compute, reduce_dtype=torch.float32)

    def _shard_student(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        kw = dict(mesh=self.mesh, mp_policy=self._mp_policy())
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        # One unit for the input embedding and the head: a tied pair is one tensor, and FSDP2 wants shared
        # parameters in one group. Kept unsharded after the backbone's forward: the statistics and every
        # loss chunk call the head next.
        fully_shard([model.get_input_embeddings(), model.get_output_embeddings()], reshard_after_forward=False, **kw)
        fully_shard(model.model, **kw)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # Sum, not mean: each rank's loss is already divided by the whole batch's kept count. SUM
                # collectives with the (unit) factor applied apart: gloo has no pre-multiplied sum.
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)

    def _shard_teacher(self, model: torch.nn.Module, offload: bool) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        offload_policy = CPUOffloadPolicy() if offload and self.device.type == "cuda" else OffloadPolicy()
        kw = dict(mesh=self.mesh, reshard_after_forward=True, offload_policy=offload_policy)
        if self.is_main:  # the head stays out of FSDP: whole on every rank (a tied one becomes its own copy)
            model.get_output_embeddings().to(self.device)
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(model.model, **kw)

    def place_teacher(self, model: torch.nn.Module, offload: bool):
        """Sharded at load time (with FSDP2's CPU offload if asked); the head is whole on every rank."""
        return model.get_output_embeddings(), nullcontext

    def lm_head(self, model: torch.nn.Module):
        """The head applied to its current (unsharded) weight, outside FSDP2's module hooks: each hooked call
        would add an all-gather and a reduce-scatter, and ranks run different numbers of chunks (their kept
        counts differ), so their collectives would not line up. The [embedding, head] unit is unsharded by
        the backbone's forward and stays so until the end of backward (`reshard_after_forward=False`); its
        gradient, from the embedding and every chunk, is reduced once, by FSDP2's end-of-backward callback."""
        return UnhookedHead(model.get_output_embeddings())

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def full_weights(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank gathers each parameter in turn (a collective: all ranks iterate in the same order),
        so every rank's rollout engine gets the weights without a whole state dict on any rank."""
        from torch.distributed.tensor import DTensor

        for name, t in model.state_dict().items():
            yield name, t.full_tensor() if isinstance(t, DTensor) else t

    def grad_norm(self, total_norm: torch.Tensor) -> float:
        """clip_grad_norm_ over sharded gradients returns the global norm as a replicated DTensor."""
        from torch.distributed.tensor import DTensor

        return float(total_norm.full_tensor() if isinstance(total_norm, DTensor) else total_norm)

    def autocast(self):
        return self.precision.autocast(self.device)

