"""[4a]-[6] One update step: student forward, per-token statistics, selection, kept-token loss,
backward, gradient clipping, optimizer step.

`update_step` is the only copy of this code: the training loop calls it every step,
scripts/bench_update.py times it, and `analyze` uses its `statistics`. Two seams are explicit:
`loss_fn` (the kept-token loss, the fused `fused_head.kept_token_loss` by default, any function with its
signature) and `runtime` (device, precision, and what crosses processes). With several processes each rank
runs the forwards, the loss and the backward on its own rows, while selection sees the whole batch: the
per-token statistics of every rank are gathered (`runtime.gather_rows`, [B, T] numbers), so the
entropy clip quantile, min-max normalisation, `per_batch` ranking, random draws, kept count and token
metrics are exactly one process's on the same batch (at `selector=full` the statistics come from the loss
pass and are gathered after it).
Imports torch and transformers only (no Hydra, W&B or vLLM), so it runs on a bare GPU box.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Optional

import torch

from tipdistill.fused_head import STATS, Workspace, default_chunk, kept_token_loss
from tipdistill.numerics import Head
from tipdistill.precision import UpdateMeter, build_optimizer
from tipdistill.runtime import Runtime
from tipdistill.scoring import METRIC_STATS, quadrant_fractions, quadrants, token_stats
from tipdistill.selectors import SELECTORS
from tipdistill.teacher import response_hidden
from tipdistill.types import Rollout, TokenStats

if TYPE_CHECKING:
    from tipdistill.config import TrainConfig

Timer = Callable[[str], ContextManager]  # timer(phase) -> context manager, e.g. sinks.StepTimer

# The phases update_step reports to its timer, and the loop metric each one adds to
# (time/update_s = student forward + loss + backward + optimizer; time/select_s = statistics + selection).
PHASES = {"student_forward": "update", "statistics": "select", "selection": "select", "loss": "update", "backward": "update",
          "optimizer": "update"}


def _untimed(phase: str) -> ContextManager:
    return nullcontext()


@dataclass
class Heads:
    """The two LM heads and the vocabulary prefix they share (`models.check_pair`; None = all of it)."""

    student: Head
    teacher: Head
    vocab_width: Optional[int] = None


@dataclass
class StepResult:
    """What one update step hands back to the loop (stats and keep mask of the whole batch: every rank's
    rows in rank order; `rows` are this process's)."""

    metrics: dict[str, float]  # train/*, select/*, score/*, optim/*
    stats: TokenStats  # [4a] per-token statistics, for the token dumps
    keep_mask_B_T: torch.Tensor  # bool [B, T], the tokens trained on
    finite: bool  # loss and gradient norm were finite (a non-finite step is skipped, not applied)
    rows: slice = field(default_factory=lambda: slice(None))  # this process's rows of the batch


def make_optimizer(cfg: TrainConfig, student: torch.nn.Module):
    """AdamW over the student (the dtype policy's: tipdistill/precision.py) and its schedule (linear warmup,
    then constant or cosine), as (optimizer, scheduler)."""
    optimizer = build_optimizer(cfg, student.parameters())
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / (cfg.optim.warmup_steps + 1)
        if cfg.optim.schedule == "cosine":
            progress = (step - cfg.optim.warmup_steps) / max(1, cfg.steps - cfg.optim.warmup_steps)
            return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def statistics(student, rollout: Rollout, teacher_hidden_B_T_H: torch.Tensor, heads: Heads, cfg: TrainConfig,
               runtime: Runtime, timer: Timer = _untimed, *, reads: Optional[frozenset] = STATS,
               workspace: Optional[Workspace] = None) -> tuple[Optional[TokenStats], Optional[torch.Tensor]]:
    """[4a] h, rkl (and fkl if `reads` has it) of every response token (no grad, chunked), and the student's
    hidden states with grad when the batch is one micro-batch (that forward then feeds the statistics and
    the loss). `reads=None`: no statistics (selector=full takes them from its loss pass), only that forward.

    With several micro-batches the statistics need the whole batch before any loss, so the student
    runs once without grad here and again, per micro-batch, with grad in the loss.
    """
    micro = rollout.micro_batches(cfg.micro_batch_size)
    hidden_B_T_H = None
    if len(micro) > 1 and reads is None:
        return None, None  # the loss forwards each micro-batch itself
    with timer("student_forward"), runtime.autocast():
        if len(micro) == 1:
            hidden_B_T_H = response_hidden(student, rollout, micro[0])
            stats_hidden_B_T_H = hidden_B_T_H.detach()
        else:
            with torch.no_grad():
                stats_hidden_B_T_H = torch.cat([response_hidden(student, rollout, rows) for rows in micro])
    if reads is None:
        return None, hidden_B_T_H
    with timer("statistics"), runtime.autocast():
        stats = token_stats(stats_hidden_B_T_H, teacher_hidden_B_T_H, rollout.response_mask_B_T, heads.student,
                            heads.teacher, cfg.scoring.chunk_size or default_chunk(runtime.device), heads.vocab_width,
                            reads=reads, workspace=workspace)
    return stats, hidden_B_T_H


def update_step(student, heads: Heads, rollout: Rollout, teacher_hidden_B_T_H: torch.Tensor, optimizer, scheduler, *,
                cfg: TrainConfig, step: int, runtime: Runtime, timer: Timer = _untimed,
                loss_fn: Optional[Callable] = None) -> StepResult:
    """Stages [4a]-[6] on one batch of rollouts; the optimizer steps unless the loss or gradient is
    non-finite or nothing was kept. `step` seeds the selection (with cfg.seed), so runs reproduce.

    `loss_fn` has `fused_head.kept_token_loss`'s signature and returns (loss_sum, count); the mean is over
    the kept tokens of the whole batch (TIP Eq. 9), summed across processes by `runtime`. When it gets
    `stats_out` it writes the kept tokens' h, rkl, fkl into it (selector=full: all of them).
    """
    loss_fn = loss_fn or kept_token_loss
    micro = rollout.micro_batches(cfg.micro_batch_size)  # gradients accumulate over them
    selector = SELECTORS.get(cfg.selector.name)
    # selector=full trains on every token, so its loss pass sees them all and yields the statistics too:
    # no statistics pass. A selective rule gets one, computing only what it and the metrics read.
    from_loss = selector.ignores_keep
    workspace = Workspace()  # the chunk buffers, shared by the statistics and the loss passes of this step
    stats, hidden_B_T_H = statistics(student, rollout, teacher_hidden_B_T_H, heads, cfg, runtime, timer,
                                     reads=None if from_loss else METRIC_STATS | selector.reads, workspace=workspace)
    if from_loss:
        stats = TokenStats.zeros(rollout.response_mask_B_T)

    # --- [4b] selection: which response tokens the update trains on, ranked over the whole batch
    with timer("selection"):
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
        if from_loss:  # every valid token: this process's rows need nothing from the others (gathered after the loss)
            keep_mask_B_T = selector.select(stats, cfg.keep, cfg.selector, generator).to(runtime.device)
            n_kept = n_response = runtime.sum(int(keep_mask_B_T.sum()))
        else:
            batch, mine = gather_stats(stats, runtime)
            batch_keep_B_T = selector.select(batch, cfg.keep, cfg.selector, generator).to(runtime.device)
            keep_mask_B_T = batch_keep_B_T[mine, : stats.mask_B_T.shape[1]]  # this process's rows
            n_kept = int(batch_keep_B_T.sum())
            n_response = int(batch.mask_B_T.sum())

    # --- [5] loss on kept positions only, mean over kept tokens; backward per micro-batch
    loss_total = 0.0
    for rows in micro:
        with timer("loss"), runtime.autocast():
            hidden = hidden_B_T_H if len(micro) == 1 else response_hidden(student, rollout, rows)
            loss_sum, _ = loss_fn(hidden, teacher_hidden_B_T_H[rows], keep_mask_B_T[rows], heads.student, heads.teacher,
                                  cfg.loss.name, cfg.loss.beta, cfg.loss.chunk_size or default_chunk(runtime.device),
                                  heads.vocab_width, stats_out=stats.rows(rows) if from_loss else None, workspace=workspace)
        loss = loss_sum / max(1, n_kept)  # TIP Eq. 9: divide by kept, not by all tokens
        with timer("backward"):
            loss.backward()
        loss_total += float(loss.detach())
        del hidden, loss_sum, loss
    hidden_B_T_H = workspace = None  # the graph is gone; free the activations and chunk buffers before the optimizer allocates
    loss_total = runtime.sum(loss_total)  # each process's share of the batch mean
    if from_loss:  # the loss pass filled this process's statistics: now the whole batch's, for the metrics
        batch, mine = gather_stats(stats, runtime)
        batch_keep_B_T = batch.mask_B_T.to(runtime.device)

    # --- [6] clip, step (skipped when non-finite), zero the gradients
    with timer("optimizer"):
        grad_norm = runtime.grad_norm(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip))
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        update_m = UpdateMeter.NO_STEP
        if finite and n_kept > 0:
            update_m = UpdateMeter(optimizer, cat=runtime.cat)()  # optimizer.step(), plus optim/update_ratio of what it applied
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    metrics = {"train/loss": loss_total, "train/response_tokens": n_response, "train/kept_tokens": n_kept,
               "select/keep_frac": n_kept / max(1, n_response), "optim/lr": lr, "optim/grad_norm": grad_norm, **update_m,
               **token_metrics(batch, batch_keep_B_T, cfg)}
    return StepResult(metrics, batch, batch_keep_B_T, finite, mine)


