"""Verdicts on the paper's claims from hand-made run directories whose differences are chosen to land on
each verdict, and the results file they are written into."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_report import make_run
from tipdistill.evidence import claim_rows, claim_verdicts, random_controls
from tipdistill.report import load_report
from tipdistill.report_cmd import main_report
from tipdistill.stats import CONTRADICTED, NO_DATA, NOT_CONTRADICTED, SUPPORTED

T975_2 = 4.3027  # Student-t table, two-sided 95%, 2 degrees of freedom
FULL = [0.60, 0.70, 0.80]  # arithmetic `full`, seeds 0-2


def runs_with(root: Path, task: str, selector: str, keep: float, accs: list[float], first_seed: int = 0) -> None:
    ones = [1.0] * 3
    for i, acc in enumerate(accs):
        seed = first_seed + i
        make_run(root, selector, keep, seed, acc, acc, [0.5] * 3, ones, [keep] * 3, keep, task=task,
                 name=f"{task}/{selector}_k{keep}_s{seed}")


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    root = tmp_path / "grid"
    runs_with(root, "arithmetic", "full", 1.0, FULL)
    runs_with(root, "arithmetic", "entropy", 0.5, [a + d for a, d in zip(FULL, [0.05, 0.06, 0.07])])      # (a) +0.06, tight
    runs_with(root, "arithmetic", "q3", 0.1, [a + d for a, d in zip(FULL, [-0.01, 0.00, -0.02])])         # (c) -0.01 +- 0.025
    runs_with(root, "arithmetic", "type_aware", 0.5, [a + d for a, d in zip(FULL, [0.00, 0.01, 0.02])])
    runs_with(root, "arithmetic", "type_aware_bottom", 0.5, [a + d for a, d in zip(FULL, [0.10, 0.13, 0.13])])  # (d) ta - bottom < 0
    runs_with(root, "arithmetic", "random", 0.5, [a + d for a, d in zip(FULL, [-0.20, -0.15, -0.25])])    # control
    runs_with(root, "planning", "full", 1.0, [0.4, 0.5, 0.45])
    runs_with(root, "planning", "q3", 0.2, [0.48])                                                         # (e) one seed only
    return root


def by_comparison(df, label):
    hit = df[df["comparison"] == label]
    assert len(hit) == 1, df[["comparison"]]
    return hit.iloc[0]


def test_each_verdict_from_hand_made_numbers(grid: Path):
    runs = load_report([grid]).runs
    detail = claim_rows(runs)

    a = by_comparison(detail, "entropy@0.5 − full")  # differences 0.05, 0.06, 0.07: mean 0.06, s 0.01
    half = T975_2 * 0.01 / math.sqrt(3)
    assert a["n"] == 3 and a["kind"] == "paired" and a["mean"] == pytest.approx(0.06)
    assert a["lo"] == pytest.approx(0.06 - half, abs=1e-4) and a["hi"] == pytest.approx(0.06 + half, abs=1e-4)
    assert a["verdict"] == SUPPORTED

    c = by_comparison(detail, "q3@0.1 − full (bound -0.02)")  # [-0.0348, 0.0148] contains the -0.02 bound
    assert c["mean"] == pytest.approx(-0.01) and c["lo"] < -0.02 < c["hi"] and c["verdict"] == NOT_CONTRADICTED

    d = by_comparison(detail[detail["claim"] == "d"], "type_aware@0.5 − type_aware_bottom@0.5")  # -0.10, -0.12, -0.11
    assert d["mean"] == pytest.approx(-0.11) and d["hi"] < 0 and d["verdict"] == CONTRADICTED

    e = by_comparison(detail, "q3@0.2 − full")
    assert e["task"] == "planning" and e["verdict"] == NO_DATA  # one seed: no interval, no verdict

    verdicts = claim_verdicts(detail).set_index("claim")["verdict"]
    # (b): type_aware@0.5 vs random supported, vs bottom contradicted, the other rules never ran
    assert verdicts.to_dict() == {"(a)": SUPPORTED, "(b)": CONTRADICTED, "(c)": NOT_CONTRADICTED, "(d)": CONTRADICTED, "(e)": NO_DATA}


def test_random_control_at_the_same_keep(grid: Path):
    controls = random_controls(load_report([grid]).runs)
    assert set(controls["comparison"]) == {"entropy@0.5 − random@0.5", "type_aware@0.5 − random@0.5",
                                           "type_aware_bottom@0.5 − random@0.5"}  # q3@0.1 has no random@0.1
    ta = by_comparison(controls, "type_aware@0.5 − random@0.5")  # differences 0.20, 0.16, 0.27
    assert ta["mean"] == pytest.approx(0.21) and ta["verdict"] == SUPPORTED


def test_results_file_from_the_report_command(grid: Path, tmp_path: Path, capsys):
    docs = tmp_path / "docs" / "results.md"
    assert main_report([str(grid), "--out", str(tmp_path / "rep"), "--results", str(docs)]) == 0
    md = docs.read_text()
    assert "| (a) | entropy sampling at 50% is at least as good as all tokens | entropy@0.5 − full | arithmetic | 3 |" in md
    assert "+0.060 [0.035, 0.085] | supported |" in md
    assert "**supported** when lo > b" in md and "No correction for multiple comparisons" in md  # the rule is stated
    assert "## The control the paper lacks" in md and "type_aware@0.5 − random@0.5" in md
    assert "## arithmetic (embedded/reverse_kl, 3 steps, 18 runs)" in md and "## planning" in md
    # the figures travel with the file and the links resolve
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert links and all((docs.parent / link).is_file() for link in links)
    assert any("accuracy_over_steps_arithmetic" in link for link in links)
    assert "commands, machine and grid wall time were not recorded" in md  # no grid.json here
    assert f"tipdistill report {grid} --out" in md


def test_results_file_takes_commands_machine_and_wall_time_from_grid_json(grid: Path, tmp_path: Path):
    machine = {"cpu": "Test CPU 9000", "cores": 2, "memory": "24 GiB"}
    sitting = lambda cmd, wall: {"command": cmd, "started": "2026-01-01T10:00:00+00:00", "finished": "2026-01-01T11:00:00+00:00",  # noqa: E731
                                 "wall_s": wall, "jobs_parallel": 2, "threads_per_job": 1, "machine": machine,
                                 "load_start": [0.1, 0.2, 0.3], "load_end": [1.9, 1.8, 1.5], "ran": 10, "skipped": 0, "failed": 0, "jobs": []}
    (grid / "grid.json").write_text(json.dumps({"grid": "evidence", "sittings": [
        sitting(".venv/bin/python scripts/evidence_grid.py --jobs 2", 3600.0),
        sitting(".venv/bin/python scripts/evidence_grid.py --jobs 2", 1800.0)]}))
    docs = tmp_path / "results.md"
    assert main_report([str(grid), "--out", str(tmp_path / "rep"), "--results", str(docs)]) == 0
    md = docs.read_text()
    assert md.count(".venv/bin/python scripts/evidence_grid.py --jobs 2\n") == 2
    assert "Machine: cpu Test CPU 9000, cores 2, memory 24 GiB." in md
    assert "Grid wall time, all sittings: 1.50 h." in md
    assert "| 1 | 2026-01-01T10:00:00+00:00 | 2026-01-01T11:00:00+00:00 | 1.00 h | 10 | 0 | 0 | 2 | 1 | 0.10/0.20/0.30 / 1.90/1.80/1.50 |" in md
    assert "Partial grid" not in md  # no sitting says how many jobs it planned


def test_results_file_says_when_the_grid_is_unfinished(grid: Path, tmp_path: Path):
    n_runs = len(list(grid.rglob("summary.json")))
    (grid / "grid.json").write_text(json.dumps({"grid": "evidence", "sittings": [
        {"command": "python scripts/evidence_grid.py --jobs 2", "wall_s": 60.0, "planned": n_runs + 3, "ran": n_runs, "jobs": []}]}))
    docs = tmp_path / "results.md"
    assert main_report([str(grid), "--out", str(tmp_path / "rep"), "--results", str(docs)]) == 0
    assert (f"**Partial grid: {n_runs} of {n_runs + 3} planned jobs have finished.**" in docs.read_text())
