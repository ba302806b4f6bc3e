"""[1] Tasks: where prompts come from and how a response is scored.

A task yields `Problem`s (a prompt and what the checker needs) for training and a fixed held-out
split for evaluation, and scores a decoded response in [0, 1] (1.0 = fully correct).

Each task owns its config fields: a `TaskConfig` subclass named by the task class's `config`
attribute, registered with Hydra as the schema `<name>_schema` that conf/task/<name>.yaml starts from.
Adding a task is one class (and its config) plus a registry entry and a YAML file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from tipdistill.errors import ConfigError
from tipdistill.registry import Registry

TASKS = Registry("task", "task.name")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class TaskConfig:
    """[1] The fields every task has; a task adds its own in a subclass."""

    name: str = "arithmetic"
    eval_size: int = 300  # held-out problems, excluded from every training stream
    eval_seed: int = 7

    def __post_init__(self) -> None:
        if self.eval_size <= 0:
            raise ConfigError(f"task.eval_size must be > 0, got {self.eval_size}")


class Task(Protocol):
    name: str
    config: ClassVar[type[TaskConfig]]  # its config schema

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        """n fresh training problems, never from the held-out split."""

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out split."""

    def score(self, problem: Problem, response: str) -> float:
        """Score of a decoded response (text cut at EOS) in [0, 1]; 1.0 means correct."""

    def solution(self, problem: Problem) -> str:
        """A reference response (used to pre-train the embedded pair)."""


def build_task(cfg: TaskConfig) -> Task:
    """Instantiate the task named by `cfg.name` from its config (an instance of that task's `config`)."""
    return TASKS.get(cfg.name)(cfg)


# Registered implementations (imported lazily by name).
TASKS["arithmetic"] = "tipdistill.tasks.arithmetic:ArithmeticTask"
TASKS["math500"] = "tipdistill.tasks.math:MathTask"
TASKS["aime24"] = "tipdistill.tasks.math:MathTask"
TASKS["aime25"] = "tipdistill.tasks.math:MathTask"
TASKS["gsm8k"] = "tipdistill.tasks.math:MathTask"
TASKS["dapo_math"] = "tipdistill.tasks.math:MathTask"
TASKS["planning"] = "tipdistill.tasks.planning:PlanningTask"


def encode_prompt(tokenizer, prompt: str, chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids, rendered the same way for teacher and student: the chat template when the
    tokenizer has one (chat models must never see a raw-encoded prompt), else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                            **(chat_template_kwargs or {}))
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt, add_special_tokens=False)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _token_id(tokenizer, token: str):
    i = tokenizer.convert_tokens_to_ids(token)
    return i if i is not None and tokenizer.convert_ids_to_tokens(i) == token else None


def decode_response(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> str:
    """The response text a checker scores: special tokens dropped except the think markers (so a checker
    can tell thinking from the answer even where a tokenizer marks them special), with `<think>` in front
    when the chat template itself opened the think block (R1-style templates end the prompt in `<think>`)."""
    open_id, close_id = _token_id(tokenizer, THINK_OPEN), _token_id(tokenizer, THINK_CLOSE)
    drop = set(tokenizer.all_special_ids) - {open_id, close_id}
    text = tokenizer.decode([t for t in response_ids if t not in drop])
    if open_id is not None and open_id in prompt_ids:
        last_open = len(prompt_ids) - 1 - prompt_ids[::-1].index(open_id)
        if close_id not in prompt_ids[last_open:]:
            text = THINK_OPEN + text
    return text
