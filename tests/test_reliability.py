"""Crash, kill, signal and fault handling: a run never loses finished work."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_PAIR, TINY_RUN, compose
from test_cli import EXE, run_dirs

FAST = [*TINY_PAIR, *TINY_RUN, "rollout=hf", "checkpoint_every=1", "steps=6", "eval_every=3"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def start(args, cwd):
    return subprocess.Popen([EXE, "train", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def wait_for(path: Path, proc, timeout=300.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.integration
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_pair):
    ref = subprocess.run([EXE, "train", *FAST, "hydra.run.dir=ref"], cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy())
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = start([*FAST, "hydra.run.dir=killed"], tmp_path)
    run = tmp_path / "killed"
    wait_for(run / "checkpoints" / "step_000002", proc)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert max(m["step"] for m in metrics(run)) < 6, "the run finished before it was killed"

    resumed = subprocess.run([EXE, "train", *FAST, f"resume={run}", "hydra.run.dir=resume_job"], cwd=tmp_path,
                             capture_output=True, text=True, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "ref"), metrics(run)
    assert [m["step"] for m in b] == list(range(7))  # every step exactly once
    for x, y in zip(a, b):
        for key in ("train/loss", "train/kept_tokens", "eval/accuracy", "eval/accuracy_greedy"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sb["eval/accuracy_end"] == sa["eval/accuracy_end"] and sb["eval/accuracy_start"] == sa["eval/accuracy_start"]


@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_pair):
    proc = start([*FAST, "steps=50", "checkpoint_every=0", "hydra.run.dir=run"], tmp_path)
    wait_for(tmp_path / "run" / "tables", proc)  # step 1 is done once its token dump exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "resume=" in err and "stopped by signal" in err
    from tipdistill.checkpoint import latest

    assert latest(tmp_path / "run") is not None


def _typed(tmp_path, extra=()):
    from tipdistill.config import validate

    cfg = validate(compose([*FAST, *extra]))
    cfg.output_dir = str(tmp_path)
    return cfg


@pytest.mark.integration  # whole train() runs
def test_non_finite_loss_is_skipped_and_counted(tmp_path, tiny_pair, monkeypatch):
    import tipdistill.train as tr
    import tipdistill.update as up

    real, calls = up.kept_token_loss, {"n": 0}

    def nan_on_second_step(*args, **kwargs):
        calls["n"] += 1
        loss_sum, n = real(*args, **kwargs)
        return (loss_sum * float("nan"), n) if calls["n"] == 2 else (loss_sum, n)

    monkeypatch.setattr(up, "kept_token_loss", nan_on_second_step)
    tr.train(_typed(tmp_path, ["steps=3"]), tmp_path)
    m = metrics(tmp_path)
    assert [x["train/skipped_steps"] for x in m[1:]] == [0, 1, 1]
    assert m[2]["train/loss"] != m[2]["train/loss"]  # the NaN step is logged as such, not hidden


@pytest.mark.integration
def test_repeated_non_finite_steps_stop_with_a_checkpoint(tmp_path, tiny_pair, monkeypatch):
    import tipdistill.train as tr
    import tipdistill.update as up

    real = up.kept_token_loss
    monkeypatch.setattr(up, "kept_token_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), 1))
    with pytest.raises(tr.TrainingStopped, match="2 steps in a row had a non-finite"):
        tr.train(_typed(tmp_path, ["steps=5", "max_consecutive_skips=2", "checkpoint_every=0"]), tmp_path)
    from tipdistill.checkpoint import latest

    assert latest(tmp_path).name == "step_000002"


def test_all_empty_responses_do_not_crash_or_divide_by_zero():
    from tipdistill.config import SelectorConfig
    from tipdistill.fused_head import kept_token_loss
    from tipdistill.rollout import TokenRules, make_rollout
    from tipdistill.scoring import token_stats
    from tipdistill.selectors import SELECTORS

    r = make_rollout([[5, 6]], [[], []], 2, TokenRules(stop_ids=(1,), pad_id=0, n_token_ids=11, context=16))
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, r.response_mask_B_T.shape[1], 8, requires_grad=True)
    stats = token_stats(hidden.detach(), torch.randn_like(hidden).detach(), r.response_mask_B_T, head, head, 4)
    for name in SELECTORS:
        keep = SELECTORS.get(name).select(stats, 0.5, SelectorConfig(name=name), torch.Generator().manual_seed(0))
        assert int(keep.sum()) == 0
    loss_sum, n = kept_token_loss(hidden, hidden.detach(), keep, head, head, "reverse_kl", 0.5, 4)
    (loss_sum / max(1, n)).backward()
    assert n == 0 and float(loss_sum.detach()) == 0.0 and torch.isfinite(hidden.grad).all()


def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill import checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.save(tmp_path, 1, model, tok, opt, sched, {"x": 1}, keep_last=2)

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match="step_000001 is intact"):
        checkpoint.save(tmp_path, 2, model, tok, opt, sched, {"x": 2}, keep_last=2)
    assert checkpoint.latest(tmp_path).name == "step_000001"
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["x"] == 1
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_checkpoint_rotation_keeps_the_last_n(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill import checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in range(1, 5):
        checkpoint.save(tmp_path, step, model, tok, opt, sched, {}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000003", "step_000004"]


@pytest.mark.parametrize("override, message", [
    ("keep=0", "keep must be in (0, 1]"),
    ("keep=-0.5", "keep must be in (0, 1]"),
    ("selector.name=topk", "unknown selector 'topk'; valid: divergence, entropy"),
    ("loss.name=kl", "unknown loss 'kl'; valid: forward_kl, jsd, reverse_kl"),
    ("rollout.engine=sglang", "unknown rollout engine 'sglang'; valid: hf, vllm"),
    ("steps=-1", "steps must be > 0"),
    ("prompts_per_step=0", "prompts_per_step must be > 0"),
    ("rollouts_per_prompt=0", "rollouts_per_prompt must be > 0"),
    ("micro_batch_size=0", "micro_batch_size must be > 0"),
    ("loss.chunk_size=0", "loss.chunk_size must be > 0"),
    ("scoring.chunk_size=0", "scoring.chunk_size must be > 0"),
    ("eval.samples=0", "eval.samples must be > 0"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("model.embedded.student.heads=5", "must be divisible by heads"),
    # non-finite numbers pass checks written as `x > 0` (found by the override fuzzer)
    ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay must be a finite number, got inf"),
    ("rollout.kv_cache_gib=inf", "rollout.kv_cache_gib must be a finite number, got inf"),
    # ranges nothing checked (found by the override fuzzer)
    ("optim.grad_clip=-0.5", "optim.grad_clip must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1]"),
    ("rollout.max_num_seqs=-1", "rollout.max_num_seqs must be > 0"),
    ("rollout.kv_cache_gib=-0.5", "rollout.kv_cache_gib must be > 0"),
    ("selector.rkl_clip_quantile=2", "selector.rkl_clip_quantile must be in (0, 1] or null"),
    ("scoring.entropy_threshold=-1", "scoring.entropy_threshold must be in [0, 1]"),
    ("scoring.rkl_threshold=-1", "scoring.rkl_threshold must be >= 0"),
    ("scoring.token_dump_every=-1", "scoring.token_dump_every must be >= 0"),
    ("scoring.token_dump_sequences=0", "scoring.token_dump_sequences must be > 0"),
    ("logger.table_every=-1", "logger.table_every must be >= 0"),
    ("model.embedded.teacher.lr=0", "model.embedded.*.lr must be > 0"),
    ("model.embedded.student.warmup=-1", "model.embedded.*.warmup must be >= 0"),
    ("model.embedded.student.stop_accuracy=2", "model.embedded.*.stop_accuracy must be in (0, 1] or null"),
    ("model.embedded.vocab_pad_to=-5", "model.embedded.vocab_pad_to must be >= 0"),
    ("seed=-1", "seed must be in [0, 2**32)"),  # vLLM's engine start: np.random.seed(-1) fails after the models load
    ("seed=4294967296", "seed must be in [0, 2**32)"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),  # AdamW raised at its construction, after loading
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1)"),
    ("task.digits=[]", "task.digits must be a non-empty list of positive integers"),  # rng.choice([]) at the first step
    # a data source for a task that generates its prompts went nowhere (found by the override fuzzer)
    # (each task's config owns its fields, so arithmetic has no data keys at all)
    ("task.path=/data/train.jsonl", "unknown config key 'task.path'"),
    ("task.eval_name=math500", "unknown config key 'task.eval_name'"),
    ("logger.mode=ofline", "unknown W&B mode 'ofline'; valid: disabled, dryrun, offline, online, run, shared"),
])
def test_bad_values_fail_validation_with_one_line(override, message):
    from conftest import load_config
    from tipdistill.config import ConfigError

    with pytest.raises(ConfigError) as info:  # composition or validation, as `tipdistill train` does
        load_config([override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.integration  # train() on the prepared tiny pair
def test_completion_longer_than_the_context_fails_before_loading(tmp_path, tiny_pair):
    import tipdistill.train as tr
    from tipdistill.config import ConfigError

    student, teacher, _ = tiny_pair  # explicit paths: an embedded pair is always built to fit its own length
    with pytest.raises(ConfigError, match="does not fit the student's context"):
        tr.train(_typed(tmp_path, [f"model.student={student}", f"model.teacher={teacher}",
                                   "rollout.max_completion_length=100000"]), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.integration  # the whole analyze pipeline on the prepared tiny pair
def test_analyze_writes_the_quadrant_taxonomy(tmp_path, tiny_pair):
    from tipdistill.analyze import analyze

    table = analyze(_typed(tmp_path, ["prompts_per_step=6"]), tmp_path)
    assert list(table.index) == ["q1", "q2", "q3", "q4"]
    assert table["share"].sum() == pytest.approx(1.0) and table["tokens"].sum() > 0
    assert table["rkl_share"].sum() == pytest.approx(1.0, abs=1e-6)
    assert (tmp_path / "taxonomy.csv").exists() and "Token taxonomy" in (tmp_path / "taxonomy.md").read_text()
