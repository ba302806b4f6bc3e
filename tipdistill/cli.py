"""[0] `tipdistill <train|prepare|analyze|report> [hydra flags] key=value ...` (default: train).

Hydra has no subcommands, so the first argument is popped here before the Hydra app sees argv.
The config directory is passed as an absolute path: with a console script, a relative
`config_path` would be looked up as a Python package (hydra issue 2125). Bad input, whether Hydra
finds it while composing or tipdistill while validating, is one line on stderr and exit code 2.

Under torchrun (`torchrun --nproc_per_node N -m tipdistill train ...`) every rank runs this CLI and
composes the config itself; the ranks first join one process group and agree on the launch time, so
run directories named after it are one directory (hydra #2070), and only rank 0 writes Hydra's files.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from tipdistill import cluster, launch
from tipdistill.bad_input import describe
from tipdistill.config import (CONF_DIR, ConfigError, chosen_task, config_groups, register_configs, register_resolvers,
                               schema_for, to_plain, validate)
log = logging.getLogger("tipdistill")


def _safe(text: str) -> str:
    """Directory-safe text: hub ids like Qwen/Qwen3-4B must not create nested directories."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)[:200]


if not OmegaConf.has_resolver("safe"):
    OmegaConf.register_new_resolver("safe", _safe)
register_resolvers()  # also in a submitit task, which unpickles this module's train_task


def _fail(exc: Exception) -> None:
    print(f"tipdistill: error: {exc}", file=sys.stderr)
    sys.exit(2)


def _overrides() -> list[str]:
    """The task overrides as typed: iterating Hydra's list would resolve `keep=${oc.env:X}` in them."""
    return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # type: ignore[return-value]


def _validate(cfg: DictConfig):
    """Validate against the overrides as typed (they tell a `~group` removal apart)."""
    return validate(cfg, overrides=_overrides())


def _typed(cfg: DictConfig):
    """Validate before any heavy work; one clear line and exit code 2 on bad input."""
    try:
        return _validate(cfg)
    except ConfigError as exc:
        _discard_if_empty(Path(HydraConfig.get().runtime.output_dir))
        _fail(exc)


def _run_identity() -> tuple[str, str | None, str | None]:
    """(run name, W&B group, W&B run id): `type_aware-keep0.2-seed1` from the overrides; in a sweep the
    sweep dir as group and an id from the sweep dir and job number, so a requeued job continues its run."""
    from tipdistill.sinks import run_name_from_overrides

    hc = HydraConfig.get()
    name = run_name_from_overrides(_overrides())
    if str(hc.mode) != "RunMode.MULTIRUN":
        return name, None, None
    return name, Path(hc.sweep.dir).name, cluster.sweep_run_id(hc.sweep.dir, hc.job.num)


def _discard_if_empty(run_dir: Path) -> None:
    """Bad input must not leave a half-written run directory behind (only Hydra's own files)."""
    import shutil

    if launch.rank() == 0 and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", "config_resolved.yaml"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def train_task(cfg: DictConfig) -> float:
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    resume = cfg.get("resume")
    run_dir = hydra_dir if resume in (None, "true", "True", "auto") else Path(str(resume)).expanduser().resolve()
    with open_dict(cfg):  # also after `~output_dir`, which validation then reports
        cfg.output_dir = str(run_dir)
    try:
        typed = _validate(cfg)
        if resume not in (None, "auto") and not (run_dir / "checkpoints").is_dir():
            raise ConfigError(f"resume={resume}: {run_dir} has no checkpoints/; fix: pass the directory of an earlier run")
        _check_submitit_ranks()
    except ConfigError as exc:
        _discard_if_empty(hydra_dir)
        _fail(exc)
    from tipdistill import checkpoint, distributed  # seconds of imports: after validation
    from tipdistill.train import TrainingStopped, train, write_resolved_config

    if checkpoint.starts_afresh(resume, run_dir) and launch.rank() == 0:
        write_resolved_config(to_plain(cfg), run_dir)
    name, group, run_id = _run_identity()
    try:
        summary = train(typed, run_dir, run_name=name, group=group, wandb_id=run_id, runtime=distributed.make_runtime(typed))
    except ConfigError as exc:
        _discard_if_empty(hydra_dir)
        _fail(exc)
    except TrainingStopped as exc:
        print(f"tipdistill: {exc}", file=sys.stderr)
        cluster.hand_on(exc.signum)  # in a submitit job: its requeue protocol (rank 0 requeues and exits)
        sys.exit(exc.exit_code)
    distributed.finish()  # a no-op in one process
    log.info("summary: %s", summary)
    log.info("run directory: %s", run_dir)
    return float(summary["eval/accuracy_end"])  # the objective a sweeper optimises


