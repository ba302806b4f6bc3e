"""[1 -> 7] The training loop, written out: one block per pipeline stage, no trainer framework.

prompts -> student rollouts (vLLM or HF) -> teacher hidden states on the same ids (no grad) ->
per-token statistics (no grad, chunked) -> token selection -> divergence on the kept positions only
-> AdamW step -> weights synced into the rollout engine -> metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from tipdistill import checkpoint, models
from tipdistill.config import ConfigError, TrainConfig, to_plain
from tipdistill.evaluate import evaluate
from tipdistill.losses import kept_token_loss
from tipdistill.precision import UpdateMeter, build_optimizer
from tipdistill.rollout import ENGINES, TokenRules, generation_config_of, make_rollout, token_rules
from tipdistill.runtime import LocalRuntime, Runtime
from tipdistill.scoring import normalise, quadrant_fractions, quadrants, token_stats
from tipdistill.selectors import SELECTORS
from tipdistill.sinks import StepTimer, UpdateMemoryProbe, open_sink
from tipdistill.tasks import build_task, decode_response, encode_prompt
from tipdistill.teacher import Teacher, response_hidden
from tipdistill.types import Rollout

log = logging.getLogger(__name__)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / (cfg.optim.warmup_steps + 1)
        if cfg.optim.schedule == "cosine":
            progress = (step - cfg.optim.warmup_steps) / max(1, cfg.steps - cfg.optim.warmup_steps)
            return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def build_engine(cfg: TrainConfig, student, rules: TokenRules, student_path: str, device: torch.device, amp):
    """vLLM holds its own copy in the compute dtype (`model.dtype`); HF samples from the student under `amp`."""
    engine_cls = ENGINES.get(cfg.rollout.engine)
    if cfg.rollout.engine == "hf":
        return engine_cls(student, rules, autocast=amp)
    return engine_cls(student_path, cfg.rollout, rules, dtype=cfg.model.dtype, seed=cfg.seed, device=device.type)


def rollout_context(cfg: TrainConfig, student_path: str) -> int:
    """Positions a rollout may use: the student's context, or less with rollout.max_model_len."""
    return min(models.max_context(student_path), cfg.rollout.max_model_len or math.inf)


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (signal or repeated numerical faults); a checkpoint was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: TrainConfig, run_dir: Path, *, run_name: str = "run", group: str | None = None,
          runtime: Runtime | None = None) -> dict:
    """Run one distillation job; writes metrics.jsonl, summary.json and checkpoints/ into run_dir."""
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    runtime = runtime or LocalRuntime.from_config(cfg)
    device = runtime.device
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    resume_from = checkpoint.latest(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ConfigError(f"resume: no checkpoint under {run_dir / 'checkpoints'}; fix: point resume=<run dir> at a run that saved one")

    # --- [0] task and models: cheap checks first (data, paths, vocabularies), then prepare and load
    task = build_task(cfg.task)
    eval_problems = task.eval_problems()
    student_path, teacher_path = models.resolve_pair(cfg)
    vocab_width = models.check_pair(student_path, teacher_path, cfg.model.trust_remote_code)
    context = rollout_context(cfg, student_path)
    if cfg.rollout.max_completion_length >= context:
        raise ConfigError(f"rollout.max_completion_length={cfg.rollout.max_completion_length} does not fit the student's context "
                          f"({context} positions); fix: lower it")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code)
    # one stop rule for both engines, the loss mask and the truncation flag
    rules = token_rules(tokenizer, context, generation_config_of(student_path, cfg.model.trust_remote_code))
    student = models.load_model(str(resume_from or student_path), cfg.model.student_dtype, device, trainable=True,
                                trust_remote_code=cfg.model.trust_remote_code)
    teacher_model = models.load_model(teacher_path, cfg.model.dtype, device, trainable=False, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.gradient_checkpointing:  # non-reentrant: works with the frozen inputs and the chunked loss
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = Teacher(teacher_model, runtime, offload=cfg.teacher_offload)
    s_head, t_head = student.get_output_embeddings(), teacher.head
    selector = SELECTORS.get(cfg.selector.name)
    optimizer = build_optimizer(cfg, student.parameters())
    measured_step = UpdateMeter(optimizer)  # optimizer.step() plus optim/update_ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    summary: dict = {}
    first_step = 1
    if resume_from is not None:
        state = checkpoint.load_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.setstate(state["task_rng"])
        torch.set_rng_state(state["torch_rng"])
        summary, last_eval, first_step = state["summary"], state["last_eval"], state["step"] + 1
        _truncate_metrics(run_dir / "metrics.jsonl", state["step"])  # each step appears once
        log.info("resuming from %s (step %d)", resume_from, state["step"])
    engine = build_engine(cfg, student, rules, student_path, device, runtime.autocast)
    if resume_from is not None:
        engine.sync_weights(runtime.full_weights(student))  # the engine loaded the initial student; give it the checkpoint's weights
    sample = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                  max_tokens=cfg.rollout.max_completion_length)
    G, B = cfg.rollouts_per_prompt, cfg.prompts_per_step * cfg.rollouts_per_prompt
    micro = [slice(i, min(i + cfg.micro_batch_size, B)) for i in range(0, B, cfg.micro_batch_size)]

    def run_eval(step: int) -> dict:
        # Its own seeds: evaluation must not shift the training random stream.
        return evaluate(engine, task, tokenizer, eval_problems, samples=cfg.eval.samples, greedy=cfg.eval.greedy,
                        max_tokens=cfg.rollout.max_completion_length, seed=cfg.seed * 7919 + step,
                        chat_template_kwargs=cfg.model.chat_template_kwargs)

    def save_checkpoint(step: int) -> Path:
        return checkpoint.save(run_dir, step, runtime.unwrap(student), tokenizer, optimizer, scheduler,
                               {"task_rng": rng.getstate(), "summary": summary, "last_eval": last_eval},
                               cfg.keep_checkpoints)

    signals = _SignalFlag()
    with signals, open_sink(cfg.logger, run_dir, run_name=run_name, group=group, config=to_plain(cfg),
                            resume=resume_from is not None) as sink:
        if resume_from is None:
            last_eval = run_eval(0)
            sink.log({"step": 0, **last_eval})
            summary.update({f"{k}_start": v for k, v in last_eval.items()})
        progress = _Progress(cfg.steps, first_step)
        skipped = consecutive_skips = 0

        for step in range(first_step, cfg.steps + 1):
            timer = StepTimer()
            with timer("step"):
                # --- [1] prompts
                problems = task.train_problems(rng, cfg.prompts_per_step)
                prompt_ids_P = [encode_prompt(tokenizer, p.prompt, cfg.model.chat_template_kwargs) for p in problems]

                # --- [2] rollout: the student samples its own responses
                with timer("rollout"):
                    responses_B = engine.generate(prompt_ids_P, G, seed=cfg.seed * 1_000_003 + step, **sample)
                    engine.sleep()  # vLLM sleep mode: its KV cache and weights leave the GPU until the sync
                rollout = _to_device(make_rollout(prompt_ids_P, responses_B, G, rules), device)
                mask_B_T = rollout.response_mask_B_T
                n_response = int(mask_B_T.sum())

                # --- [3] teacher: hidden states on the student's exact token ids, no grad
                with timer("teacher"):
                    teacher_hidden_B_T_H = teacher.hidden_states(rollout, cfg.micro_batch_size)

                probe = UpdateMemoryProbe(device)
                with probe:
                    # --- [4a] student forward; per-token stats without grad, chunk by chunk
                    with timer("update"), runtime.autocast():
                        if len(micro) == 1:  # one micro-batch: the grad forward also feeds the stats
                            student_hidden = [response_hidden(student, rollout, micro[0])]
                            stats_hidden_B_T_H = student_hidden[0].detach()
                        else:  # several: stats need the whole batch first, so a no-grad pass
                            with torch.no_grad():
                                stats_hidden_B_T_H = torch.cat([response_hidden(student, rollout, rows) for rows in micro])
                    with timer("select"), runtime.autocast():
                        stats = token_stats(stats_hidden_B_T_H, teacher_hidden_B_T_H, mask_B_T, s_head, t_head,
                                            cfg.scoring.chunk_size, vocab_width)
                        del stats_hidden_B_T_H
                        # --- [4b] selection: which response tokens the update trains on
                        generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + step)
                        keep_mask_B_T = selector.select(stats, cfg.keep, cfg.selector, generator).to(device)
                    n_kept = int(keep_mask_B_T.sum())

                    # --- [5] loss on kept positions only, mean over kept tokens; [6] update
                    with timer("update"):
                        loss_total = 0.0
                        for rows in micro:
                            with runtime.autocast():
                                hidden = student_hidden[0] if len(micro) == 1 else response_hidden(student, rollout, rows)
                                loss_sum, _ = kept_token_loss(hidden, teacher_hidden_B_T_H[rows], keep_mask_B_T[rows], s_head, t_head,
                                                              cfg.loss.name, cfg.loss.beta, cfg.loss.chunk_size, vocab_width)
                            loss = loss_sum / max(1, n_kept)  # TIP Eq. 9: divide by kept, not by all tokens
                            loss.backward()
                            loss_total += float(loss.detach())
                            del hidden, loss_sum, loss
                        student_hidden = None
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip))
                        lr = scheduler.get_last_lr()[0]
                        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
                        update_m = UpdateMeter.NO_STEP
                        if finite and n_kept > 0:
                            update_m = measured_step()
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)

                # --- weight sync: the next rollout must come from the updated student
                with timer("weight_sync"):
                    engine.wake()
                    engine.sync_weights(runtime.full_weights(student))

            # --- numerical faults: skip the step, stop after too many in a row
            skipped += not finite
            consecutive_skips = 0 if finite else consecutive_skips + 1

            # --- [7] metrics
            texts = [decode_response(tokenizer, prompt_ids_P[i // G], r) for i, r in enumerate(responses_B)]
            rewards = [task.score(problems[i // G], t) for i, t in enumerate(texts)]
            m = {"step": step, "train/loss": loss_total, "train/response_tokens": n_response, "train/kept_tokens": n_kept,
                 "select/keep_frac": n_kept / max(1, n_response), "optim/lr": lr, "optim/grad_norm": grad_norm,
                 "train/skipped_steps": skipped, "rollout/response_len_mean": n_response / B,
                 "rollout/truncated_frac": float(rollout.truncated_B.float().mean()),
                 "rollout/reward_mean": sum(rewards) / len(rewards), **update_m}
            m.update(token_metrics(stats, keep_mask_B_T, cfg))
            m.update(timer.pop())
            m.update(probe.metrics)
            m["perf/rollout_tokens_per_s"] = n_response / max(1e-9, m["time/rollout_s"])
            m["perf/update_tokens_per_s"] = n_response / max(1e-9, m["time/update_s"] + m["time/select_s"])
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                last_eval = run_eval(step)
                m.update(last_eval)
            sink.log(m)
            if cfg.scoring.token_dump_every and (step % cfg.scoring.token_dump_every == 0 or step == 1):
                sink.log_table("tokens", token_rows(step, stats, keep_mask_B_T, rollout, tokenizer, cfg))
            if cfg.logger.table_every and (step % cfg.logger.table_every == 0 or step == 1):
                sink.log_table("rollouts", rollout_rows(step, problems, texts, rewards, keep_mask_B_T, rollout, tokenizer, G))
            progress.update(step, m, last_eval)

            if consecutive_skips >= cfg.max_consecutive_skips:
                path = save_checkpoint(step)
                raise TrainingStopped(f"{consecutive_skips} steps in a row had a non-finite loss or gradient (step {step}); "
                                      f"the last good weights are in {path}; fix: lower optim.lr or check the data", 3)
            if signals.received is not None:
                path = save_checkpoint(step)
                raise TrainingStopped(f"stopped by signal {signals.received} after step {step}; checkpoint {path}; "
                                      f"continue with: tipdistill train <same overrides> resume={run_dir}", 128 + signals.received)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(step)

        progress.close()
        # every eval metric (accuracy, greedy, pass@k, constraint score) at start and end
        summary.update({f"{k}_end": v for k, v in last_eval.items()})
        summary.update({"steps": cfg.steps, "wall_s": round(time.time() - t_start, 2)})
        save_checkpoint(cfg.steps)
        final = run_dir / "checkpoints" / "final"
        runtime.unwrap(student).save_pretrained(final)
        tokenizer.save_pretrained(final)
        sink.summary(summary)
    engine.close()
    return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint, so a resumed run logs each step exactly once."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits cleanly."""

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
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _to_device(r: Rollout, device: torch.device) -> Rollout:
    return Rollout(r.input_ids_B_L.to(device), r.attention_mask_B_L.to(device), r.response_mask_B_T.to(device),
                   r.prompt_len, r.truncated_B, r.prompt_index_B)


@torch.no_grad()
def token_metrics(stats, keep_mask_B_T: torch.Tensor, cfg: TrainConfig) -> dict:
    """Score means, the quadrant mix of all and of kept tokens, and each quadrant's share of the loss."""
    mask = stats.mask_B_T
    n = max(1, int(mask.sum()))
    q_B_T = quadrants(stats, cfg.scoring.entropy_threshold, cfg.scoring.rkl_threshold)
    out = {"score/entropy_mean": float(stats.h_B_T.sum() / n), "score/rkl_mean": float(stats.rkl_B_T.sum() / n),
           "score/fkl_mean": float(stats.fkl_B_T.sum() / n)}
    out.update({f"select/quadrant_frac/{k}": v for k, v in quadrant_fractions(q_B_T, mask).items()})
    out.update({f"select/kept_quadrant_frac/{k}": v for k, v in quadrant_fractions(q_B_T, keep_mask_B_T).items()})
    per_token = {"reverse_kl": stats.rkl_B_T, "forward_kl": stats.fkl_B_T}.get(cfg.loss.name)
    if per_token is not None:  # jsd has no stat of its own here
        kept_loss = per_token * keep_mask_B_T
        total = float(kept_loss.sum())
        for qi in range(1, 5):
            out[f"select/loss_share/q{qi}"] = float(kept_loss[q_B_T == qi].sum()) / total if total > 0 else 0.0
    return out


@torch.no_grad()
def token_rows(step: int, stats, keep_mask_B_T, rollout: Rollout, tokenizer, cfg: TrainConfig):
    """A few rollouts' per-token rows for the local parquet dump (and a small W&B table)."""
    import pandas as pd

    h_hat, rkl_hat = normalise(stats, cfg.selector.entropy_clip_quantile, cfg.selector.rkl_clip_quantile)
    score = SELECTORS.get(cfg.selector.name).score_B_T(stats, cfg.selector)
    q = quadrants(stats, cfg.scoring.entropy_threshold, cfg.scoring.rkl_threshold)
    ids = rollout.response_ids_B_T
    rows = []
    for b in range(min(cfg.scoring.token_dump_sequences, ids.shape[0])):
        for t in range(int(stats.mask_B_T[b].sum())):
            rows.append({"step": step, "seq": b, "pos": t, "token": tokenizer.decode([int(ids[b, t])]),
                         "h": float(stats.h_B_T[b, t]), "h_hat": float(h_hat[b, t]), "rkl": float(stats.rkl_B_T[b, t]),
                         "rkl_hat": float(rkl_hat[b, t]), "fkl": float(stats.fkl_B_T[b, t]),
                         "score": float(score[b, t]), "kept": bool(keep_mask_B_T[b, t]), "quadrant": f"q{int(q[b, t])}"})
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

    def __init__(self, total: int, first_step: int = 1):
        self.total, self.first, self.tty = total, first_step, sys.stderr.isatty()
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
        elif step % max(1, self.total // 10) == 0 or step == self.total:
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
