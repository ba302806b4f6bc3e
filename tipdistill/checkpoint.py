"""[6] Checkpoints that survive crashes: everything a resumed run needs to continue bit for bit.

A checkpoint is a directory `checkpoints/step_XXXXXX/` holding the student (`save_pretrained`),
the optimizer and scheduler state, the task sampler's RNG state, the step and the evaluation so
far. It is written under a temporary name and renamed into place, and `checkpoints/latest` is
replaced atomically afterwards, so a crash (or a full disk) while saving leaves the previous
checkpoint usable. `manifest.json` records every file's size, so a checkpoint damaged later (a
truncated copy, a lost node) is recognised on resume and the newest intact one is used instead.

A job of several processes writes the same layout with sharded weights and optimizer state
(`ShardedCheckpoints`: every rank's shards under `dcp/`, and `sharded.json`); rank 0 writes the
manifest once every rank has written, so `verify` checks those shards as it checks safetensors.
`runtime.checkpoints` is the format of the runtime a run uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch

from tipdistill.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
STATE_KEYS = ("step", "optimizer", "scheduler", "torch_rng", "task_rng", "summary", "last_eval")
SHARDED = "sharded.json"  # present in (and only in) a checkpoint written by a job of several processes
SHARDS = "dcp"  # the sharded format's student and optimizer: torch.distributed.checkpoint's files, every rank's
# the sharded format's trainer state: the optimizer is in the shards, every rank's torch RNG is here
SHARDED_STATE_KEYS = ("step", "scheduler", "torch_rng", "torch_rng_ranks", "world_size", "task_rng", "summary", "last_eval")


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
                    "torch_rng": torch.get_rng_state(), **state}, tmp / STATE)
        _publish(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir)
        raise CheckpointError(f"saving the checkpoint of step {step} failed ({exc}); the previous checkpoint "
                              f"{previous if previous else '(none)'} is intact") from exc
    _rotate(root, step, keep_last)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Record every file's size in the manifest (the files of every rank, for a sharded checkpoint: the
    caller publishes after all of them are written), rename the checkpoint into place, point `latest` at it."""
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(final.parent / "latest", final.name)


