"""Was this process started as one rank of a job (torchrun, or submitit's TorchDistributedEnvironment)?
Torch-free, so the CLI can ask before it imports the training stack."""

from __future__ import annotations

import os

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun for every process it starts

# Hydra overrides for ranks other than 0, under torchrun or a submitit launcher: no .hydra/ files, no job
# log file, warnings to the console only (rank 0 writes the run's files).
QUIET_RANK = ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]


def launched() -> bool:
    """Started by a distributed launcher: every process of the job has its rank in the environment."""
    return all(v in os.environ for v in LAUNCH_VARS)


def rank() -> int:
    """This process's rank in the job (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))
