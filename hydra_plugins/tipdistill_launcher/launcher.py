"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) and `hydra/launcher=local` (one machine):
hydra-submitit-launcher's launchers, where one Hydra job is one submitit job (a SLURM array task) of
several tasks, each one rank of one distributed run. What the subclass adds is in tipdistill/cluster.py.
(No `from __future__ import annotations`: Hydra execs plugin modules outside sys.modules, and dataclasses
with string annotations look their module up there.)"""


from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

try:  # the `cluster` extra; without it these launchers do not exist and Hydra's plugin scan stays quiet
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # pragma: no cover
    LocalLauncher = SlurmLauncher = None


class _RankedJob:
    """Mixed into a submitit launcher: the task's rank comes from submitit, requeues resume."""

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> Any:
        from tipdistill import cluster

        rank = cluster.join_job()
        return super().__call__(cluster.job_overrides(sweep_overrides, rank), job_dir_key, job_num, job_id, singleton_state)

    def checkpoint(self, sweep_overrides, *args: Any, **kwargs: Any) -> Any:
        """submitit's protocol (called on rank 0 by its requeue-signal handler): the same job again, resuming."""
        from submitit.helpers import DelayedSubmission

        from tipdistill import cluster

        return DelayedSubmission(self, cluster.requeue_overrides(sweep_overrides), *args, **kwargs)


if SlurmLauncher is not None:

    class TipSlurmLauncher(_RankedJob, SlurmLauncher):
        pass

    class TipLocalLauncher(_RankedJob, LocalLauncher):
        pass

    @dataclass
    class TipSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.tipdistill_launcher.launcher.TipSlurmLauncher"

    @dataclass
    class TipLocalConf(LocalQueueConf):
        _target_: str = "hydra_plugins.tipdistill_launcher.launcher.TipLocalLauncher"
        max_num_timeout: int = 3  # requeues after a timeout

    # Schemas for conf/hydra/launcher/{slurm,local}.yaml, which set the values.
    ConfigStore.instance().store(group="hydra/launcher", name="tipdistill_slurm_schema", node=TipSlurmConf, provider="tipdistill")
    ConfigStore.instance().store(group="hydra/launcher", name="tipdistill_local_schema", node=TipLocalConf, provider="tipdistill")
