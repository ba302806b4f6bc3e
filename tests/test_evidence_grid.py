"""scripts/evidence_grid.py: exactly the issue's grid, override merging, job states, bad arguments, and a
reduced grid on the tiny pair that runs two jobs side by side, skips finished jobs and resumes one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_PAIR, TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evidence_grid.py"


def load_script():
    spec = importlib.util.spec_from_file_location("evidence_grid", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["evidence_grid"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


grid = load_script()


def configs(jobs, task):
    """{(selector, keep): [seeds]} of one task."""
    out: dict = {}
    for j in jobs:
        if j.task == task:
            out.setdefault((j.selector, j.keep), []).append(j.seed)
    return out


def test_the_grid_is_the_issues_grid():
    jobs = grid.grid_jobs()
    seven = ["random", "entropy", "entropy_topk", "divergence", "q3", "type_aware", "type_aware_bottom"]
    arithmetic = {("full", 1.0): [0, 1, 2]}
    arithmetic.update({(s, k): [0, 1, 2] for k in (0.5, 0.2) for s in seven})
    arithmetic.update({(s, 0.1): [0, 1, 2] for s in ("random", "entropy", "q3", "type_aware")})
    assert configs(jobs, "arithmetic") == arithmetic
    planning = {(s, 0.2): [0, 1, 2] for s in ("random", "entropy", "type_aware_bottom")}
    planning.update({("full", 1.0): [0, 1, 2, 3, 4], ("q3", 0.2): [0, 1, 2, 3, 4], ("type_aware", 0.2): [0, 1, 2, 3, 4],
                     ("type_aware", 0.5): [0, 1, 2], ("type_aware", 0.1): [0, 1, 2]})
    assert configs(jobs, "planning") == planning
    assert len(jobs) == 57 + 30 and len({j.key for j in jobs}) == len(jobs)
    # arithmetic at 100 steps; planning at its default steps (no override)
    a = next(j for j in jobs if j.task == "arithmetic").train_overrides([])
    p = next(j for j in jobs if j.task == "planning").train_overrides([])
    assert "steps=100" in a and "task=arithmetic" in a and "task=planning" in p and not any(o.startswith("steps=") for o in p)
    # seed by seed: every seed-0 job comes before any seed-1 job
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs)


def test_selection_and_override_merging():
    jobs = grid.grid_jobs(["arithmetic"], ["full", "entropy@0.5"], [0, 1])
    assert [j.key for j in jobs] == ["arithmetic/full_s0", "arithmetic/entropy_k0.5_s0", "arithmetic/full_s1", "arithmetic/entropy_k0.5_s1"]
    ov = jobs[1].train_overrides(["steps=2", "rollout=hf", "+foo=1"])
    assert ov == ["task=arithmetic", "steps=2", "eval_every=25", "selector=entropy", "keep=0.5", "seed=0", "rollout=hf", "+foo=1"]
    with pytest.raises(grid.GridError, match="typo@0.3 not in the grid"):
        grid.grid_jobs(configs=["typo@0.3"])
    with pytest.raises(grid.GridError, match="unknown task 'chess'"):
        grid.grid_jobs(["chess"])


def test_job_states_on_disk(tmp_path):
    assert grid.job_state(tmp_path / "none") == "todo"
    (tmp_path / "stale").mkdir()
    assert grid.job_state(tmp_path / "stale") == "stale"
    (tmp_path / "ckpt" / "checkpoints" / "step_000050").mkdir(parents=True)
    assert grid.job_state(tmp_path / "ckpt") == "resume"
    (tmp_path / "ckpt" / "summary.json").write_text("{}")
    assert grid.job_state(tmp_path / "ckpt") == "done"


@pytest.mark.parametrize("args, message", [
    (["--configs", "q3@x"], "--configs: 'q3@x' is not"),
    (["--seeds", "0,a"], "--seeds must be a comma list"),
    (["--seeds", "9"], "the selection leaves no job"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["steps"], "overrides must be key=value"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, message):
    assert grid.main(["--out", str(tmp_path / "g"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evidence_grid: error:") and message in err[0]
    assert not (tmp_path / "g").exists()  # nothing started


def run_grid(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--tasks", "arithmetic", "--configs", "full,entropy@0.5",
           "--seeds", "0,1", *args, *TINY_PAIR, *TINY_RUN, "rollout=hf"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy())


@pytest.mark.integration
def test_reduced_grid_runs_side_by_side_skips_and_resumes(tmp_path, tiny_pair):
    # HF rollouts keep this short; the grid's own logic does not depend on the engine
    out = tmp_path / "g"
    first = run_grid(out, "--jobs", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    dirs = sorted(p.parent for p in out.rglob("summary.json"))
    assert [d.relative_to(out).as_posix() for d in dirs] == ["arithmetic/entropy_k0.5_s0", "arithmetic/entropy_k0.5_s1",
                                                             "arithmetic/full_s0", "arithmetic/full_s1"]
    for d in dirs:
        assert json.loads((d / "summary.json").read_text())["steps"] == 2  # the extra override replaced steps=100
    log = json.loads((out / "grid.json").read_text())
    s1 = log["sittings"][0]
    assert (s1["ran"], s1["skipped"], s1["failed"], s1["jobs_parallel"], s1["threads_per_job"]) == (4, 0, 0, 2, 1)
    assert s1["machine"]["cores"] and s1["wall_s"] > 0 and "--jobs 2" in s1["command"]
    assert all(j["rc"] == 0 and not j["resumed"] for j in s1["jobs"])
    assert (out / "logs" / "arithmetic__full_s0.log").is_file()

    # a rerun skips every finished job
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in dirs}
    again = run_grid(out, "--jobs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = json.loads((out / "grid.json").read_text())["sittings"][1]
    assert (s2["ran"], s2["skipped"], s2["jobs"]) == (0, 4, [])
    assert stamps == {d: (d / "summary.json").stat().st_mtime_ns for d in dirs}

    # an unfinished job with a checkpoint is resumed, the others still skipped
    (out / "arithmetic" / "full_s1" / "summary.json").unlink()
    dry = run_grid(out, "--dry-run")
    assert "resume  arithmetic/full_s1" in dry.stdout and "4 jobs: 3 done, 1 resume, 0 stale, 0 todo" in dry.stdout
    third = run_grid(out, "--jobs", "1")
    assert third.returncode == 0, third.stderr[-3000:]
    s3 = json.loads((out / "grid.json").read_text())["sittings"][2]
    assert (s3["ran"], s3["skipped"]) == (1, 3) and s3["jobs"][0]["job"] == "arithmetic/full_s1" and s3["jobs"][0]["resumed"]
    assert "resume=" in s3["jobs"][0]["command"] and (out / "arithmetic" / "full_s1" / "summary.json").is_file()
    assert stamps[out / "arithmetic" / "full_s0"] == (out / "arithmetic" / "full_s0" / "summary.json").stat().st_mtime_ns

    # the report reads the grid: verdict (a) has its two paired seeds, provenance comes from grid.json
    exe = str(Path(sys.executable).with_name("tipdistill"))
    rep = subprocess.run([exe, "report", str(out), "--results", str(tmp_path / "results.md")], capture_output=True, text=True,
                         timeout=600, env=os.environ.copy())
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    assert "| (a) | entropy sampling at 50% is at least as good as all tokens | entropy@0.5 − full | arithmetic | 2 |" in md
    assert md.count("scripts/evidence_grid.py --out") == 3 and "Machine: cpu" in md and "Grid wall time, all sittings:" in md
