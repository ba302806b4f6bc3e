"""[1] Embedded task: route planning on a 5x5 grid with a required stop, forbidden cells and a move budget.

Cells are single letters, row by row from the bottom left:

    u v w x y      row 5
    p q r s t
    k l m n o
    f g h i j
    a b c d e      row 1

Moves: `>` = one column right, `<` = left, `+` = one row up, `-` = down. Prompt and reference plan:

    `go a,m,t no B,N max 8:` -> `>b#+f>g>h+m;>n#+r>s>t`

read as "go from a to t through m, never enter b or n, in at most 8 moves". Each move writes its
direction and the cell it reaches, so the state is always on the page; a tried move into a forbidden
cell is cancelled by `#` (the worked chain of thought: try, check, back off). Most tokens are
bookkeeping (the next cell, `;` when the stop is reached); the hard ones are `#` (is the cell just
written forbidden?), the direction after it and the turns: the structure token selection exploits.

Why this spelling: the prompt writes forbidden cells in capitals and moves are symbols, so a capital
letter means "forbidden" and nothing else: "is the cell I just wrote forbidden?" is then a one-token
lookup. With two-character coordinates (`c3`), or forbidden cells spelled like route cells, a
3-layer teacher learned everything but that check (it ignored the forbidden cells).

The reference plan is a greedy walk that, leg by leg (start -> stop, stop -> goal), tries a step
along the row toward the target's column first and, when that cell is forbidden (or the column is
right), steps toward the target's row. Problems where this walk gets stuck are never generated, so
every problem is solvable and `solution()` is a valid (and shortest) plan. The checker accepts any
plan, not only the reference one; cancelled (`#`) moves are not executed.

Constraints (each satisfied or not; the score is the satisfied fraction, 1.0 = a fully valid plan):
  legal   every move is one step in its stated direction from the previous cell, on the grid
  stop    the required stop is visited
  goal    the plan ends on the goal
  avoid   one constraint per forbidden cell: never entered
  budget  at most `max` moves
A response that does not parse as a `;`-separated sequence of moves with at least one executed move
scores 0.

`task.forbidden_cells` is the problem size: the number of forbidden cells (the held-out split is
spread evenly over it, as arithmetic spreads over operand lengths).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from tipdistill.errors import ConfigError
from tipdistill.tasks import Problem, TaskConfig

SIZE = 5  # grid side; cells a..y
MAX_MOVES = 12  # longest reference plan in executed moves (responses stay under 40 tokens)
MAX_SLACK = 2  # budget = shortest length + 0..MAX_SLACK
MAX_FORBIDDEN = 10  # largest task.forbidden_cells entry (prompts stay under 60 characters)
ON_ROUTE = 0.8  # chance that one forbidden cell is drawn on the unconstrained route (then it often matters)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIRS = {">": (1, 0), "<": (-1, 0), "+": (0, 1), "-": (0, -1)}

_MOVE_RE = re.compile(r"([<>+-])([a-z])(#?)")
_SEGMENT_RE = re.compile(r"(?:[<>+-][a-z]#?)*")

Cell = tuple[int, int]


def cell_name(c: Cell) -> str:
    """(column, row), both from 0, -> its letter."""
    return LETTERS[c[1] * SIZE + c[0]]


def parse_cell(s: str) -> Cell:
    """A letter -> (column, row); `z` (and any letter past the grid) lands off the grid."""
    i = LETTERS.index(s)
    return i % SIZE, i // SIZE


def on_grid(c: Cell) -> bool:
    return 0 <= c[0] < SIZE and 0 <= c[1] < SIZE


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def greedy_route(start: Cell, stop: Cell, goal: Cell, forbidden) -> list[list[tuple[str, Cell, bool]]] | None:
    """The reference plan as two legs of (direction, cell, rejected) steps, or None when the greedy
    walk gets stuck (the only move toward the target is forbidden): such problems are never generated.
    A rejected step is a tried column move into a forbidden cell, written and then cancelled with `#`."""
    blocked, legs, cur = set(forbidden), [], start
    for target in (stop, goal):
        leg = []
        while cur != target:
            dx, dy = _sign(target[0] - cur[0]), _sign(target[1] - cur[1])
            if dx:
                nxt = (cur[0] + dx, cur[1])
                leg.append((">" if dx > 0 else "<", nxt, nxt in blocked))
                if not leg[-1][2]:
                    cur = nxt
                    continue
            nxt = (cur[0], cur[1] + dy)
            if not dy or nxt in blocked:
                return None
            leg.append(("+" if dy > 0 else "-", nxt, False))
            cur = nxt
        legs.append(leg)
    return legs


def render(legs) -> str:
    return ";".join("".join(d + cell_name(c) + ("#" if rejected else "") for d, c, rejected in leg) for leg in legs)


def parse_plan(response: str) -> list[tuple[str, Cell]] | None:
    """The executed moves of a response (a move followed by `#` is cancelled), or None when it is
    not a `;`-separated sequence of moves with at least one executed move."""
    text = response.strip()
    if not text or not all(_SEGMENT_RE.fullmatch(seg) for seg in text.split(";")):
        return None
    moves = [(d, parse_cell(c)) for d, c, cancel in _MOVE_RE.findall(text) if not cancel]
    return moves or None


def check(meta: dict, response: str) -> dict[str, bool] | None:
    """Per-constraint outcome (`avoid <cell>` per forbidden cell), or None for an unparseable plan."""
    moves = parse_plan(response)
    if moves is None:
        return None
    start, stop, goal = (parse_cell(meta[k]) for k in ("start", "stop", "goal"))
    cells, prev, legal = [c for _, c in moves], start, True
    for d, c in moves:
        step = DIRS[d]
        legal &= on_grid(c) and c == (prev[0] + step[0], prev[1] + step[1])
        prev = c
    out = {"legal": legal, "stop": stop in cells, "goal": cells[-1] == goal}
    for x in meta["forbidden"]:
        out[f"avoid {x}"] = parse_cell(x) not in cells
    out["budget"] = len(moves) <= meta["budget"]
    return out


@dataclass
class PlanningConfig(TaskConfig):
    """`task=planning`: the problem sizes, as numbers of forbidden cells."""

    name: str = "planning"
    forbidden_cells: list[int] = field(default_factory=lambda: [1, 2, 3])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0 < k <= MAX_FORBIDDEN for k in self.forbidden_cells):
            raise ConfigError(f"task.forbidden_cells is the number of forbidden cells per planning problem, from 1 to {MAX_FORBIDDEN} "
                              f"(prompts stay under 60 characters); got {self.forbidden_cells}")


class PlanningTask:
    name = "planning"
    config = PlanningConfig

    def __init__(self, cfg: PlanningConfig):
        self.sizes = list(cfg.forbidden_cells)
        self._eval = self._held_out(cfg.eval_size, cfg.eval_seed)
        self._eval_keys = {self._key(p.meta) for p in self._eval}

    @staticmethod
    def _key(meta: dict) -> tuple:
        """Identity of an instance (the budget slack does not make a new one)."""
        return meta["start"], meta["stop"], meta["goal"], tuple(meta["forbidden"])

    def _draw(self, rng: random.Random, k: int) -> Problem:
        """A random solvable instance with k forbidden cells (rejection sampling, ~1-in-3 accepted)."""
        cells = [(x, y) for x in range(SIZE) for y in range(SIZE)]
        while True:
            start, stop, goal = rng.sample(cells, 3)
            rest = [c for c in cells if c not in (start, stop, goal)]
            forbidden = rng.sample(rest, k)
            if rng.random() < ON_ROUTE:  # put one forbidden cell on the unconstrained route, so it matters
                route = [c for leg in greedy_route(start, stop, goal, ()) for _, c, _ in leg if c in rest]
                if route:
                    forbidden[0] = rng.choice(route)
                    if len(set(forbidden)) < k:
                        continue
            legs = greedy_route(start, stop, goal, forbidden)
            if legs is None:
                continue
            n = sum(not rejected for leg in legs for _, _, rejected in leg)
            if n > MAX_MOVES:
                continue
            forbidden = sorted(cell_name(c) for c in forbidden)
            meta = {"start": cell_name(start), "stop": cell_name(stop), "goal": cell_name(goal),
                    "forbidden": forbidden, "budget": n + rng.randint(0, MAX_SLACK)}
            prompt = f"go {meta['start']},{meta['stop']},{meta['goal']} no {','.join(forbidden).upper()} max {meta['budget']}:"
            return Problem(prompt=prompt, answer=render(legs), meta=meta)

    def _held_out(self, size: int, seed: int) -> list[Problem]:
        """`size` distinct instances, spread evenly over the forbidden-cell counts, from a fixed seed."""
        rng, seen, out = random.Random(seed), set(), []
        for i in range(size):
            while True:
                p = self._draw(rng, self.sizes[i % len(self.sizes)])
                if self._key(p.meta) not in seen:
                    break
            seen.add(self._key(p.meta))
            out.append(p)
        return out

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self._draw(rng, rng.choice(self.sizes))
            if self._key(p.meta) not in self._eval_keys:
                out.append(p)
        return out

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, response: str) -> float:
        outcome = check(problem.meta, response)
        if outcome is None:
            return 0.0
        return sum(outcome.values()) / len(outcome)

    def solution(self, problem: Problem) -> str:
        return problem.answer
