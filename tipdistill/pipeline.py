"""[0]-[2] A run's parts built from its validated config, shared by `train` and `analyze`: the model
pair (tokenizer, student, teacher, LM heads), the rollout engine, and one batch of rollouts.

Cheap checks run before anything heavy loads: paths, vocabularies, and that a completion fits the
student's context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tipdistill import models
from tipdistill.config import TrainConfig
from tipdistill.errors import ConfigError
from tipdistill.rollout import ENGINES, TokenRules, generation_config_of, make_rollout, token_rules
from tipdistill.runtime import Runtime
from tipdistill.tasks import Problem, decode_response, encode_prompt
from tipdistill.teacher import Teacher
from tipdistill.types import Rollout
from tipdistill.update import Heads


@dataclass
class Pair:
    """The loaded teacher/student pair of a run."""

    student_path: str  # where the rollout engine loads the student from (before any sync)
    tokenizer: object
    rules: TokenRules  # the one stop rule: both engines, the loss mask and the truncation flag
    student: object  # the trainable (or, for analyze, frozen) causal LM
    teacher: Teacher
    heads: Heads


def rollout_context(cfg: TrainConfig, student_path: str) -> int:
    """Positions a rollout may use: the student's context, or less with rollout.max_model_len."""
    return min(models.max_context(student_path), cfg.rollout.max_model_len or math.inf)


def load_pair(cfg: TrainConfig, runtime: Runtime, *, trainable: bool, student_from: Optional[Path] = None) -> Pair:
    """Check, then load the pair; `student_from` (a checkpoint) replaces the student's initial weights."""
    with runtime.main_first():  # an embedded pair not cached yet is prepared once, by the main process
        student_path, teacher_path = models.resolve_pair(cfg)
    vocab_width = models.check_pair(student_path, teacher_path, cfg.model.trust_remote_code)
    context = rollout_context(cfg, student_path)
    if cfg.rollout.max_completion_length >= context:
        raise ConfigError(f"rollout.max_completion_length={cfg.rollout.max_completion_length} does not fit the student's context "
                          f"({context} positions); fix: lower it")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=cfg.model.trust_remote_code)
    rules = token_rules(tokenizer, context, generation_config_of(student_path, cfg.model.trust_remote_code))
    # a trainable student keeps its master weights in model.student_dtype (fp32 by default, tipdistill/precision.py)
    student_dtype = cfg.model.student_dtype if trainable else cfg.model.dtype
    student = runtime.load_model(str(student_from or student_path), student_dtype, trainable=trainable,
                                 trust_remote_code=cfg.model.trust_remote_code,
                                 gradient_checkpointing=trainable and cfg.gradient_checkpointing)
    teacher_model = runtime.load_model(teacher_path, cfg.model.dtype, trainable=False, trust_remote_code=cfg.model.trust_remote_code,
                                       offload=cfg.teacher_offload)
    teacher = Teacher(teacher_model, runtime, offload=cfg.teacher_offload)
    return Pair(student_path, tokenizer, rules, student, teacher, Heads(runtime.lm_head(student), teacher.head, vocab_width))


def build_engine(cfg: TrainConfig, pair: Pair, runtime: Runtime):
    """The rollout engine named by rollout.engine, holding the student's initial weights: vLLM its own copy
    in the compute dtype (`model.dtype`); HF samples from the student itself under the runtime's autocast."""
    engine_cls = ENGINES.get(cfg.rollout.engine)
    if cfg.rollout.engine == "hf":  # several ranks: each generate steps until every rank is done (FSDP collectives)
        return engine_cls(runtime.unwrap(pair.student), pair.rules, autocast=runtime.autocast, synced=runtime.world_size > 1)
    return engine_cls(pair.student_path, cfg.rollout, pair.rules, dtype=cfg.model.dtype, seed=cfg.seed,
                      device=runtime.device.type)


def sample_rollouts(engine, tokenizer, problems: list[Problem], cfg: TrainConfig, *, seed: int,
                    runtime: Runtime, first: int = 0) -> tuple[list[str], Rollout]:
    """[1]-[2] The student samples `cfg.rollouts_per_prompt` responses per problem; returns the decoded
    responses (grouped by prompt, think markers kept for the checker) and the batch on the runtime's device.
    `first` is the index of the first response in the whole batch (a rank's share starts there): the
    engine seeds responses by that global index."""
    prompt_ids_P = [encode_prompt(tokenizer, p.prompt, cfg.model.chat_template_kwargs) for p in problems]
    responses_B = engine.generate(prompt_ids_P, cfg.rollouts_per_prompt, seed=seed, temperature=cfg.rollout.temperature,
                                  top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_completion_length,
                                  first=first)
    G = cfg.rollouts_per_prompt
    rollout = make_rollout(prompt_ids_P, responses_B, G, engine.rules)
    texts_B = [decode_response(tokenizer, prompt_ids_P[i // G], r) for i, r in enumerate(responses_B)]
    return texts_B, rollout.to(runtime.device)
