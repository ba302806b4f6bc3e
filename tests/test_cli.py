"""The installed console script, run as a user would: from another working directory, through Hydra."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PAIR, TINY_RUN

EXE = str(Path(sys.executable).with_name("tipdistill"))
pytestmark = pytest.mark.integration  # every test here runs the console script


def cli(args, cwd, timeout=600):
    return subprocess.run([EXE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config_resolved.yaml"))


def test_help_and_cfg_from_another_directory(tmp_path):
    out = cli(["train", "--help"], tmp_path)
    assert out.returncode == 0 and "tipdistill train: on-policy distillation" in out.stdout
    assert "selector: divergence, entropy, entropy_topk, full, q3, random, type_aware" in out.stdout
    out = cli(["train", "selector=type_aware", "keep=0.2", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["selector"]["name"] == "type_aware" and cfg["keep"] == 0.2 and cfg["loss"]["name"] == "reverse_kl"


@pytest.mark.parametrize("args, message", [
    (["keep=1.5"], "keep must be in (0, 1]"),
    (["selector.name=nope"], "unknown selector 'nope'; valid:"),
    (["loss.name=kl"], "unknown loss 'kl'; valid: forward_kl, jsd, reverse_kl"),
    (["steps=0"], "steps must be > 0"),
    (["model.student=/does/not/exist"], "student model path '/does/not/exist' does not exist"),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_pair, args, message):
    out = cli(["train", *TINY_PAIR, *args], tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("tipdistill: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))  # nothing trained, nothing half-written


@pytest.mark.parametrize("args, message", [
    (["selector=nope"], "no option 'nope' in config group 'selector'; valid: divergence, entropy"),
    (["keep=abc"], "keep=abc: Value 'abc' of type 'str' could not be converted to Float; fix: keep takes a number"),
    (["keep=${broken"], "cannot parse the override 'keep=${broken'"),
    (["rollout.temprature=0.5"], "unknown config key 'rollout.temprature'; the nearest known key is 'rollout.temperature'"),
    (["~selector.name"], "~selector.name removes 'selector.name', which every run needs"),
])
@pytest.mark.integration
def test_composition_errors_are_one_line_too(tmp_path, args, message):
    """Hydra's own errors (several lines, exit 1) reach the user as one line and exit code 2."""
    out = cli(["train", *args], tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.splitlines() == [f"tipdistill: error: {out.stderr.splitlines()[0].split('error: ', 1)[1]}"]
    assert message in out.stderr and "HYDRA_FULL_ERROR" not in out.stderr


def test_vocab_mismatch_is_one_clear_line(tmp_path, tiny_pair):
    from transformers import AutoTokenizer

    student, teacher, _ = tiny_pair
    other = tmp_path / "teacher_other_vocab"
    shutil.copytree(teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["@@"])
    tok.save_pretrained(other)
    out = cli(["train", *TINY_PAIR, f"model.teacher={other}"], tmp_path)
    assert out.returncode == 2 and "teacher and student vocabularies differ" in out.stderr


def test_end_to_end_vllm_run_writes_every_output(tmp_path, tiny_pair):
    out = cli(["train", *TINY_PAIR, *TINY_RUN, "selector=type_aware", "keep=0.5", "scoring.token_dump_every=1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "outputs")
    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert cfg["rollout"]["engine"] == "vllm" and cfg["selector"]["name"] == "type_aware"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        for key in ("train/loss", "train/response_tokens", "train/kept_tokens", "time/rollout_s", "time/weight_sync_s",
                    "time/teacher_s", "time/update_s", "time/step_s", "eval/accuracy", "eval/accuracy_greedy",
                    "select/keep_frac", "mem/update_peak_gib", "select/quadrant_frac/q3"):
            assert key in m, key
        assert 0 < m["train/kept_tokens"] < m["train/response_tokens"]
        assert m["train/loss"] == m["train/loss"] and m["train/loss"] >= 0  # finite, non-negative
    summary = json.loads((run / "summary.json").read_text())
    for key in ("eval/accuracy_start", "eval/accuracy_end", "eval/accuracy_greedy_start", "eval/accuracy_greedy_end",
                "eval/score_start", "eval/score_end", "steps", "wall_s"):
        assert key in summary
    assert summary["steps"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert list((run / "tables").glob("tokens_step*.parquet"))


def test_multirun_gives_one_directory_per_job(tmp_path, tiny_pair):
    # two vLLM engines in one process (Hydra's basic launcher runs jobs in-process): the second must not fail
    out = cli(["train", "-m", *TINY_PAIR, *TINY_RUN, "steps=1", "selector=full,type_aware", "keep=0.5",
               f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    dirs = run_dirs(tmp_path / "sweep")
    assert len(dirs) == 2 and dirs[0].name.startswith("0_") and dirs[1].name.startswith("1_")
    for d, selector in zip(dirs, ["full", "type_aware"]):
        assert f"selector={selector}" in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        assert (d / "summary.json").exists()
    keep = [json.loads((d / "metrics.jsonl").read_text().splitlines()[1])["select/keep_frac"] for d in dirs]
    assert keep[0] == 1.0 and keep[1] < 0.75  # full ignores keep; type_aware keeps about half
