"""kill -9, then resume, with logger=wandb (offline): the resumed job continues the same W&B run,
and the run's recorded history (both sessions' .wandb files, read back) holds every step once."""

import collections
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_PAIR, TINY_RUN
from test_cli import EXE
from test_reliability import metrics, start
from test_sinks import hermetic_wandb  # noqa: F401 - a fixture
from tipdistill.sinks import wandb_records

# Checkpoints every 4 steps. wandb-core writes its log in 32 KiB blocks (a few steps here) and a kill
# loses the unwritten block, so the job is killed once W&B's own log holds a step after the newest
# checkpoint: the resumed job trains that step again, and also the ones the kill took from W&B.
STEPS = 12
WANDB_RUN = [*TINY_PAIR, *TINY_RUN, "rollout=hf", f"steps={STEPS}", "eval_every=6", "checkpoint_every=4", "logger=wandb",
             "logger.mode=offline", "logger.table_every=1", "scoring.token_dump_every=1"]
BOOKKEEPING = {"_step", "_runtime", "_timestamp", "train/step"}


def sessions(run_dir: Path) -> list[dict]:
    """Each W&B session of a run directory, oldest first: its run id and history rows (flat keys)."""
    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, rows = None, []
        for record in wandb_records(path):  # stops at a record the kill cut short
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                # a table is one item per field (nested_key): keep its top-level name
                rows.append({item.key or item.nested_key[0]: json.loads(item.value_json) for item in record.history.item})
        out.append({"path": path, "run_id": run_id, "history": rows})
    return out


def _steps_in_wandb(run: Path) -> set[int]:
    return {row["train/step"] for s in sessions(run) for row in s["history"]} if (run / "wandb").is_dir() else set()


def _newest_checkpoint(run: Path) -> int:
    return max((int(p.name.removeprefix("step_")) for p in run.glob("checkpoints/step_*")), default=0)


