"""Sweeps through tipdistill's submitit launchers (tipdistill/cluster.py, hydra_plugins/tipdistill_launcher).

No SLURM here: the SLURM launcher's configuration is checked by composition, and the jobs themselves run
through submitit's local executor (`hydra/launcher=local`), which starts each job's tasks as processes and
sends the same warning signal (USR2) and requeue protocol as on SLURM. Each job is a 2-rank gloo world."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PAIR
from tipdistill import cluster

EXE = str(Path(sys.executable).with_name("tipdistill"))
LOCAL_2_RANKS = ["hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "rollout=hf"]
SWEEP_RUN = ["eval_every=1", "prompts_per_step=4", "rollouts_per_prompt=2", "eval.samples=1", "resume=auto"]
RANK0_FILES = {".hydra", "train.log", "config_resolved.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tables"}
NOT_COMPARED = ("time/", "perf/", "mem/")  # wall-clock and memory figures differ between any two runs


# --------------------------------------------------------------------------- quick: the pieces


def test_requeue_resumes_from_the_jobs_own_directory():
    assert cluster.requeue_overrides(["seed=1", "keep=0.5"]) == ["seed=1", "keep=0.5", "resume=auto"]
    assert cluster.requeue_overrides(["seed=1", "resume=auto"]) == ["seed=1", "resume=auto"]
    assert cluster.requeue_overrides(["resume=true", "seed=1"]) == ["seed=1", "resume=auto"]
    assert cluster.requeue_overrides(["resume=/runs/a"]) == ["resume=/runs/a"]  # that directory is where it writes
    assert cluster.job_overrides(["seed=1"], 0) == ["seed=1"]
    assert cluster.job_overrides(["seed=1"], 1) == ["seed=1", *cluster.QUIET_RANK]


def test_wandb_id_is_one_per_job_and_stable(tmp_path):
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    ids = {cluster.sweep_run_id(a, 0), cluster.sweep_run_id(a, 1), cluster.sweep_run_id(b, 0)}
    assert len(ids) == 3
    assert cluster.sweep_run_id(a, 1) == cluster.sweep_run_id(str(a), "1")  # a requeued attempt gets the same id
    assert all(len(i) == 16 and i.isalnum() for i in ids)


def test_slurm_launcher_config(tmp_path):
    """Composition of hydra/launcher=slurm: one task per GPU, the job's time limit, requeues allowed, site
    settings from a conf/local/slurm.yaml (here a search-path directory standing in for the git-ignored one)."""
    from conftest import compose_many

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "slurm.yaml").write_text("partition: gpu_h200\naccount: proj42\nqos: high\n")
    plain, site = compose_many([["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8", "hydra.launcher.nodes=2"],
                                ["hydra/launcher=slurm", f"hydra.searchpath=[file://{tmp_path}]"]], hydra_config=True)
    launcher = plain.hydra.launcher
    assert launcher._target_ == "hydra_plugins.tipdistill_launcher.launcher.TipSlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.timeout_min > 60 and launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert launcher.cpus_per_task and launcher.mem_per_gpu and launcher.array_parallelism
    assert launcher.partition is None and launcher.account is None
    assert (site.hydra.launcher.partition, site.hydra.launcher.account, site.hydra.launcher.qos) == ("gpu_h200", "proj42", "high")
    local = compose_many([["hydra/launcher=local"]], hydra_config=True)[0].hydra.launcher
    assert local._target_.endswith("TipLocalLauncher") and local.max_num_timeout > 0


def test_sweeps_started_in_the_same_second_get_their_own_directories(monkeypatch):
    """hydra #1607: the sweep directory was named to the second."""
    from omegaconf import OmegaConf

    from conftest import compose_many

    dirs = []
    for t in (1_800_000_000.25, 1_800_000_000.75):  # one second, two launches
        monkeypatch.setenv("TIPDISTILL_LAUNCH_TIME", repr(t))
        cfg = compose_many([[]], hydra_config=True)[0]
        dirs.append(OmegaConf.select(cfg, "hydra.sweep.dir"))
    assert dirs[0] != dirs[1] and dirs[0][:-7] == dirs[1][:-7], dirs


# --------------------------------------------------------------------------- integration: real sweeps


def sweep(args, cwd, timeout=900):
    return subprocess.Popen([EXE, "train", "-m", *TINY_PAIR, *LOCAL_2_RANKS, *SWEEP_RUN, *args], cwd=cwd, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())


