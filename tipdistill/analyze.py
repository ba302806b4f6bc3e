"""`tipdistill analyze`: the two-axis token taxonomy of a model pair on a task.

The student samples responses to the task's held-out prompts (rollouts_per_prompt each); every
response token gets its entropy h and divergences (no grad, chunked), and the table reports the
quadrant mix with per-quadrant means: the reference a team keeps before choosing a selector.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer

from tipdistill import models
from tipdistill.config import TrainConfig
from tipdistill.rollout import generation_config_of, make_rollout, token_rules
from tipdistill.scoring import quadrants, token_stats
from tipdistill.tasks import build_task, encode_prompt
from tipdistill.runtime import pick_device
from tipdistill.teacher import response_hidden
from tipdistill.train import build_engine, rollout_context

log = logging.getLogger(__name__)
QUADRANT_MEANING = {"q1": "uncertain, teacher disagrees", "q2": "uncertain, teacher agrees",
                    "q3": "overconfident (confident, teacher disagrees)", "q4": "solved"}


@torch.no_grad()
def taxonomy(cfg: TrainConfig) -> pd.DataFrame:
    device = pick_device(cfg.device)
    task = build_task(cfg.task)
    student_path, teacher_path = models.resolve_pair(cfg)
    vocab_width = models.check_pair(student_path, teacher_path, cfg.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = models.load_model(student_path, cfg.model.dtype, device, trainable=False)
    teacher = models.load_model(teacher_path, cfg.model.dtype, device, trainable=False)
    rules = token_rules(tokenizer, rollout_context(cfg, student_path), generation_config_of(student_path, cfg.model.trust_remote_code))
    engine = build_engine(cfg, student, rules, student_path, device, nullcontext)  # both models already in model.dtype
    problems = task.eval_problems()
    G = cfg.rollouts_per_prompt
    rows = []
    for start in range(0, len(problems), cfg.prompts_per_step):
        batch = problems[start : start + cfg.prompts_per_step]
        prompt_ids = [encode_prompt(tokenizer, p.prompt, cfg.model.chat_template_kwargs) for p in batch]
        responses = engine.generate(prompt_ids, G, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_completion_length, seed=cfg.seed + start)
        r = make_rollout(prompt_ids, responses, G, rules)
        all_rows = slice(0, len(responses))
        stats = token_stats(response_hidden(student, r, all_rows), response_hidden(teacher, r, all_rows), r.response_mask_B_T,
                            student.get_output_embeddings(), teacher.get_output_embeddings(), cfg.scoring.chunk_size, vocab_width)
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