def _check_submitit_ranks() -> None:
    """A submitit job of several tasks must make each task a rank (tipdistill's launchers do); with
    hydra-submitit-launcher's own, every task would run the whole job in the same directory."""
    tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", os.environ.get("SLURM_NTASKS", "1")))
    if cluster.in_submitit_job() and tasks > 1 and not launch.launched():
        raise ConfigError(f"this submitit job has {tasks} tasks but they are not ranks of one run; fix: use tipdistill's launchers, "
                          "hydra/launcher=slurm or hydra/launcher=local (not submitit_slurm / submitit_local)")


def _one_process(cmd: str) -> None:
    if launch.launched():
        _fail(ConfigError(f"`tipdistill {cmd}` runs in one process; fix: run it without torchrun (a torchrun `train` job "
                          "prepares a missing embedded pair on rank 0 itself)"))


def prepare_task(cfg: DictConfig) -> None:
    from tipdistill import embedded

    _one_process("prepare")
    typed = _typed(cfg)
    if typed.model.embedded is None:
        _fail(ConfigError(f"model={typed.model.name} is not an embedded pair; fix: `tipdistill prepare` builds model=embedded pairs only"))
    out = embedded.prepare(typed.model.embedded, typed.task, typed.rollout.max_completion_length)
    print((out / "prepare.json").read_text())
    print(f"prepared pair: {out}")


def analyze_task(cfg: DictConfig) -> None:
    from tipdistill.analyze import analyze

    _one_process("analyze")
    typed = _typed(cfg)
    try:
        analyze(typed, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        _fail(exc)


def _hydra_app(task):
    return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")(task)


_in_task = False  # True while a task function runs: its errors are not composition errors


def _tracked(task):
    def run(cfg: DictConfig):
        global _in_task
        _in_task = True
        try:
            return task(cfg)
        finally:
            _in_task = False

    return run


def _run_app(task) -> None:
    """Hydra prints composition errors over several lines and exits 1; here they are one line, exit 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing, so the error reaches this function;
    a user who set it gets Hydra's full traceback as before."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        _hydra_app(task)()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_app(_tracked(task))()
    except Exception as exc:
        overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
        line = None if _in_task else describe(exc, schema_for(chosen_task(overrides)), overrides, config_groups())
        if line is None:
            raise
        _fail(ConfigError(line))
    finally:  # called in-process (tests, a torchrun worker): leave the environment as it was
        os.environ.pop("HYDRA_FULL_ERROR", None)


COMMANDS = {"train": train_task, "prepare": prepare_task, "analyze": analyze_task}


def main() -> None:
    argv = sys.argv
    cmd = argv.pop(1) if len(argv) > 1 and argv[1] in (*COMMANDS, "report") else "train"
    if cmd == "report":
        from tipdistill.report_cmd import main_report

        sys.exit(main_report(argv[1:]))
    register_configs()
    os.environ["TIPDISTILL_COMMAND"] = cmd  # conf/hydra/default.yaml names the job after it
    if launch.launched():
        _join_job(argv)
    _run_app(COMMANDS[cmd])


def _join_job(argv: list[str]) -> None:
    """A rank of a torchrun job: join the process group, take rank 0's clock for `${launch:...}` (the run
    directory), and leave Hydra's files and log file to rank 0 (the others log warnings to the console)."""
    from tipdistill import distributed

    distributed.start()
    os.environ["TIPDISTILL_LAUNCH_TIME"] = repr(distributed.launch_time())
    if launch.rank() != 0:
        argv += launch.QUIET_RANK


if __name__ == "__main__":
    main()
