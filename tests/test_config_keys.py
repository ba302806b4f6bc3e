"""Keys the typed schema does not know, and keys removed with `~`, are one-line errors after
composition (real Hydra composition of conf/train.yaml, as the CLI does it)."""

from pathlib import Path

import pytest

from conftest import CONF_DIR, TINY_PAIR, compose, load_config
from test_cli import cli


def _error(overrides: list[str]) -> str:
    from tipdistill.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, key, nearest", [
    ("+unknown_key=1", "unknown_key", None),
    ("+selector.kep=0.2", "selector.kep", "keep"),  # the typo: right name, wrong section
    ("+optim.lrr=1e-4", "optim.lrr", "optim.lr"),
    ("++rollout.temprature=0.7", "rollout.temprature", "rollout.temperature"),
    ("+model.embedded.student.layer=3", "model.embedded.student.layer", "model.embedded.student.layers"),
    ("+eval.sample=4", "eval.sample", "eval.samples"),
    ("+loger.mode=offline", "loger.mode", "logger.mode"),  # an unknown section: the whole path, not just 'loger'
])
def test_unknown_key_names_the_key_and_the_nearest_known_one(override, key, nearest):
    message = _error([override])
    assert f"unknown config key '{key}'" in message and "nearest known key is '" in message
    if nearest is not None:
        assert f"nearest known key is '{nearest}'" in message


@pytest.mark.parametrize("override, fix", [
    ("~keep", "set keep=<value>"),
    ("~selector", "pick an option instead (selector=<name>"),  # a config group: the schema would refill it silently
    ("~logger", "pick an option instead (logger=<name>"),
    ("~model.embedded", "set model.embedded=null to unset it"),
    ("~task.digits", "set task.digits=<value> instead"),  # a field of the chosen task's own config
    ("~scoring", "set single keys instead (scoring.<key>=<value>)"),
])
def test_removing_a_key_every_run_needs_is_an_error(override, fix):
    message = _error([override])
    assert f"{override} removes '{override[1:]}', which every run needs" in message and fix in message


def test_a_removed_key_is_caught_from_the_config_alone():
    """Called without the overrides (library use), the composed config still shows a removed key."""
    from tipdistill.config import ConfigError, validate

    with pytest.raises(ConfigError, match="~keep removes 'keep'"):
        validate(compose(["~keep"]))


def test_free_keys_of_dict_fields_are_accepted():
    overrides = ["+model.chat_template_kwargs.enable_thinking=false", "+model.chat_template_kwargs.custom.depth=2"]
    cfg = load_config(overrides)
    assert cfg.model.chat_template_kwargs == {"enable_thinking": False, "custom": {"depth": 2}}
    assert load_config(["+model.chat_template_kwargs.x=1", "~model.chat_template_kwargs.x"]).model.chat_template_kwargs == {}


def _options() -> list[str]:
    root = Path(CONF_DIR)
    return sorted(f"{d.name}={f.stem}" for d in root.iterdir() if d.is_dir() and d.name not in ("hydra", "local")
                  for f in d.glob("*.yaml"))


@pytest.mark.parametrize("option", _options())
def test_every_shipped_option_uses_only_known_keys(option):
    """No false alarms: every YAML under conf/ composes into keys the schema knows."""
    from tipdistill.bad_input import check_keys
    from omegaconf import OmegaConf

    from tipdistill.config import schema_for

    cfg = compose([option])
    assert check_keys(cfg, schema_for(OmegaConf.get_type(cfg, "task")), [option]) is None


@pytest.mark.integration
def test_unknown_key_through_the_cli_is_one_line_before_any_work(tmp_path):
    out = cli(["train", *TINY_PAIR, "+selector.kep=0.2"], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("tipdistill: error:")]
    assert "unknown config key 'selector.kep'" in line and "nearest known key is 'keep'" in line
    assert "Traceback" not in out.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no run directory content: it stopped before any work


@pytest.mark.parametrize("overrides, message", [
    (["optim=null"], "'optim=null': the config group optim takes an option name; fix: optim=<name>"),
    (["=1"], "'=1' has no key; fix: write key=value"),
    (["~"], "'~' deletes nothing"),
    (["selector=[]"], "selector=[] removes 'selector', which every run needs"),  # an empty option list removes the group
    (["model=qwen3_8b_to_4b", "model.embedded.student.layers=2"], "model.embedded.student.layers is set, but model.embedded is null"),
    (["+selector=full"], "'+selector=full' adds a second selector, but the config has one already; fix: choose it with selector=full"),
    (["+experiment=table_q3"], "fix: choose it with experiment=table_q3 (no +)"),
])
def test_hydra_errors_without_the_key_in_them_name_the_override(overrides, message):
    """Hydra's own words here ('Config group override must be a string or a list. Got NoneType',
    'Unexpected type: None') name neither the override nor the fix; found by the override fuzzer."""
    assert message in _error(overrides)


def test_removing_a_field_of_the_task_chosen_on_the_command_line_is_an_error():
    message = _error(["task=math500", "~task.path"])
    assert "~task.path removes 'task.path', which every run needs" in message and "set task.path=null" in message