def metric_lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(NOT_COMPARED)}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def submitit_tasks(launcher_pid: int, job_id: str) -> list:
    """The task processes (ranks) of one submitit-local job, by its job id (the controller's pid)."""
    import psutil

    return [p for p in psutil.Process(launcher_pid).children(recursive=True)
            if "submitit.core._submit" in " ".join(p.cmdline()) and p.environ().get("SUBMITIT_LOCAL_JOB_ID") == job_id]


@pytest.mark.integration
def test_a_sweep_of_two_rank_jobs_and_a_requeued_job_resumes_to_the_same_metrics(tmp_path, tiny_pair):
    """A local sweep of two identical jobs, each a 2-rank world; job 0 gets SLURM's warning signal (USR2)
    after its first step: it checkpoints, submitit requeues it, and it resumes from its own run directory,
    in the same W&B run, to the metrics of job 1, which ran through. Job 1 is also what any sweep job should
    leave: rank 0's files only, one sharded checkpoint of the 2-rank run; `tipdistill report` reads the sweep."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(["steps=6", "seed=3,3", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        runs = job_dirs(sweep_dir) if sweep_dir.is_dir() else []
        metrics = runs[0] / "metrics.jsonl" if runs else None
        if metrics and metrics.is_file() and any(json.loads(line)["step"] >= 1 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.5)
    run0 = job_dirs(sweep_dir)[0]
    job0 = yaml.safe_load((run0 / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"]
    tasks = submitit_tasks(proc.pid, str(job0))
    assert len(tasks) == 2, "job 0 finished before it could be interrupted"
    for task in tasks:
        task.send_signal(signal.SIGUSR2)
    finish(proc)

    run0, run1 = job_dirs(sweep_dir)
    log0 = "".join((sweep_dir / ".submitit" / str(job0) / f"{job0}_0_log.{kind}").read_text() for kind in ("out", "err"))
    assert "Requeued job" in log0 and "Job completed successfully" in log0
    stopped = [int(line.rsplit("step ", 1)[1].split(";")[0]) for line in log0.splitlines() if "stopped by signal 12 after step" in line]
    assert len(stopped) == 1 and 1 <= stopped[0] < 6, log0[-3000:]  # it stopped mid-run, after a whole step
    assert metric_lines(run0) == metric_lines(run1)  # every step, once, the same numbers as the uninterrupted job
    s0, s1 = (json.loads((r / "summary.json").read_text()) for r in (run0, run1))
    s0.pop("wall_s"), s1.pop("wall_s")
    assert s0 == s1
    run_id = cluster.sweep_run_id(sweep_dir, 0)
    sessions = sorted((run0 / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)  # the requeued job continued its W&B run
    assert [s.name.rsplit("-", 1)[1] for s in (run1 / "wandb").glob("offline-run-*")] == [cluster.sweep_run_id(sweep_dir, 1)]

    assert {p.name for p in run1.iterdir()} == RANK0_FILES | {"wandb", "wandb_run_id"}, run1  # nothing per rank beside the sharded checkpoint
    assert "seed=3" in yaml.safe_load((run1 / ".hydra" / "overrides.yaml").read_text())
    assert [m["step"] for m in metric_lines(run1)] == list(range(7))
    assert (run1 / "train.log").read_text().count("resolved config") == 1  # rank 1 logs warnings to its console only
    step = run1 / "checkpoints" / "step_000006"
    assert json.loads((step / "sharded.json").read_text()) == {"world_size": 2}  # one job = one 2-rank run
    assert sorted(p.name for p in (step / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    report = subprocess.run([EXE, "report", str(sweep_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith("2 runs.") and "| full | 1 | 3,3 |" in report.stdout  # both jobs, one row
    assert (sweep_dir / "report.csv").is_file()


@pytest.mark.integration
def test_hydra_submitit_launchers_own_local_launcher_refuses_a_job_of_several_tasks(tmp_path, tiny_pair):
    """hydra/launcher=submitit_local would run the whole job once per task in one directory: one clear line."""
    sweep_dir = tmp_path / "sweep"
    out = subprocess.run([EXE, "train", "-m", *TINY_PAIR, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                          "rollout=hf", "steps=1", "prompts_per_step=4", f"hydra.sweep.dir={sweep_dir}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert out.returncode != 0
    assert "this submitit job has 2 tasks but they are not ranks of one run; fix: use tipdistill's launchers" in out.stdout + out.stderr
    assert job_dirs(sweep_dir) == []  # nothing half-written is left behind
