"""The planning task: every generated problem is solvable by its reference plan, the checker scores the
exact fraction of satisfied constraints, garbage scores 0, and the held-out split is fixed and unseen."""

import ast
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tipdistill
from conftest import compose
from tipdistill.errors import ConfigError
from tipdistill.tasks import Problem, build_task
from tipdistill.tasks.planning import PlanningConfig, cell_name, check, greedy_route, parse_cell, render


def _charset() -> str:
    """tipdistill.embedded.CHARSET, read without importing torch (keeps this file a few seconds)."""
    tree = ast.parse((Path(tipdistill.__file__).parent / "embedded.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHARSET":
            return "".join(ast.literal_eval(part) for part in ast.unparse(node.value).split(" + "))
    raise AssertionError("CHARSET not found in tipdistill/embedded.py")


CHARSET = _charset()


def planning(**kw) -> object:
    return build_task(PlanningConfig(**kw))


# a -> m -> t, never b or n, at most 8 moves: 6 constraints (legal, stop, goal, 2 x avoid, budget)
#   u v w x y
#   p q r s t
#   k l m n o
#   f g h i j
#   a b c d e
META = {"start": "a", "stop": "m", "goal": "t", "forbidden": ["b", "n"], "budget": 8}
PROBLEM = Problem(prompt="go a,m,t no B,N max 8:", answer=">b#+f>g>h+m;>n#+r>s>t", meta=META)


def test_reference_plan_of_a_hand_made_problem():
    legs = greedy_route(parse_cell("a"), parse_cell("m"), parse_cell("t"), [parse_cell("b"), parse_cell("n")])
    assert render(legs) == PROBLEM.answer
    assert [cell_name((x, y)) for y in range(5) for x in range(5)] == list("abcdefghijklmnopqrstuvwxy")
    assert planning().score(PROBLEM, PROBLEM.answer) == 1.0


def test_every_generated_problem_is_solvable_and_compact():
    task, charset = planning(), set(CHARSET)
    for seed in range(40):
        for p in task.train_problems(random.Random(seed), 50):  # 2000 problems
            ref = task.solution(p)
            assert task.score(p, ref) == 1.0, (p.prompt, ref)
            assert all(check(p.meta, ref).values())
            assert len(p.prompt) < 60 and len(ref) < 60
            assert set(p.prompt) <= charset and set(ref) <= charset
            assert len(ref.replace(";", "")) - 3 * ref.count("#") <= 2 * p.meta["budget"]  # executed moves
            assert len(p.meta["forbidden"]) in (1, 2, 3)
            assert p.prompt == f"go {p.meta['start']},{p.meta['stop']},{p.meta['goal']} no {','.join(p.meta['forbidden']).upper()} max {p.meta['budget']}:"


def test_forbidden_cells_matter_in_most_problems():
    task = planning()
    ps = task.train_problems(random.Random(0), 500)
    altered = 0
    for p in ps:
        free = greedy_route(*(parse_cell(p.meta[k]) for k in ("start", "stop", "goal")), ())
        altered += render(free) != p.answer
        assert (render(free) != p.answer) == ("#" in p.answer)
    assert altered / len(ps) > 0.5  # a model that ignores them cannot reach high accuracy


@pytest.mark.parametrize(
    "plan, expected, broken",
    [
        (">b#+f>g>h+m;>n#+r>s>t", 6 / 6, []),
        ("+f>g>h+m;+r>s>t", 6 / 6, []),  # tried-and-cancelled moves and the `;` marker are optional
        ("+f>g>h+m+r>s>t", 6 / 6, []),
        (">b#>b#+f>g>h+m;+d#>n#+r>s>t", 6 / 6, []),  # cancelled moves are never executed, legal or not
        (">b+f>g>h+m;+r>s>t", 4 / 6, ["legal", "avoid b"]),  # no `#`: the move into b is executed
        (">b>c+h+m;+r>s>t", 5 / 6, ["avoid b"]),
        (">b>c+h+m;>n+s>t", 4 / 6, ["avoid b", "avoid n"]),
        ("+f+k+p>q>r>s>t", 5 / 6, ["stop"]),
        ("+f>g>h+m", 5 / 6, ["goal"]),
        ("+f>g>h+m;+r>s+t", 5 / 6, ["legal"]),  # `+` (up) from s is y, not t
        ("+m;>t", 5 / 6, ["legal"]),  # teleports
        ("+f>g>h+m;+r>s>t+z", 4 / 6, ["legal", "goal"]),  # z is off the grid
        ("<e<d<c<b+g>h+m;+r>s>t", 3 / 6, ["legal", "avoid b", "budget"]),  # wraps around a row edge; 10 moves
        ("+f>g>h+m;+r+w>x>y-t", 5 / 6, ["budget"]),  # a legal detour of 9 moves
        ("+f", 4 / 6, ["stop", "goal"]),
    ],
)
def test_each_constraint_type_is_scored_exactly(plan, expected, broken):
    outcome = check(META, plan)
    assert sorted(k for k, ok in outcome.items() if not ok) == sorted(broken)
    assert planning().score(PROBLEM, plan) == pytest.approx(expected)


@pytest.mark.parametrize("garbage", ["", "   ", ";", ";;", "hello", "ANSWER 12", ">b#", ">b#;>n#", "#+f", "+f##", ">b#;#", "+f>gx", "+f >g", "+F", "f+", "+", "+1", "+a2", "3+5=8", "Uf"])
def test_garbage_scores_zero(garbage):
    assert check(META, garbage) is None
    assert planning().score(PROBLEM, garbage) == 0.0


def test_held_out_split_is_fixed_and_excluded_from_training():
    a, b = planning(), planning()
    assert [p.prompt for p in a.eval_problems()] == [p.prompt for p in b.eval_problems()]
    held = a.eval_problems()
    keys = {(p.meta["start"], p.meta["stop"], p.meta["goal"], tuple(p.meta["forbidden"])) for p in held}
    assert len(held) == 300 and len(keys) == 300
    assert [sum(len(p.meta["forbidden"]) == k for p in held) for k in (1, 2, 3)] == [100, 100, 100]
    for p in a.train_problems(random.Random(1), 5000):
        assert (p.meta["start"], p.meta["stop"], p.meta["goal"], tuple(p.meta["forbidden"])) not in keys
    other = planning(eval_seed=8)
    assert [p.prompt for p in other.eval_problems()] != [p.prompt for p in held]


def test_problem_size_comes_from_task_forbidden_cells():
    task = planning(forbidden_cells=[5], eval_size=20)
    assert {len(p.meta["forbidden"]) for p in task.eval_problems() + task.train_problems(random.Random(0), 50)} == {5}
    for bad in ([11], [0]):
        with pytest.raises(ConfigError, match="task.forbidden_cells is the number of forbidden cells"):
            planning(forbidden_cells=bad)


def test_hydra_task_group_builds_the_planning_task():
    cfg = compose(["task=planning"])  # the typed task node only: full validation would import torch
    task_cfg = OmegaConf.to_object(cfg.task)
    assert isinstance(task_cfg, PlanningConfig) and task_cfg.name == "planning" and task_cfg.forbidden_cells == [1, 2, 3]
    task = build_task(task_cfg)
    assert len(task.eval_problems()) == task_cfg.eval_size
    assert max(len(task.solution(p)) for p in task.eval_problems()) + 1 <= cfg.rollout.max_completion_length
