"""Sweeps on a cluster: one Hydra job = one SLURM array task = one distributed run (hydra-submitit-launcher).

Hydra composes the sweep once, in the launching process; hydra-submitit-launcher pickles the launcher
with that config and runs each job as a submitit job of `tasks_per_node x nodes` tasks. tipdistill's
launchers (hydra_plugins/tipdistill_launcher, `hydra/launcher=slurm` or `=local`) add three things, all
here so that the plugin stays a thin subclass:

- each task becomes one rank of the job: submitit's `TorchDistributedEnvironment` exports RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which the training stack reads as it reads
  torchrun's (tipdistill/distributed.py); ranks other than 0 write no Hydra files and no log file;
- requeue follows submitit's checkpointing protocol: SLURM's warning signal (USR2, `signal_delay_s`
  before the time limit, or on preemption) makes every rank finish its step and save a checkpoint
  (tipdistill/train.py), then the signal goes on to submitit's own handler, which calls the launcher's
  `checkpoint()` (the same job again, with `resume=auto`) and requeues it;
- the requeued job resumes from its own run directory and continues its W&B run, whose id is derived
  from the sweep directory and the job number (`sweep_run_id`).

Torch-free and submitit-free at import: the CLI asks before it loads the training stack.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from pathlib import Path

from tipdistill.launch import QUIET_RANK

log = logging.getLogger(__name__)



def in_submitit_job() -> bool:
    """This process is a task of a submitit job (local or SLURM)."""
    return "SUBMITIT_EXECUTOR" in os.environ


def join_job() -> int:
    """Export the rank environment of this submitit task (torch.distributed's env:// variables); its rank.
    All GPUs of the node stay visible: the runtime picks `cuda:LOCAL_RANK`."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env.rank


def job_overrides(sweep_overrides: list[str], rank: int) -> list[str]:
    """The job's overrides on this rank: rank 0 writes Hydra's files, the others none."""
    return list(sweep_overrides) + (QUIET_RANK if rank else [])


def requeue_overrides(sweep_overrides: list[str]) -> list[str]:
    """The overrides a requeued job runs with: `resume=auto` (continue from its own run directory's last
    checkpoint, or start afresh if it saved none), unless it resumes from a directory given by path."""
    kept = [o for o in sweep_overrides if not o.lstrip("+").startswith("resume=")]
    given = [o.split("=", 1)[1] for o in sweep_overrides if o.lstrip("+").startswith("resume=")]
    if given and given[-1] not in ("null", "true", "True", "auto"):
        return list(sweep_overrides)  # resume=<run dir>: that directory is where this job writes
    return kept + ["resume=auto"]


def sweep_run_id(sweep_dir: str | Path, job_num: int) -> str:
    """The W&B run id of job `job_num` of the sweep in `sweep_dir`: the same for every attempt of the job
    (a requeue continues the run), different for every job of every sweep (sweep directories are unique)."""
    key = f"{Path(sweep_dir).resolve()}#{int(job_num)}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]  # W&B ids: letters, digits, '-', '_'


def hand_on(signum: int | None) -> None:
    """After the checkpoint of a run stopped by a signal: give the signal to the handler that was installed
    before training (in a submitit job, submitit's: on rank 0 it calls the launcher's `checkpoint()`,
    requeues the job and exits; elsewhere it logs). Nothing happens outside a submitit job."""
    if signum is None or not in_submitit_job():
        return
    handler = signal.getsignal(signum)
    if callable(handler):
        log.warning("signal %d: checkpoint saved, handing over to submitit (requeue)", signum)
        handler(signum, None)
