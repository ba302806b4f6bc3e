"""[1 -> 7] The training loop, written out: one call per pipeline stage, no trainer framework.

prompts -> student rollouts (vLLM or HF) -> teacher hidden states on the same ids (no grad, teacher.py)
-> one update step (update.py: per-token statistics, token selection, divergence on the kept positions
only, AdamW step) -> weights synced into the rollout engine -> metrics (sinks.py).

The same loop runs on every rank of a torchrun job (tipdistill/distributed.py): every rank draws the
whole batch of prompts from the same sampler and works on its contiguous share; what crosses ranks goes
through the runtime, and only the main rank writes metrics, tables, reports and checkpoints' shared files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from tipdistill import checkpoint
from tipdistill.config import TrainConfig, to_plain
from tipdistill.errors import ConfigError
from tipdistill.evaluate import evaluate
from tipdistill.pipeline import build_engine, load_pair, sample_rollouts
from tipdistill.runtime import LocalRuntime, Runtime
from tipdistill.scoring import normalise, quadrants
from tipdistill.selectors import SELECTORS
from tipdistill.sinks import StepTimer, UpdateMemoryProbe, open_sink
from tipdistill.tasks import build_task
from tipdistill.types import Rollout
from tipdistill.update import PHASES, StepResult, make_optimizer, update_step

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (signal or repeated numerical faults); a checkpoint was saved."""

    def __init__(self, message: str, exit_code: int, signum: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.signum = signum  # the signal that stopped it (the CLI hands it on: a submitit job requeues)


def train(cfg: TrainConfig, run_dir: Path, *, run_name: str = "run", group: str | None = None,
          wandb_id: str | None = None, runtime: Runtime | None = None) -> dict:
    """Run one distillation job; writes metrics.jsonl, summary.json and checkpoints/ into run_dir."""
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime = runtime or LocalRuntime.from_config(cfg)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    # verified before anything loads: a damaged newest checkpoint falls back to an older intact one
    resume_from, state = (None, None) if checkpoint.starts_afresh(cfg.resume, run_dir) else checkpoint.newest_intact(run_dir)
    if resume_from is not None:
        runtime.checkpoints.check(resume_from)  # written by as many processes as this run has

    # --- [0] task, models, optimizer: cheap checks first (data, paths, vocabularies), then prepare and load
    task = build_task(cfg.task)
    eval_problems = task.eval_problems()
    pair = load_pair(cfg, runtime, trainable=True, student_from=resume_from and runtime.checkpoints.weights_of(resume_from))
    student, tokenizer = pair.student, pair.tokenizer
    optimizer, scheduler = make_optimizer(cfg, student)
    summary, last_eval, first_step = {}, {}, 1
    if resume_from is not None:
        summary, last_eval, first_step = _restore(resume_from, state, student, optimizer, scheduler, rng, run_dir, runtime)
    engine = build_engine(cfg, pair, runtime)
    if resume_from is not None:
        engine.sync_weights(runtime.full_weights(student))  # the engine loaded the initial student; give it the checkpoint's weights

    def run_eval(step: int) -> dict:
        # Its own seeds: evaluation must not shift the training random stream.
        return evaluate(engine, task, tokenizer, eval_problems, samples=cfg.eval.samples, greedy=cfg.eval.greedy,
                        max_tokens=cfg.rollout.max_completion_length, seed=cfg.seed * 7919 + step,
                        chat_template_kwargs=cfg.model.chat_template_kwargs, runtime=runtime)

    def save_checkpoint(step: int) -> Path:
        return runtime.checkpoints.save(run_dir, step, runtime.unwrap(student), tokenizer, optimizer, scheduler,
                                        {"task_rng": rng.getstate(), "summary": summary, "last_eval": last_eval},
                                        cfg.keep_checkpoints)

    signals = _SignalFlag()
    with signals, open_sink(cfg.logger, run_dir, run_name=run_name, group=group, config=to_plain(cfg), run_id=wandb_id,
                            resume=resume_from is not None, enabled=runtime.is_main) as sink:
        if resume_from is None:
            last_eval = run_eval(0)
            sink.log({"step": 0, **last_eval})
            summary.update({f"{k}_start": v for k, v in last_eval.items()})
        progress = _Progress(cfg.steps, first_step, enabled=runtime.is_main)
        skipped = consecutive_skips = 0

        for step in range(first_step, cfg.steps + 1):
            timer = StepTimer(groups=PHASES)
            with timer("step"):
                # --- [1] prompts (the whole batch; this process's share), [2] rollout: the student samples
                share = runtime.share(cfg.prompts_per_step)
                problems = task.train_problems(rng, cfg.prompts_per_step)[share]
                with timer("rollout"):
                    texts, rollout = sample_rollouts(engine, tokenizer, problems, cfg, seed=cfg.seed * 1_000_003 + step,
                                                     runtime=runtime, first=share.start * cfg.rollouts_per_prompt)
                    engine.sleep()  # vLLM sleep mode: its KV cache and weights leave the GPU until the sync

                # --- [3] teacher: hidden states on the student's exact token ids, no grad
                with timer("teacher"):
                    teacher_hidden_B_T_H = pair.teacher.hidden_states(rollout, cfg.micro_batch_size)

                # --- [4a]-[6] statistics, selection, kept-token loss, backward, optimizer step
                probe = UpdateMemoryProbe(runtime.device)
                with probe:
                    result = update_step(student, pair.heads, rollout, teacher_hidden_B_T_H, optimizer, scheduler,
                                         cfg=cfg, step=step, runtime=runtime, timer=timer)

                # --- weight sync: the next rollout must come from the updated student
                with timer("weight_sync"):
                    engine.wake()
                    engine.sync_weights(runtime.full_weights(student))

            # --- numerical faults: skip the step, stop after too many in a row
            skipped += not result.finite
            consecutive_skips = 0 if result.finite else consecutive_skips + 1

            # --- [7] metrics, evaluation, tables
            rewards = [task.score(problems[i // cfg.rollouts_per_prompt], t) for i, t in enumerate(texts)]
            m = step_metrics(step, result, rollout, rewards, skipped, {**timer.pop(), **probe.metrics}, runtime)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                last_eval = run_eval(step)
                m.update(last_eval)
            sink.log(m)
            if runtime.is_main and cfg.scoring.token_dump_every and (step % cfg.scoring.token_dump_every == 0 or step == 1):
                sink.log_table("tokens", token_rows(step, result, rollout, tokenizer, cfg))
            if runtime.is_main and cfg.logger.table_every and (step % cfg.logger.table_every == 0 or step == 1):
                sink.log_table("rollouts", rollout_rows(step, problems, texts, rewards, result.keep_mask_B_T[result.rows], rollout,
                                                        tokenizer, cfg.rollouts_per_prompt))
            progress.update(step, m, last_eval)

            if consecutive_skips >= cfg.max_consecutive_skips:
                path = save_checkpoint(step)
                raise TrainingStopped(f"{consecutive_skips} steps in a row had a non-finite loss or gradient (step {step}); "
                                      f"the last good weights are in {path}; fix: lower optim.lr or check the data", 3)
            if runtime.sum(int(signals.received is not None)):  # every rank stops after the same step
                requeue = runtime.sum(int(signals.received == signal.SIGUSR2)) > 0  # and agrees on the cluster's warning
                received = int(signal.SIGUSR2 if requeue else (signals.received or signal.SIGTERM))
                path = save_checkpoint(step)
                raise TrainingStopped(f"stopped by signal {received} after step {step}; checkpoint {path}; "
                                      f"continue with: tipdistill train <same overrides> resume={run_dir}", 128 + received, received)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(step)

        progress.close()
        # every eval metric (accuracy, greedy, pass@k, constraint score) at start and end
        summary.update({f"{k}_end": v for k, v in last_eval.items()})
        summary.update({"steps": cfg.steps, "wall_s": round(time.time() - t_start, 2)})
        save_checkpoint(cfg.steps)
        runtime.checkpoints.export(runtime.unwrap(student), tokenizer, run_dir / "checkpoints" / "final")
        sink.summary(summary)
    engine.close()
    return summary


def step_metrics(step: int, result: StepResult, rollout: Rollout, rewards: list[float], skipped: int, timings: dict,
                 runtime: Runtime) -> dict:
    """One metrics.jsonl line: the update step's metrics, the rollouts' (over every process's rollouts),
    stage times and memory (this process's)."""
    n_response = result.metrics["train/response_tokens"]
    n_rollouts = runtime.sum(len(rewards))
    m = {"step": step, **result.metrics, "train/skipped_steps": skipped,
         "rollout/response_len_mean": n_response / n_rollouts,
         "rollout/truncated_frac": float(runtime.cat(rollout.truncated_B.float()).mean()),
         "rollout/reward_mean": runtime.sum(sum(rewards)) / n_rollouts, **timings}
    m["perf/rollout_tokens_per_s"] = n_response / max(1e-9, m["time/rollout_s"])
    m["perf/update_tokens_per_s"] = n_response / max(1e-9, m["time/update_s"] + m["time/select_s"])
    return m


def _restore(path: Path, state: dict, student, optimizer, scheduler, rng: random.Random, run_dir: Path,
             runtime: Runtime) -> tuple[dict, dict, int]:
    """Put a verified checkpoint's trainer state in place; returns (summary, last evaluation, first step to run)."""
    state = runtime.checkpoints.restore(path, state, student, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rng.setstate(state["task_rng"])
    torch.set_rng_state(state["torch_rng"])
    if runtime.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", state["step"])  # each step appears once
    log.info("resuming from %s (step %d)", path, state["step"])
    return state["summary"], state["last_eval"], state["step"] + 1


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint, so a resumed run logs each step exactly once."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill: its step is trained again
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


class _SignalFlag:
    """SIGINT/SIGTERM/SIGUSR2 set a flag; the loop checkpoints at the end of the step and exits cleanly. USR2
    is SLURM's warning before a time limit or preemption (submitit asks for it); the handler it replaces
    gets the signal after the checkpoint (tipdistill/cluster.py: submitit requeues the job)."""

    def __init__(self):
        self.received = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@torch.no_grad()
def token_rows(step: int, result: StepResult, rollout: Rollout, tokenizer, cfg: TrainConfig):
    """A few rollouts' per-token rows for the local parquet dump (and a small W&B table)."""
    import pandas as pd

    # the whole batch's statistics (normalised over it, as selection saw them); this process's first rollouts
    stats, keep_mask_B_T = result.stats, result.keep_mask_B_T
    h_hat, rkl_hat = normalise(stats, cfg.selector.entropy_clip_quantile, cfg.selector.rkl_clip_quantile)
    score = SELECTORS.get(cfg.selector.name).score_B_T(stats, cfg.selector)
    q = quadrants(stats, cfg.scoring.entropy_threshold, cfg.scoring.rkl_threshold)
    ids = rollout.response_ids_B_T
    first = result.rows.start or 0
    rows = []
    for seq in range(min(cfg.scoring.token_dump_sequences, ids.shape[0])):
        b = first + seq
        for t in range(int(stats.mask_B_T[b].sum())):
            row = {"step": step, "seq": b, "pos": t, "token": tokenizer.decode([int(ids[seq, t])]),
                   "h": float(stats.h_B_T[b, t]), "h_hat": float(h_hat[b, t]), "rkl": float(stats.rkl_B_T[b, t]),
                   "rkl_hat": float(rkl_hat[b, t]), "score": float(score[b, t]), "kept": bool(keep_mask_B_T[b, t]),
                   "quadrant": f"q{int(q[b, t])}"}
            if stats.fkl_B_T is not None:  # computed only when the selector reads it (or at selector=full)
                row["fkl"] = float(stats.fkl_B_T[b, t])
            rows.append(row)
    return pd.DataFrame(rows)


def rollout_rows(step: int, problems, texts, rewards, keep_mask_B_T, rollout: Rollout, tokenizer, G: int, limit: int = 8):
    """Sample rollouts with the kept tokens marked as [tok], for eyeballing what a selector trains on."""
    import pandas as pd

    ids = rollout.response_ids_B_T
    rows = []
    for b in range(min(limit, len(texts))):
        m = int(rollout.response_mask_B_T[b].sum())
        marked = "".join(f"[{tokenizer.decode([int(ids[b, t])])}]" if keep_mask_B_T[b, t] else tokenizer.decode([int(ids[b, t])])
                         for t in range(m))
        rows.append({"step": step, "seq": b, "prompt": problems[b // G].prompt, "response": texts[b],
                     "kept_marked": marked, "kept": int(keep_mask_B_T[b].sum()), "tokens": m, "reward": rewards[b]})
    return pd.DataFrame(rows)


class _Progress:
    """A tqdm bar on a terminal; a plain log line every 10% of the run otherwise (no log flooding)."""

    def __init__(self, total: int, first_step: int = 1, enabled: bool = True):
        self.total, self.first, self.tty, self.enabled = total, first_step, sys.stderr.isatty() and enabled, enabled
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first_step - 1, desc="train", dynamic_ncols=True)
        self.t0 = time.time()

    def update(self, step: int, m: dict, last_eval: dict) -> None:
        acc = last_eval.get("eval/accuracy", float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['train/loss']:.3f}", keep=f"{m['select/keep_frac']:.2f}", acc=f"{acc:.3f}")
            self.bar.update(1)
        elif self.enabled and (step % max(1, self.total // 10) == 0 or step == self.total):
            eta = (time.time() - self.t0) / (step - self.first + 1) * (self.total - step)
            log.info("step %d/%d loss %.4f keep %.2f acc %.3f eta %.0fs", step, self.total, m["train/loss"],
                     m["select/keep_frac"], acc, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_resolved_config(cfg_plain: dict, run_dir: Path) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(cfg_plain, sort_keys=True))
    log.info("resolved config:\n%s", json.dumps(cfg_plain, indent=1, sort_keys=True))