def gather_stats(stats: TokenStats, runtime: Runtime) -> tuple[TokenStats, slice]:
    """The whole batch's statistics on every process (rank order = one process's row order, since each
    rank holds a contiguous share of the prompts), and this process's rows: one gather of [B, T, S]
    numbers (S = 4, or 3 when the step did not compute fkl; every rank runs the same selector)."""
    parts = [stats.h_B_T, stats.rkl_B_T, stats.mask_B_T.float()] + ([] if stats.fkl_B_T is None else [stats.fkl_B_T])
    batch_B_T_S, rows = runtime.gather_rows(torch.stack(parts, dim=-1))
    gathered = [batch_B_T_S[..., i].contiguous() for i in range(len(parts))]  # contiguous: sums as before
    return TokenStats(h_B_T=gathered[0], rkl_B_T=gathered[1], mask_B_T=gathered[2] > 0,
                      fkl_B_T=gathered[3] if len(parts) == 4 else None), rows


@torch.no_grad()
def token_metrics(stats: TokenStats, keep_mask_B_T: torch.Tensor, cfg: TrainConfig) -> dict[str, float]:
    """Score means, the quadrant mix of all and of kept tokens, and each quadrant's share of the loss.
    A metric of a statistic the step did not compute (fkl, unless the selector reads it) is absent."""
    mask = stats.mask_B_T
    n = max(1, int(mask.sum()))
    q_B_T = quadrants(stats, cfg.scoring.entropy_threshold, cfg.scoring.rkl_threshold)
    out = {"score/entropy_mean": float(stats.h_B_T.sum() / n), "score/rkl_mean": float(stats.rkl_B_T.sum() / n)}
    if stats.fkl_B_T is not None:
        out["score/fkl_mean"] = float(stats.fkl_B_T.sum() / n)
    out.update({f"select/quadrant_frac/{k}": v for k, v in quadrant_fractions(q_B_T, mask).items()})
    out.update({f"select/kept_quadrant_frac/{k}": v for k, v in quadrant_fractions(q_B_T, keep_mask_B_T).items()})
    per_token = {"reverse_kl": stats.rkl_B_T, "forward_kl": stats.fkl_B_T}.get(cfg.loss.name)
    if per_token is not None:  # jsd has no stat of its own here; fkl may not have been computed
        kept_loss = per_token * keep_mask_B_T
        total = float(kept_loss.sum())
        for qi in range(1, 5):
            out[f"select/loss_share/q{qi}"] = float(kept_loss[q_B_T == qi].sum()) / total if total > 0 else 0.0
    return out
