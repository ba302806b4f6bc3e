"""[6] Checkpoints that survive crashes: everything a resumed run needs to continue bit for bit.

A checkpoint is a directory `checkpoints/step_XXXXXX/` holding the student (`save_pretrained`),
the optimizer and scheduler state, the task sampler's RNG state, the step and the evaluation so
far. It is written under a temporary name and renamed into place, and `checkpoints/latest` is
replaced atomically afterwards, so a crash (or a full disk) while saving leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Saving failed; the previous checkpoint is untouched."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(run_dir: Path, step: int, student, tokenizer, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), **state}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        raise CheckpointError(f"saving the checkpoint of step {step} failed ({exc}); the previous checkpoint "
                              f"{previous if previous else '(none)'} is intact") from exc
    for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        path = run_dir / "checkpoints" / pointer.read_text().strip()
        if (path / "trainer_state.pt").exists():
            return path
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", weights_only=False)