def _rotate(root: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` step checkpoints up to `step`. Only steps up to this one count: after a
    resume from an older checkpoint, newer (damaged) ones must not, or the one just written could be deleted."""
    done = sorted(p for p in root.glob("step_*") if _step_of(p) is not None and _step_of(p) <= step)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    name = path.name.removeprefix("step_")
    return int(name) if name.isdigit() else None


def starts_afresh(resume: Optional[str], run_dir: Path) -> bool:
    """The one rule for whether a run begins at step 0: no `resume`, or `resume=auto` (a requeued cluster
    job) in a run directory without a checkpoint yet."""
    return not resume or (resume == "auto" and latest(run_dir) is None)


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.exists():
        path = run_dir / "checkpoints" / pointer.read_text().strip()
        if (path / "trainer_state.pt").exists():
            return path
    done = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_state(path: Path) -> dict:
    return torch.load(path / STATE, weights_only=False)


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong."""


def _weight_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise DamagedCheckpoint(f"{index.name} is unreadable ({exc})") from None
    return ["model.safetensors"]


def verify(path: Path) -> dict:
    """The trainer state of an intact checkpoint; raises DamagedCheckpoint otherwise.

    Checks, cheapest first: every file in the manifest present at its recorded size (checkpoints
    written before the manifest existed are checked for the files resuming needs), every weight
    tensor readable (safetensors; a sharded checkpoint's every shard, `_verify_shards`), and the
    trainer state loadable with every key of its format.
    """
    sharded = (path / SHARDED).is_file()
    manifest = path / MANIFEST
    listed = None
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            raise DamagedCheckpoint(f"{MANIFEST} is unreadable ({exc})") from None
        listed = set(sizes)
    elif sharded:
        sizes = {name: None for name in ("config.json", STATE, SHARDED, f"{SHARDS}/.metadata")}
    else:
        sizes = {name: None for name in ("config.json", STATE, *_weight_files(path))}
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if size is not None and f.stat().st_size != size:
            raise DamagedCheckpoint(f"{name} has {f.stat().st_size} bytes, {size} were written (truncated or overwritten)")
    if sharded:
        _verify_shards(path, listed)
    else:
        _verify_weights(path)
    try:
        state = load_state(path)
    except Exception as exc:  # a damaged zip/pickle can raise almost anything
        raise DamagedCheckpoint(f"{STATE} is unreadable ({_first_line(exc)})") from None
    missing = [k for k in (SHARDED_STATE_KEYS if sharded else STATE_KEYS) if k not in state]
    if missing:
        raise DamagedCheckpoint(f"{STATE} lacks {', '.join(missing)}")
    if state["step"] != _step_of(path):
        raise DamagedCheckpoint(f"{STATE} is for step {state['step']}, not {_step_of(path)}")
    return state


def _verify_weights(path: Path) -> None:
    """Every tensor of the one-process format's weight files readable through safetensors."""
    from safetensors import safe_open

    for name in _weight_files(path):
        try:
            with safe_open(str(path / name), framework="pt") as weights:
                for key in weights.keys():
                    weights.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error type (bad header, short buffer)
            raise DamagedCheckpoint(f"{name} is unreadable ({_first_line(exc)})") from None


def _verify_shards(path: Path, listed: Optional[set]) -> None:
    """The sharded format's shards: DCP's metadata readable; every shard file it names (every rank's)
    present, in the manifest when there is one (rank 0 writes it once all ranks have written), long
    enough for every item it holds; and every tensor item deserialisable, one at a time (no process
    group needed, so every rank checks alone and memory holds one item)."""
    import io

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path / SHARDS)).read_metadata()
        items = metadata.storage_data.items()
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise DamagedCheckpoint(f"{SHARDS}/.metadata is unreadable ({_first_line(exc)})") from None
    by_file: dict[str, list] = {}
    for index, info in items:
        by_file.setdefault(info.relative_path, []).append((index, info))
    for rel, file_items in sorted(by_file.items()):
        name = f"{SHARDS}/{rel}"
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if listed is not None and name not in listed:
            raise DamagedCheckpoint(f"{name} is not in {MANIFEST} (written after the checkpoint was published, or copied in)")
        size = f.stat().st_size
        try:
            with open(f, "rb") as stream:
                for index, info in file_items:
                    if info.offset + info.length > size:
                        raise DamagedCheckpoint(f"{name} has {size} bytes, its items need {info.offset + info.length} (truncated)")
                    stream.seek(info.offset)
                    data = stream.read(info.length)
                    tensor = isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
                    if tensor and not getattr(info, "transform_descriptors", None):  # torch.save'd, as DCP reads it
                        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except DamagedCheckpoint:
            raise
        except Exception as exc:  # a damaged zip/pickle can raise almost anything
            raise DamagedCheckpoint(f"{name} is unreadable ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def newest_intact(run_dir: Path) -> tuple[Path, dict]:
    """(path, trainer state) of the newest checkpoint that passes `verify`, warning once per damaged
    newer one. None intact: ConfigError naming every damaged file and the fix; nothing is written."""
    root = run_dir / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True)
    damaged = []
    for path in candidates:
        try:
            state = verify(path)
        except DamagedCheckpoint as exc:
            damaged.append(f"{path.name}/{exc}")
            log.warning("checkpoint %s is damaged (%s); trying an older one", path, exc)
            continue
        return path, state
    if not damaged:
        raise ConfigError(f"resume: no checkpoint under {root}; fix: point resume=<run dir> at a run that saved one")
    raise ConfigError(f"resume: no intact checkpoint under {root}: {'; '.join(damaged)}; fix: restore those files from a copy, "
                      f"or start a new run without resume= (the run directory was left as it was)")


# --- one format per runtime: the loop asks `runtime.checkpoints` ------------------------------------------

class Checkpoints(Protocol):
    def check(self, path: Path) -> None:
        """Raise ConfigError (one line) unless this runtime can resume from `path`; reads no weights."""

    def weights_of(self, path: Path) -> Optional[Path]:
        """The HF-format directory the student loads from on resume (None: `restore` fills the weights)."""

    def save(self, run_dir: Path, step: int, student, tokenizer, optimizer, scheduler, state: dict, keep_last: int) -> Path: ...

    def restore(self, path: Path, state: dict, student, optimizer) -> dict:
        """Load the optimizer state (and the student's, when `weights_of` is None) of a checkpoint whose
        trainer state `verify` returned; returns the trainer state this process continues from."""

    def export(self, student, tokenizer, out: Path) -> None:
        """The final student as an HF-format directory (`save_pretrained`)."""


def _written_by(path: Path) -> int:
    """Processes that wrote a checkpoint: 1 for the one-process format."""
    marker = path / SHARDED
    return int(json.loads(marker.read_text())["world_size"]) if marker.is_file() else 1


class PretrainedCheckpoints:
    """One process: the student as `save_pretrained`, the optimizer inside trainer_state.pt (`save` above)."""

    def check(self, path: Path) -> None:
        if (path / SHARDED).is_file():
            n = _written_by(path)
            raise ConfigError(f"resume: {path} was written by a job of {n} ranks; fix: resume it the same way, "
                              f"torchrun --nproc_per_node {n} -m tipdistill train ... resume=<run dir>")

    def weights_of(self, path: Path) -> Optional[Path]:
        return path

    def save(self, run_dir, step, student, tokenizer, optimizer, scheduler, state, keep_last):
        return save(run_dir, step, student, tokenizer, optimizer, scheduler, state, keep_last)

    def restore(self, path: Path, state: dict, student, optimizer) -> dict:
        optimizer.load_state_dict(state["optimizer"])
        return state

    def export(self, student, tokenizer, out: Path) -> None:
        student.save_pretrained(out)
        tokenizer.save_pretrained(out)


class ShardedCheckpoints:
    """A job of N ranks: student and optimizer shards through torch.distributed.checkpoint (every rank
    writes its own shards into `dcp/`), and rank 0 writes the shared files: trainer_state.pt (step,
    scheduler, sampler RNG, every rank's torch RNG, summary), sharded.json (the world size), the
    student's config and tokenizer. Same directory layout, atomic rename and rotation as one process;
    resumable only with the same number of ranks."""

    def __init__(self, runtime):
        self.runtime = runtime

    def check(self, path: Path) -> None:
        n, world = _written_by(path), self.runtime.world_size
        if not (path / SHARDED).is_file():
            raise ConfigError(f"resume: {path} was written by one process without torchrun; fix: resume it without torchrun "
                              "(tipdistill train ... resume=<run dir>)")
        if n != world:
            raise ConfigError(f"resume: {path} was written by {n} ranks, this job has {world}; fix: resume with "
                              f"torchrun --nproc_per_node {n} (sharded optimizer state is tied to the world size)")

    def weights_of(self, path: Path) -> Optional[Path]:
        return None

    def _agree(self, error: Optional[BaseException], step: int, run_dir: Path) -> None:
        """Every rank raises if any rank failed, so no rank waits in a collective the others left."""
        if self.runtime.sum(int(error is not None)):
            previous = latest(run_dir)
            raise CheckpointError(f"saving the checkpoint of step {step} failed ({error or 'on another rank'}); the previous "
                                  f"checkpoint {previous if previous else '(none)'} is intact") from error

    def save(self, run_dir, step, student, tokenizer, optimizer, scheduler, state, keep_last):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        rt = self.runtime
        root = run_dir / "checkpoints"
        final = root / f"step_{step:06d}"
        tmp = root / f".tmp_step_{step:06d}"
        error = None
        if rt.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = exc
        self._agree(error, step, run_dir)
        model_sd, optim_sd = get_state_dict(student, optimizer)
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDS))
        except Exception as exc:  # DCP raises on every rank when any rank's write failed
            error = exc
        self._agree(error, step, run_dir)
        rngs = [None] * rt.world_size
        torch.distributed.all_gather_object(rngs, torch.get_rng_state())
        if rt.is_main:
            try:
                student.config.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                torch.save({"step": step, "scheduler": scheduler.state_dict(), "torch_rng": rngs[0], "torch_rng_ranks": rngs,
                            "world_size": rt.world_size, **state}, tmp / STATE)
                (tmp / SHARDED).write_text(json.dumps({"world_size": rt.world_size}))
                _publish(tmp, final)  # every rank's shards are written (dcp.save returned on every rank): the manifest lists them
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = exc
        self._agree(error, step, run_dir)
        if rt.is_main:
            _rotate(root, step, keep_last)
        torch.distributed.barrier()
        return final

    def restore(self, path: Path, state: dict, student, optimizer) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(student, optimizer)
        both = {"model": model_sd, "optim": optim_sd}
        dcp.load(both, checkpoint_id=str(path / SHARDS))
        set_state_dict(student, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
        state = dict(state)
        state["torch_rng"] = state["torch_rng_ranks"][self.runtime.rank]
        return state

    def export(self, student, tokenizer, out: Path) -> None:
        """Rank 0 gathers the full weights into CPU memory (one copy) and writes them with save_pretrained."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.runtime.is_main:
            student.save_pretrained(out, state_dict=full)
            tokenizer.save_pretrained(out)
        torch.distributed.barrier()
