"""[7] sinks: local files, a real offline W&B run read back from its .wandb file, failure paths, probes."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import pytest

from tipdistill.config import ConfigError, LoggerConfig
from tipdistill.sinks import SINKS, StepTimer, UpdateMemoryProbe, open_sink, resolve_wandb_mode, run_name_from_overrides
from tipdistill.sinks import wandb_records as _wandb_records

CONFIG = {"keep": 0.2, "seed": 1, "selector": {"name": "type_aware"}, "optim": {"lr": 0.0003}}


# ---------------------------------------------------------------- reading an offline run back


def read_offline_run(run_dir: Path) -> dict:
    """history rows, summary, config and run-level fields of the one offline run under run_dir."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # run.finish() can return before wandb-core's buffered writer reaches the file: wait for `exit`
    deadline = time.monotonic() + 20
    while not any(r.HasField("exit") for r in _wandb_records(files[0])) and time.monotonic() < deadline:
        time.sleep(0.05)
    out = {"history": [], "summary": {}, "config": {}, "metrics": [], "exit_code": None, "run": None}

    def merge(into: dict, items) -> dict:
        for item in items:  # a key is either `key` or a path `nested_key` (tables: one leaf per field)
            path = [item.key] if item.key else list(item.nested_key)
            node = into
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        return into

    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(merge({}, r.history.item))
        elif kind == "summary":
            merge(out["summary"], r.summary.update)
        elif kind == "run":
            out["run"] = r.run
            merge(out["config"], r.run.config.update)
        elif kind == "config":
            merge(out["config"], r.config.update)
        elif kind == "metric":
            out["metrics"].append(r.metric)
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


@pytest.fixture(scope="module")
def hermetic_wandb(tmp_path_factory):
    """All W&B state under tmp, no key, no login: mode=None must resolve to offline."""
    root = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(root / var.lower()))
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_GROUP", "WANDB_PROJECT", "WANDB_ENTITY"):
            mp.delenv(var, raising=False)
        mp.setenv("NETRC", str(root / "no_netrc"))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        yield root
        import wandb

        wandb.teardown()


WANDB = LoggerConfig(name="wandb", mode=None, project="tipdistill-test", tags=["t1"])


# ---------------------------------------------------------------- local files


def test_local_files(tmp_path: Path):
    with open_sink(LoggerConfig(), tmp_path / "run", run_name="r", group=None, config=CONFIG) as sink:
        for step in (1, 2, 3):
            sink.log({"step": step, "train/loss": 1.0 / step, "rollout/sample": "12+3=15"})
            assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == step  # flushed per line
        path = sink.log_table("rollout/tokens", pd.DataFrame({"pos": range(5), "h": [0.1] * 5}))
        sink.summary({"eval/accuracy_start": 0.1})
        sink.summary({"eval/accuracy_end": 0.4, "steps": 3})
        with pytest.raises(ValueError, match="integer 'step'"):
            sink.log({"train/loss": 1.0})
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["train/loss"] == 0.5
    assert json.loads((run / "summary.json").read_text()) == {"eval/accuracy_start": 0.1, "eval/accuracy_end": 0.4, "steps": 3}
    assert path == run / "tables" / "rollout_tokens_step3.parquet" and len(pd.read_parquet(path)) == 5
    assert not list(run.glob(".summary.*"))  # no temp file left behind
    assert not (run / "wandb").exists()

    with open_sink(LoggerConfig(), run, run_name="r", group=None, config=CONFIG, resume=True) as sink:
        sink.log({"step": 4, "train/loss": 0.2})
        sink.summary({"steps": 4})
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((run / "summary.json").read_text())["eval/accuracy_start"] == 0.1


def test_unknown_logger_name():
    from conftest import compose
    from tipdistill.config import validate

    with pytest.raises(ConfigError, match=r"unknown logger 'tensorboard'; valid: none, wandb \(set logger.name="):
        validate(compose(["logger.name=tensorboard"]))
    with pytest.raises(LookupError, match="valid: none, wandb"):
        SINKS.get("tensorboard")


# ---------------------------------------------------------------- a real offline W&B run


