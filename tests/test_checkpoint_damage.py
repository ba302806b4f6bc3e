"""Resume verifies checkpoints: a damaged newest one falls back to the newest intact one; none intact
is one clear line, exit code 2, and the run directory stays byte for byte as it was."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_PAIR, TINY_RUN
from test_cli import EXE

FAST = [*TINY_PAIR, *TINY_RUN, "rollout=hf", "checkpoint_every=1", "keep_checkpoints=3", "steps=3", "eval_every=0"]


def _save_steps(run_dir: Path, student_dir: str, steps) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill import checkpoint

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in steps:
        state = {"task_rng": None, "summary": {"step": step}, "last_eval": {}}
        checkpoint.save(run_dir, step, model, tok, opt, sched, state, keep_last=5)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# Each way a copy can go wrong, and the words the warning uses for it.
DAMAGE = {
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors has"),
    "garbage weights header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * (d / "model.safetensors").stat().st_size),
                               "model.safetensors is unreadable"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "truncated trainer state": (lambda d: _truncate(d / "trainer_state.pt"), "trainer_state.pt has"),
    "missing tokenizer file": (lambda d: (d / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    "unreadable manifest": (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, tiny_pair, caplog, kind):
    from tipdistill import checkpoint

    _save_steps(tmp_path, tiny_pair[0], [1, 2, 3])
    damage, words = DAMAGE[kind]
    damage(tmp_path / "checkpoints" / "step_000003")
    with caplog.at_level(logging.WARNING, logger="tipdistill.checkpoint"):
        path, state = checkpoint.newest_intact(tmp_path)
    assert path.name == "step_000002" and state["step"] == 2 and state["summary"] == {"step": 2}
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "tipdistill.checkpoint"]
    assert "step_000003 is damaged" in warning and words in warning and "\n" not in warning


def test_checkpoint_without_manifest_is_checked_for_the_files_resume_needs(tmp_path, tiny_pair):
    """Checkpoints written before the manifest existed still resume, and still get their weights checked."""
    from tipdistill import checkpoint

    _save_steps(tmp_path, tiny_pair[0], [1, 2])
    for step in (1, 2):
        (tmp_path / "checkpoints" / f"step_00000{step}" / "manifest.json").unlink()
    assert checkpoint.verify(tmp_path / "checkpoints" / "step_000002")["step"] == 2
    _truncate(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")
    assert checkpoint.newest_intact(tmp_path)[0].name == "step_000001"


def test_no_intact_checkpoint_is_one_line_naming_each_damaged_file_and_changes_nothing(tmp_path, tiny_pair):
    from tipdistill import checkpoint
    from tipdistill.config import ConfigError

    _save_steps(tmp_path, tiny_pair[0], [1, 2])
    _truncate(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")
    (tmp_path / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"not a zip")
    (tmp_path / "checkpoints" / "step_000001" / "manifest.json").unlink()  # an old checkpoint: no sizes to compare
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        checkpoint.newest_intact(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "no intact checkpoint" in message and "fix:" in message
    assert "step_000002/model.safetensors has" in message and "step_000001/trainer_state.pt is unreadable" in message
    assert _snapshot(tmp_path) == before


def test_rotation_after_a_fallback_never_deletes_the_checkpoint_just_written(tmp_path, tiny_pair):
    """Resumed from step 1 past a damaged step 2: saving step 1 again with keep_last=1 must keep it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill import checkpoint

    _save_steps(tmp_path, tiny_pair[0], [1, 2])
    _truncate(tmp_path / "checkpoints" / "step_000002" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0])
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"task_rng": None, "summary": {}, "last_eval": {}}
    checkpoint.save(tmp_path, 1, model, AutoTokenizer.from_pretrained(tiny_pair[0]), opt, sched, state, keep_last=1)
    assert checkpoint.newest_intact(tmp_path)[0].name == "step_000001"


# ---------------------------------------------------------------- through the CLI, as a user meets it


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("finished")
    out = subprocess.run([EXE, "train", *FAST, "hydra.run.dir=run"], cwd=root, capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run"


def _resume(run: Path, cwd: Path):
    return subprocess.run([EXE, "train", *FAST, f"resume={run}", "hydra.run.dir=resume_job"], cwd=cwd, capture_output=True, text=True,
                          env=os.environ.copy())


@pytest.mark.integration
def test_cli_resume_past_a_truncated_checkpoint_warns_and_continues(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _truncate(run / "checkpoints" / "step_000003" / "model.safetensors")  # a copy cut short, as after a full disk
    out = _resume(run, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    logged = out.stdout + out.stderr  # Hydra's console log handler writes to stdout
    warnings = [line for line in logged.splitlines() if "step_000003 is damaged" in line]
    assert len(warnings) == 1 and "model.safetensors has" in warnings[0]
    assert "resuming from" in logged and "(step 2)" in logged
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # step 3 trained again, once
    from tipdistill import checkpoint

    assert checkpoint.newest_intact(run)[0].name == "step_000003"  # the damaged one was replaced


@pytest.mark.integration
def test_cli_resume_with_no_intact_checkpoint_is_one_line_exit_2_and_nothing_changes(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _truncate(run / "checkpoints" / "step_000003" / "model.safetensors")
    (run / "checkpoints" / "step_000002" / "config.json").unlink()
    (run / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"\0" * 64)
    before = _snapshot(run)
    out = _resume(run, tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tipdistill: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    for named in ("step_000003/model.safetensors", "step_000002/config.json", "step_000001/trainer_state.pt", "fix:"):
        assert named in errors[0], named
    assert _snapshot(run) == before  # metrics.jsonl, summary.json, every checkpoint: byte for byte
    assert not (tmp_path / "resume_job").exists()  # the failed job left no directory of its own
