"""`tipdistill analyze`: the two-axis token taxonomy of a model pair on a task.

The student samples responses to the task's held-out prompts (rollouts_per_prompt each); every
response token gets its entropy h and divergences (no grad, chunked), and the table reports the
quadrant mix with per-quadrant means: the reference a team keeps before choosing a selector.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from tipdistill.config import TrainConfig
from tipdistill.pipeline import build_engine, load_pair, sample_rollouts
from tipdistill.runtime import LocalRuntime
from tipdistill.scoring import quadrants
from tipdistill.tasks import build_task
from tipdistill.update import statistics

log = logging.getLogger(__name__)
QUADRANT_MEANING = {"q1": "uncertain, teacher disagrees", "q2": "uncertain, teacher agrees",
                    "q3": "overconfident (confident, teacher disagrees)", "q4": "solved"}


@torch.no_grad()
def taxonomy(cfg: TrainConfig) -> pd.DataFrame:
    """The quadrant table over the held-out prompts, with the pipeline's own set-up, teacher and statistics."""
    runtime = LocalRuntime.from_config(cfg)
    task = build_task(cfg.task)
    pair = load_pair(cfg, runtime, trainable=False)
    engine = build_engine(cfg, pair, runtime)
    problems = task.eval_problems()
    rows = []
    for start in range(0, len(problems), cfg.prompts_per_step):
        _, rollout = sample_rollouts(engine, pair.tokenizer, problems[start : start + cfg.prompts_per_step], cfg,
                                     seed=cfg.seed + start, runtime=runtime)
        teacher_hidden_B_T_H = pair.teacher.hidden_states(rollout, cfg.micro_batch_size)
        stats, _ = statistics(pair.student, rollout, teacher_hidden_B_T_H, pair.heads, cfg, runtime)
        q = quadrants(stats, cfg.scoring.entropy_threshold, cfg.scoring.rkl_threshold)
        m = stats.mask_B_T
        rows.append(pd.DataFrame({"quadrant": q[m].tolist(), "h": stats.h_B_T[m].tolist(),
                                  "rkl": stats.rkl_B_T[m].tolist(), "fkl": stats.fkl_B_T[m].tolist()}))
    engine.close()
    tokens = pd.concat(rows)
    tokens["quadrant"] = "q" + tokens["quadrant"].astype(str)
    table = tokens.groupby("quadrant").agg(tokens=("h", "size"), h_mean=("h", "mean"), rkl_mean=("rkl", "mean"),
                                           fkl_mean=("fkl", "mean"), rkl_sum=("rkl", "sum"))
    table = table.reindex(["q1", "q2", "q3", "q4"], fill_value=0)
    table.insert(1, "share", table["tokens"] / max(1, table["tokens"].sum()))
    table["rkl_share"] = table.pop("rkl_sum") / max(1e-12, tokens["rkl"].sum())  # where the loss mass sits
    table.insert(0, "meaning", [QUADRANT_MEANING[q] for q in table.index])
    return table


def analyze(cfg: TrainConfig, out_dir: Path) -> pd.DataFrame:
    table = taxonomy(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "taxonomy.csv")
    header = (f"Token taxonomy: model={cfg.model.name} task={cfg.task.name}; thresholds h > {cfg.scoring.entropy_threshold} "
              f"(entropy / ln|V|), KL(student||teacher) > {cfg.scoring.rkl_threshold} nats")
    text = header + "\n\n" + table.to_string(float_format=lambda v: f"{v:.4f}")
    (out_dir / "taxonomy.md").write_text(text + "\n")
    print(text)
    return table
