"""[4a]-[6] The update step on tiny real models: micro-batching does not change the update, the loss
seam is used, a non-finite loss is skipped, and the step equals a hand-written all-token update."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_rollout, tiny_qwen
from tipdistill.config import LossConfig, OptimConfig, SelectorConfig, TrainConfig
from tipdistill.fused_head import kept_token_loss
from tipdistill.losses import naive_masked_loss
from tipdistill.runtime import LocalRuntime
from tipdistill.teacher import Teacher, response_hidden
from tipdistill.update import PHASES, Heads, make_optimizer, update_step

V = 48
RUNTIME = LocalRuntime(torch.device("cpu"))


def tiny(seed: int):
    return tiny_qwen(seed, vocab=V, layers=2, tied=True)


def batch():
    return random_rollout(V, (4, 6, 5), (7, 3, 5, 7, 1, 6))


def setup(cfg: TrainConfig, sgd: bool = True):
    """Plain SGD by default: the weights then move by exactly -lr * (clipped) gradient, so comparing
    weights compares gradients (AdamW would amplify rounding where a gradient is ~0)."""
    student, teacher = tiny(0), tiny(1)
    teacher.requires_grad_(False)
    rollout = batch()
    heads = Heads(student.get_output_embeddings(), teacher.get_output_embeddings())
    optimizer, scheduler = make_optimizer(cfg, student)
    if sgd:
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    t_hidden = Teacher(teacher, RUNTIME).hidden_states(rollout, cfg.micro_batch_size)
    return student, heads, rollout, t_hidden, optimizer, scheduler


def config(**kw) -> TrainConfig:
    return TrainConfig(optim=OptimConfig(lr=1.0, warmup_steps=0), loss=LossConfig(chunk_size=4), **kw)


def step(cfg: TrainConfig, sgd: bool = True, **kw):
    student, heads, rollout, t_hidden, optimizer, scheduler = setup(cfg, sgd)
    phases = []

    def timer(name):
        phases.append(name)
        return torch.autograd.profiler.record_function(name)

    result = update_step(student, heads, rollout, t_hidden, optimizer, scheduler, cfg=cfg, step=1, runtime=RUNTIME,
                         timer=timer, **kw)
    return student, result, phases


@pytest.mark.parametrize("selector, keep", [("full", 1.0), ("type_aware", 0.5), ("entropy", 0.3)])
def test_micro_batches_give_the_same_update(selector, keep):
    one, r1, _ = step(config(selector=SelectorConfig(name=selector), keep=keep, micro_batch_size=64))
    three, r3, _ = step(config(selector=SelectorConfig(name=selector), keep=keep, micro_batch_size=2))
    assert torch.equal(r1.keep_mask_B_T, r3.keep_mask_B_T)
    for key in ("train/loss", "optim/grad_norm", "train/kept_tokens"):  # Adam hides a wrong loss scale: check these
        assert r1.metrics[key] == pytest.approx(r3.metrics[key], rel=1e-5), key
    for (name, a), b in zip(one.named_parameters(), three.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5, msg=name)


def test_full_step_equals_a_hand_written_all_token_update():
    """selector=full through update_step == naive masked mean of KL(S||T) over every response token,
    backward, clip, AdamW (the same optimizer settings)."""
    cfg = config(micro_batch_size=4)
    student, result, phases = step(cfg)
    ref, heads, rollout, t_hidden, optimizer, _ = setup(cfg)
    rows = slice(0, rollout.input_ids_B_L.shape[0])
    loss_sum, n = naive_masked_loss(response_hidden(ref, rollout, rows), t_hidden, rollout.response_mask_B_T, heads.student,
                                    heads.teacher, "reverse_kl", 0.5)
    loss = loss_sum / n
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip))
    optimizer.step()
    assert result.metrics["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert result.metrics["optim/grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert result.metrics["train/kept_tokens"] == n == int(rollout.response_mask_B_T.sum())
    for (name, a), b in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5, msg=name)
    # every phase it reports maps to a loop metric; full has no statistics pass (its loss pass yields them),
    # and with two micro-batches the student's forward runs inside each one's loss
    assert set(phases) == set(PHASES) - {"statistics", "student_forward"}


def test_the_loss_seam_is_called_and_a_non_finite_step_is_skipped():
    calls = []

    def nan_loss(*args, **kwargs):
        calls.append(args[2].sum())  # the keep mask of the micro-batch
        loss_sum, n = kept_token_loss(*args, **kwargs)
        return loss_sum * math.nan, n

    cfg = config(micro_batch_size=4)
    before = {n: p.detach().clone() for n, p in tiny(0).named_parameters()}
    student, result, _ = step(cfg, sgd=False, loss_fn=nan_loss)  # the run's own AdamW
    assert len(calls) == 2  # one call per micro-batch (6 rollouts, 4 per micro-batch)
    assert not result.finite and math.isnan(result.metrics["train/loss"])
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]), name  # not applied
        assert p.grad is None  # and no gradient left behind for the next step


@pytest.mark.parametrize("micro_batch_size", [64, 2])
def test_full_takes_its_statistics_from_the_loss_pass(micro_batch_size):
    """selector=full runs no statistics pass: its loss pass sees every token and hands out h, rkl and fkl,
    equal to the statistics pass's on the same weights."""
    from tipdistill.update import statistics

    cfg = config(micro_batch_size=micro_batch_size)
    student, heads, rollout, t_hidden, _, _ = setup(cfg)
    expected, _ = statistics(student, rollout, t_hidden, heads, cfg, RUNTIME)  # before the step moves the weights
    _, result, phases = step(cfg)
    assert "statistics" not in phases
    for name in ("h_B_T", "rkl_B_T", "fkl_B_T"):
        torch.testing.assert_close(getattr(result.stats, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    assert result.metrics["score/fkl_mean"] == pytest.approx(float(expected.fkl_B_T.sum() / expected.mask_B_T.sum()), rel=1e-5)


def test_a_selective_step_computes_fkl_only_for_a_selector_that_reads_it():
    _, aware, phases = step(config(selector=SelectorConfig(name="type_aware"), keep=0.5))
    _, q3, _ = step(config(selector=SelectorConfig(name="q3"), keep=0.5))
    assert "statistics" in phases
    assert aware.stats.fkl_B_T is None and "score/fkl_mean" not in aware.metrics  # absent, not a placeholder 0
    assert q3.stats.fkl_B_T is not None and q3.metrics["score/fkl_mean"] > 0
    assert aware.metrics["score/rkl_mean"] == pytest.approx(q3.metrics["score/rkl_mean"])