def _wait_for_exit_record(run_dir: Path, timeout: float = 30.0) -> None:
    """run.finish() can return before wandb-core's writer reaches the file: the newest session's log
    ends in an `exit` record once it is complete."""
    path = max((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while not any(r.HasField("exit") for r in wandb_records(path)) and time.monotonic() < deadline:
        time.sleep(0.05)


def logged(rows: list[dict]) -> collections.Counter:
    """(train/step, metric) -> how often the history holds it."""
    return collections.Counter((row["train/step"], key) for row in rows for key in row if key not in BOOKKEEPING)


@pytest.mark.integration
def test_sigkill_then_resume_continues_the_same_wandb_run_without_duplicate_steps(tmp_path, tiny_pair):
    env = {**os.environ, "WANDB_SILENT": "true"}
    ref = subprocess.run([EXE, "train", *WANDB_RUN, "hydra.run.dir=ref"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = start([*WANDB_RUN, "hydra.run.dir=killed"], tmp_path)
    run = tmp_path / "killed"
    t0 = time.time()
    while not 0 < _newest_checkpoint(run) < max(_steps_in_wandb(run), default=0):
        assert proc.poll() is None, f"no moment to kill found: {proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < 300
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to finish the W&B run or to checkpoint
    proc.wait()
    from tipdistill import checkpoint

    resume_step = int(checkpoint.newest_intact(run)[0].name.removeprefix("step_"))
    assert max(_steps_in_wandb(run)) > resume_step, "the W&B run must hold a step the resumed job trains again"

    resumed = subprocess.run([EXE, "train", *WANDB_RUN, f"resume={run}", "hydra.run.dir=resume_job"], cwd=tmp_path,
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # one W&B run: both sessions carry the id kept in the run directory
    first, second = sessions(run)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert first["run_id"] == second["run_id"] == run_id
    (ref_session,) = sessions(tmp_path / "ref")
    assert ref_session["run_id"] != run_id  # a fresh run gets a fresh id

    # no step twice in the run's history, and every step the uninterrupted run logged, with its values
    history = first["history"] + second["history"]
    counts = logged(history)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert set(counts) == set(logged(ref_session["history"]))
    loss = {row["train/step"]: row["train/loss"] for row in history if "train/loss" in row}
    ref_loss = {row["train/step"]: row["train/loss"] for row in ref_session["history"] if "train/loss" in row}
    assert sorted(loss) == list(range(1, STEPS + 1))
    for step, value in ref_loss.items():
        assert loss[step] == pytest.approx(value, rel=1e-5, abs=1e-7), step
    assert [m["step"] for m in metrics(run)] == list(range(STEPS + 1))  # the local file: each step once as well


# ---------------------------------------------------------------- the pieces, without a training run


def test_run_id_is_new_for_a_fresh_run_and_kept_on_resume(tmp_path):
    from tipdistill.sinks import wandb_run_id

    first, continued = wandb_run_id(tmp_path, resume=False)
    assert not continued and (tmp_path / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path, resume=True) == (first, True)
    fresh, continued = wandb_run_id(tmp_path, resume=False)  # a new run in the same directory: a new W&B run
    assert fresh != first and not continued
    (tmp_path / "other").mkdir()
    assert wandb_run_id(tmp_path / "other", resume=True)[1] is False  # resumed, but W&B was not used before



def test_a_sweep_jobs_derived_id_survives_a_restart_before_its_first_checkpoint(tmp_path):
    """A requeued cluster job with no checkpoint starts afresh (resume=auto) but stays in its W&B run:
    the id derived from the sweep directory and job number is stored, and found again."""
    from tipdistill import cluster
    from tipdistill.sinks import wandb_run_id

    derived = cluster.sweep_run_id(tmp_path / "sweep", 3)
    assert wandb_run_id(tmp_path, resume=False, derived=derived) == (derived, False)
    assert wandb_run_id(tmp_path, resume=False, derived=derived) == (derived, True)  # the restart: the same run
    assert wandb_run_id(tmp_path, resume=True, derived=derived) == (derived, True)
    other = cluster.sweep_run_id(tmp_path / "sweep", 4)  # another job reusing the directory: its own run
    assert wandb_run_id(tmp_path, resume=False, derived=other) == (other, False)

def test_a_resumed_sink_skips_only_what_wandbs_own_log_holds(hermetic_wandb, tmp_path):
    """Two sessions of one run directory: the second continues the W&B run and sends only the calls
    the first session's transaction log lacks (here the log is cut as a kill leaves it)."""
    import pandas as pd

    from tipdistill.config import LoggerConfig
    from tipdistill.sinks import open_sink, wandb_logged, wandb_records

    cfg = LoggerConfig(name="wandb", mode="offline", project="tipdistill-test")
    with open_sink(cfg, tmp_path, run_name="r", group=None, config={}) as sink:
        for step in range(3):
            sink.log({"step": step, "train/loss": 1.0 / (step + 1)})
            sink.log_table("rollouts", pd.DataFrame({"step": [step]}))
    _wait_for_exit_record(tmp_path)
    (first,) = sessions(tmp_path)
    run_id = first["run_id"]
    assert wandb_logged(tmp_path, run_id) == {(s, w) for s in range(3) for w in ("metrics", "tables/rollouts")}
    data = first["path"].read_bytes()
    cut = data.find(b"0.3333333333333333")  # step 2's loss: its row and all after it are lost, as in a kill
    first["path"].write_bytes(data[:cut])
    assert len(list(wandb_records(first["path"]))) > 0  # the damaged tail ends the log, no exception
    held = wandb_logged(tmp_path, run_id)
    assert (0, "metrics") in held and (2, "metrics") not in held
    with open_sink(cfg, tmp_path, run_name="r", group=None, config={}, resume=True) as sink:
        for step in range(1, 4):  # resumed from a checkpoint at step 0
            sink.log({"step": step, "train/loss": 1.0 / (step + 1)})
            sink.log_table("rollouts", pd.DataFrame({"step": [step]}))
    _wait_for_exit_record(tmp_path)
    first, second = sessions(tmp_path)
    assert first["run_id"] == second["run_id"] == run_id
    counts = logged(first["history"] + second["history"])
    assert max(counts.values()) == 1 and {s for s, _ in counts} == {0, 1, 2, 3}
