"""Resume verifies the sharded format too: a checkpoint a torchrun job wrote (every rank's shards under
dcp/, sharded.json) is intact when its shards are all present, listed in the manifest and readable, and
damaged, with the file named, when one is not. Written here by the real ShardedCheckpoints.save in a
one-rank gloo group (the 2-rank write and resume is tests/test_distributed.py's kill -9 test)."""

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _save_sharded(run_dir: Path, model_dir: str, steps) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill.distributed import DistributedRuntime
    from tipdistill.precision import Precision

    runtime = DistributedRuntime(torch.device("cpu"), Precision(torch.float32, torch.float32), rank=0, world_size=1, mesh=None)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()  # the optimizer state holds tensors: the shards carry both
    for step in steps:
        state = {"task_rng": None, "summary": {"step": step}, "last_eval": {}}
        runtime.checkpoints.save(run_dir, step, model, tok, opt, sched, state, keep_last=5)


def _shard(path: Path) -> Path:
    (shard,) = sorted((path / "dcp").glob("*.distcp"))
    return shard


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _unlist(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][f"dcp/{_shard(path).name}"]
    (path / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated shard": (_truncate, ".distcp has"),
    "garbage shard": (lambda f: f.write_bytes(b"\xff" * f.stat().st_size), ".distcp is unreadable"),
    "missing shard": (lambda f: f.unlink(), ".distcp is missing"),
}


def test_a_sharded_checkpoint_is_intact_and_its_manifest_lists_every_shard(tmp_path, tiny_model, one_rank_group):
    from tipdistill import checkpoint

    _save_sharded(tmp_path, tiny_model, [1, 2])
    path = tmp_path / "checkpoints" / "step_000002"
    listed = json.loads((path / "manifest.json").read_text())["files"]
    assert f"dcp/{_shard(path).name}" in listed and "dcp/.metadata" in listed and "sharded.json" in listed
    state = checkpoint.verify(path)
    assert state["step"] == 2 and state["world_size"] == 1 and len(state["torch_rng_ranks"]) == 1
    assert checkpoint.newest_intact(tmp_path)[0] == path


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_shard_falls_back_to_the_newest_intact_sharded_checkpoint(tmp_path, tiny_model, one_rank_group, caplog, kind):
    from tipdistill import checkpoint

    _save_sharded(tmp_path, tiny_model, [1, 2])
    damage, words = DAMAGE[kind]
    damage(_shard(tmp_path / "checkpoints" / "step_000002"))
    with caplog.at_level(logging.WARNING, logger="tipdistill.checkpoint"):
        path, state = checkpoint.newest_intact(tmp_path)
    assert path.name == "step_000001" and state["step"] == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "tipdistill.checkpoint"]
    assert "step_000002 is damaged" in warning and words in warning


def test_a_shard_missing_from_the_manifest_or_without_metadata_is_damaged(tmp_path, tiny_model, one_rank_group):
    """The manifest is written after every rank's shards: a shard it does not list was not part of the checkpoint."""
    from tipdistill import checkpoint

    _save_sharded(tmp_path, tiny_model, [1, 2])
    one, two = (tmp_path / "checkpoints" / f"step_00000{s}" for s in (1, 2))
    _unlist(two)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"\.distcp is not in manifest\.json"):
        checkpoint.verify(two)
    (one / "manifest.json").unlink()  # no sizes to compare: DCP's metadata still names the shards
    assert checkpoint.verify(one)["step"] == 1
    (one / "dcp" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"dcp/\.metadata is unreadable"):
        checkpoint.verify(one)
