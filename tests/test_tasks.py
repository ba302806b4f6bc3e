import random

from tipdistill.tasks.arithmetic import ArithmeticConfig
from tipdistill.tasks import TASKS, build_task
from tipdistill.tasks.arithmetic import extract_answer, solve


def test_solution_format_and_carry():
    assert solve(43, 75) == "3+5=8;4+7=11;ANSWER 118"
    assert solve(876, 530) == "6+0=6;7+3=10;8+5+1=14;ANSWER 1406"


def test_checker_exact_match_after_last_answer():
    task = build_task(ArithmeticConfig())
    p = task.train_problems(random.Random(0), 1)[0]
    assert task.score(p, task.solution(p)) == 1.0
    assert task.score(p, f"ANSWER 1;ANSWER {p.answer}") == 1.0
    assert task.score(p, f"ANSWER {p.answer};ANSWER 1") == 0.0
    assert task.score(p, "no answer here") == 0.0
    assert task.score(p, f"ANSWER {int(p.answer) + 1}") == 0.0
    assert extract_answer("x;ANSWER 1406") == "1406"


def test_held_out_split_is_fixed_and_excluded_from_training():
    a, b = build_task(ArithmeticConfig()), build_task(ArithmeticConfig())
    assert [p.prompt for p in a.eval_problems()] == [p.prompt for p in b.eval_problems()]
    assert len({p.prompt for p in a.eval_problems()}) == 300
    held = {p.prompt for p in a.eval_problems()}
    train = a.train_problems(random.Random(1), 5000)
    assert not held & {p.prompt for p in train}
    assert {len(p.meta and str(p.meta["a"])) for p in a.eval_problems()} == {2, 3, 4}


def test_registry_lists_valid_names():
    import pytest

    from tipdistill.config import ConfigError

    from conftest import compose
    from tipdistill.config import validate

    with pytest.raises(ConfigError, match=r"unknown task 'nope'; valid: (\w+, )*arithmetic"):
        validate(compose(["task.name=nope"]))
    with pytest.raises(LookupError, match="set task.name="):
        TASKS.get("nope")


def test_saved_embedded_tokenizer_round_trips_through_autotokenizer(tmp_path):
    """The embedded pair loads through AutoTokenizer like a hub model; spaces and digits must survive."""
    from transformers import AutoTokenizer

    from tipdistill.config import NetConfig
    from tipdistill.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    build_model(NetConfig(layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64), tok, 64).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "3+5=8;4+7=11;ANSWER 118"
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False) and len(ids) == len(text)
    assert loaded.decode(ids) == text
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1 and loaded.padding_side == "left"


def test_each_task_owns_its_config_fields():
    import pytest
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from conftest import compose, compose_many
    from tipdistill.config import validate
    from tipdistill.errors import ConfigError

    names = list(TASKS)
    cfgs = compose_many([[f"task={name}"] for name in names] + [["task=planning", "task.forbidden_cells=[2]"]])
    for name, cfg in zip(names, cfgs):  # every task's YAML composes into that task's own schema
        task_cfg = OmegaConf.to_object(cfg.task)
        assert type(task_cfg) is TASKS.get(name).config and task_cfg.name == name
    assert OmegaConf.to_object(cfgs[-1].task).forbidden_cells == [2]
    for overrides in (["task=planning", "task.digits=[2]"], ["task.forbidden_cells=[2]"], ["task.path=x.jsonl"]):
        with pytest.raises(ConfigCompositionException, match="Could not override"):
            compose(overrides)
    with pytest.raises(ConfigError, match="fix: choose the task with task=planning"):
        validate(compose(["task.name=planning"]))  # arithmetic's fields under planning's name


def test_embedded_cache_keys_survive_the_per_task_configs():
    """Users' prepared pairs stay valid: the keys of the default pairs are those of the flat config."""
    from conftest import compose
    from tipdistill.config import validate
    from tipdistill.embedded import pair_dir

    keys = {}
    for overrides in ([], ["task=planning"], ["model=embedded_wide"]):
        cfg = validate(compose(overrides))
        keys[tuple(overrides)] = pair_dir(cfg.model.embedded, cfg.task, cfg.rollout.max_completion_length).name
    assert keys == {(): "embedded-arithmetic-04bbe254ec44", ("task=planning",): "embedded-planning-70e7fba6dc4e",
                    ("model=embedded_wide",): "embedded-arithmetic-771a52f2399e"}
