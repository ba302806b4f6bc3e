"""[1] Embedded task: multi-digit addition with a chain-of-thought written digit by digit.

`Q:876+530=?A:` -> `6+0=6;7+3=10;8+5+1=14;ANSWER 1406`. Most tokens (`+`, `=`, `;`) are trivially
predictable and a few (sum and answer digits) are hard: the structure token selection exploits.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from tipdistill.errors import ConfigError
from tipdistill.tasks import Problem, TaskConfig

_ANSWER_RE = re.compile(r"ANSWER (-?\d+)")


def solve(a: int, b: int) -> str:
    """Worked solution from the least to the most significant digit; a carry is written as `+1`."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return ";".join(steps) + f";ANSWER {a + b}"


def extract_answer(response: str) -> str | None:
    """The number after the last `ANSWER `, or None."""
    found = _ANSWER_RE.findall(response)
    return found[-1] if found else None


@dataclass
class ArithmeticConfig(TaskConfig):
    """`task=arithmetic`: the operand lengths (the held-out split is spread evenly over them)."""

    name: str = "arithmetic"
    digits: list[int] = field(default_factory=lambda: [2, 3, 4])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (len(self.digits) > 0 and all(d > 0 for d in self.digits)):
            raise ConfigError(f"task.digits must be a non-empty list of positive integers, got {self.digits}")


class ArithmeticTask:
    name = "arithmetic"
    config = ArithmeticConfig

    def __init__(self, cfg):
        self.digits = list(cfg.digits)
        self._eval = self._held_out(cfg.eval_size, cfg.eval_seed)
        self._eval_keys = {(p.meta["a"], p.meta["b"]) for p in self._eval}

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(prompt=f"Q:{a}+{b}=?A:", answer=str(a + b), meta={"a": a, "b": b})

    def _draw(self, rng: random.Random) -> tuple[int, int]:
        n = rng.choice(self.digits)
        lo, hi = 10 ** (n - 1), 10**n - 1
        return rng.randint(lo, hi), rng.randint(lo, hi)

    def _held_out(self, size: int, seed: int) -> list[Problem]:
        """`size` distinct problems, spread evenly over the digit counts, from a fixed seed."""
        rng, seen, out = random.Random(seed), set(), []
        for i in range(size):
            n = self.digits[i % len(self.digits)]
            lo, hi = 10 ** (n - 1), 10**n - 1
            while True:
                a, b = rng.randint(lo, hi), rng.randint(lo, hi)
                if (a, b) not in seen:
                    break
            seen.add((a, b))
            out.append(self._problem(a, b))
        return out

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            a, b = self._draw(rng)
            if (a, b) not in self._eval_keys:
                out.append(self._problem(a, b))
        return out

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, response: str) -> float:
        return float(extract_answer(response) == problem.answer)

    def solution(self, problem: Problem) -> str:
        return solve(problem.meta["a"], problem.meta["b"])