@pytest.mark.integration  # real offline W&B runs (a service process each)
def test_wandb_offline_roundtrip(hermetic_wandb, tmp_path: Path):
    run_dir = tmp_path / "job0"
    with open_sink(WANDB, run_dir, run_name="type_aware-keep0.2-seed1", group="sweep1", config=CONFIG) as sink:
        for step in (1, 2, 3):
            sink.log({"step": step, "train/loss": 1.0 / step, "select/keep_frac": 0.2, "time/step_s": 0.1})
        sink.log({"step": 3, "eval/accuracy": 0.5})  # same step again: must not be dropped (P12)
        sink.log_table("rollouts", pd.DataFrame({"pos": range(5000), "h": [0.5] * 5000}))
        sink.summary({"eval/accuracy_end": 0.5, "wall_s": 12.0})

    got = read_offline_run(run_dir)
    history = got["history"]
    scalars = [h for h in history if "train/loss" in h or "eval/accuracy" in h]
    assert [h["train/step"] for h in scalars] == [1, 2, 3, 3]
    assert [h.get("train/loss") for h in scalars[:3]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert scalars[3]["eval/accuracy"] == 0.5
    assert all("step" not in h for h in history)  # the step lives in train/step only
    table_rows = [h for h in history if "tables/rollouts" in h]
    assert len(table_rows) == 1 and table_rows[0]["train/step"] == 3
    assert table_rows[0]["tables/rollouts"]["nrows"] == 2000
    table_json = next(run_dir.glob("wandb/offline-run-*/files/media/table/**/*.table.json"))
    assert len(json.loads(table_json.read_text())["data"]) == 2000  # cut for W&B (P13) ...
    assert len(pd.read_parquet(run_dir / "tables" / "rollouts_step3.parquet")) == 5000  # ... not locally

    assert got["summary"]["eval/accuracy_end"] == 0.5 and got["summary"]["wall_s"] == 12.0
    assert got["config"]["keep"] == 0.2 and got["config"]["selector"] == {"name": "type_aware"}
    assert got["config"]["optim"] == {"lr": 0.0003}
    run = got["run"]
    assert (run.display_name, run.run_group, run.job_type, run.project) == ("type_aware-keep0.2-seed1", "sweep1", "train", "tipdistill-test")
    assert list(run.tags) == ["t1"]
    globs = {m.glob_name: m for m in got["metrics"] if m.glob_name}
    assert {"train/*", "select/*", "time/*", "eval/*"} <= set(globs)
    assert all(m.step_metric == "train/step" for m in globs.values())
    assert globs["eval/*"].summary.max
    assert got["exit_code"] == 0


@pytest.mark.integration
def test_two_jobs_in_one_process_are_two_runs(hermetic_wandb, tmp_path: Path):
    import wandb

    with open_sink(WANDB, tmp_path / "a", run_name="a", group="g", config={"seed": 0}) as sink:
        sink.log({"step": 1, "train/loss": 1.0})
    leaked = open_sink(WANDB, tmp_path / "b", run_name="b", group="g", config={"seed": 1})  # never closed
    leaked.log({"step": 1, "train/loss": 2.0})
    with open_sink(WANDB, tmp_path / "c", run_name="c", group="g", config={"seed": 2}) as sink:
        assert wandb.run is not None and wandb.run.name == "c"  # reinit="finish_previous" finished b
        sink.log({"step": 1, "train/loss": 3.0})
    leaked.close()  # a no-op on W&B's side now, must not raise
    runs = [read_offline_run(tmp_path / d) for d in "abc"]
    assert len({r["run"].run_id for r in runs}) == 3
    assert [r["config"]["seed"] for r in runs] == [0, 1, 2]
    assert [[h["train/loss"] for h in r["history"]] for r in runs] == [[1.0], [2.0], [3.0]]


@pytest.mark.integration
def test_exception_inside_with_finishes_the_run(hermetic_wandb, tmp_path: Path):
    import wandb

    with pytest.raises(RuntimeError, match="boom"):
        with open_sink(WANDB, tmp_path / "x", run_name="x", group=None, config={}) as sink:
            sink.log({"step": 1, "train/loss": 1.0})
            raise RuntimeError("boom")
    assert wandb.run is None and sink._jsonl.closed
    assert read_offline_run(tmp_path / "x")["exit_code"] == 1


def test_failing_wandb_init_warns_once_and_keeps_local_files(hermetic_wandb, tmp_path: Path, monkeypatch, caplog):
    import wandb

    def refuse(*args, **kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    with caplog.at_level(logging.WARNING, logger="tipdistill.sinks"):
        with open_sink(WANDB, tmp_path / "y", run_name="y", group=None, config={}) as sink:
            sink.log({"step": 1, "train/loss": 1.0})
            sink.log_table("t", pd.DataFrame({"a": [1]}))
            sink.summary({"eval/accuracy_end": 0.3})
    warnings = [r for r in caplog.records if r.name == "tipdistill.sinks"]
    assert len(warnings) == 1 and "CommError" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert json.loads((tmp_path / "y" / "summary.json").read_text()) == {"eval/accuracy_end": 0.3}
    assert (tmp_path / "y" / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.integration
def test_failing_wandb_log_midrun_degrades_to_local(hermetic_wandb, tmp_path: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="tipdistill.sinks"):
        with open_sink(WANDB, tmp_path / "z", run_name="z", group=None, config={}) as sink:
            sink.log({"step": 1, "train/loss": 1.0})

            def quota(*args, **kwargs):
                raise RuntimeError("quota exceeded")

            sink.extra.run.log = quota
            for step in (2, 3):
                sink.log({"step": step, "train/loss": 1.0})
            sink.summary({"eval/accuracy_end": 0.3})
    assert len([r for r in caplog.records if r.name == "tipdistill.sinks"]) == 1
    assert (tmp_path / "z" / "metrics.jsonl").read_text().count("\n") == 3
    got = read_offline_run(tmp_path / "z")
    assert got["exit_code"] == 0 and [h["train/step"] for h in got["history"]] == [1]  # finished, not leaked


def test_config_must_be_a_plain_dict(tmp_path: Path):
    from omegaconf import OmegaConf

    with pytest.raises(TypeError, match="to_plain"):
        open_sink(LoggerConfig(), tmp_path, run_name="r", group=None, config=OmegaConf.create({"a": "${b}", "b": 1}))


def test_wandb_mode_never_waits_for_a_login(tmp_path: Path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode(None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert resolve_wandb_mode(None) == "online"  # `wandb login` stored a key
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # logger.mode wins


# ---------------------------------------------------------------- run names, timer, memory


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["selector=type_aware", "keep=0.2", "seed=1"], "type_aware-keep0.2-seed1"),
        ([], "default"),
        (["logger=wandb", "logger.mode=offline", "model.student=Qwen/Qwen3-4B", "keep=0.5"], "keep0.5"),
        (["+experiment=table5", "loss.beta=0.3", "task.digits=[2,3]"], "table5-beta0.3-digits_2_3"),
        (["selector.name=entropy", "task.path=/data/x.jsonl", "hydra.job.chdir=true"], "entropy"),
        (["model=hf/Qwen 3"], "hf_Qwen_3"),
    ],
)
def test_run_name_from_overrides(overrides, name):
    assert run_name_from_overrides(overrides) == name


def test_step_timer():
    timer = StepTimer()
    with timer("rollout"):
        time.sleep(0.03)
    with timer("update"):
        time.sleep(0.01)
    with timer("update"):  # accumulates (micro-batches)
        time.sleep(0.01)
    with pytest.raises(KeyError):
        with timer("select"):
            raise KeyError("recorded anyway")
    m = timer.pop()
    assert set(m) == {"time/rollout_s", "time/update_s", "time/select_s"}
    assert m["time/rollout_s"] >= 0.03 and m["time/update_s"] >= 0.02
    assert timer.pop() == {}
    grouped = StepTimer(groups={"backward": "update", "statistics": "select"})  # update.PHASES folds this way
    for phase in ("backward", "statistics", "rollout"):
        with grouped(phase):
            time.sleep(0.01)
    assert set(grouped.pop()) == {"time/update_s", "time/select_s", "time/rollout_s"}


def test_memory_probe_sees_a_200mb_region():
    import torch

    with UpdateMemoryProbe("cpu") as big:
        x = torch.ones(50_000_000)  # 200 MB, touched
        x.add_(1.0)
        time.sleep(0.01)  # lets the sampler run even on a loaded 2-core CI box
        del x  # freed inside the region: only the sampler can have seen it
    with UpdateMemoryProbe("cpu") as tiny:
        y = torch.ones(1000)
        del y
    assert big.metrics["mem/update_peak_gib"] >= 0.15
    assert tiny.metrics["mem/update_peak_gib"] < 0.03
    assert set(big.metrics) == {"mem/update_peak_gib"}
