"""[0] One source for every default: the typed schema. A YAML option file names the option and sets only
what differs from the schema, so a default cannot be written twice and drift (steps was 150 in the
schema and 200 in conf/train.yaml). conf/experiment/ is exempt: it pins the paper's settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from tipdistill.config import TrainConfig
from tipdistill.tasks import TASKS

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "task", "rollout", "selector", "loss", "optim", "logger")


def restated_defaults(values: dict, schema, prefix: str) -> list[str]:
    """Keys of `values` (a YAML mapping) that equal the schema's default; `name` (`engine` for rollout)
    names the option."""
    out = []
    for key, value in values.items():
        if key in ("defaults", "name", "engine"):
            continue
        assert hasattr(schema, key), f"{prefix}{key} is not in the schema"
        default = getattr(schema, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            out += restated_defaults(value, default, f"{prefix}{key}.")
        elif value == default and type(value) is type(default) or (isinstance(default, float) and value == default):
            out.append(f"{prefix}{key}")
    return out


def option_files() -> list[tuple[Path, object, str]]:
    files = [(CONF / "train.yaml", TrainConfig(), "")]
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            schema = TASKS.get(data["name"]).config() if group == "task" else getattr(TrainConfig(), group)
            files.append((path, schema, f"{group}."))
    return files


def test_no_option_file_restates_a_schema_default():
    files = option_files()
    assert len(files) > 25
    restated = {str(p.relative_to(CONF)): keys for p, schema, prefix in files
                if (keys := restated_defaults(yaml.safe_load(p.read_text()) or {}, schema, prefix))}
    assert restated == {}, f"defaults written twice (drop them from the YAML; the schema holds them): {restated}"


def test_the_checker_sees_a_restated_default():
    assert restated_defaults({"steps": 200, "seed": 5, "scoring": {"entropy_threshold": 0.1}}, TrainConfig(), "") == ["steps", "scoring.entropy_threshold"]


def test_composed_defaults_are_the_schemas():
    """The default composition adds nothing of its own: it validates to TrainConfig()."""
    from conftest import compose
    from tipdistill.config import validate

    assert validate(compose([])) == TrainConfig()
