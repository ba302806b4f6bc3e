"""report: hand-made run directories with known numbers -> exact means, stds, diffs and ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tipdistill.report import build_report
from tipdistill.report_cmd import main_report

# (selector, keep in config, seed, acc_end, greedy_end, mem per step, step_s per step, update_s per step, keep_frac)
RUNS = [
    ("full", 0.2, 0, 0.60, 0.70, [2.0, 2.0, 9.0], [1.0, 1.0, 5.0], [0.5, 0.5, 3.0], 1.0),  # keep ignored -> 1.0
    ("full", 1.0, 1, 0.80, 0.90, [2.0, 2.0, 2.0], [3.0, 3.0, 3.0], [1.5, 1.5, 1.5], 1.0),
    ("type_aware", 0.2, 0, 0.50, 0.55, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.25, 0.25, 0.25], 0.2),
    ("type_aware", 0.2, 1, 0.70, 0.75, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.25, 0.25, 0.25], 0.2),
    ("entropy", 0.5, 0, 0.65, 0.60, [1.5, 1.5, 1.5], [1.5, 1.5, 1.5], [0.5, 0.5, 0.5], 0.5),
]


def make_run(root: Path, selector, keep, seed, acc, greedy, mem, step_s, update_s, keep_frac, with_mem=True, cuda=False,
             task="arithmetic", name=None) -> Path:
    d = root / (name or f"{selector}_k{keep}_s{seed}")
    d.mkdir(parents=True)
    cfg = {"selector": {"name": selector}, "keep": keep, "seed": seed, "loss": {"name": "reverse_kl"},
           "task": {"name": task}, "model": {"name": "embedded"}}
    (d / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        for i in range(3):
            row = {"step": i + 1, "train/loss": 1.0 / (i + 1), "select/keep_frac": keep_frac,
                   "time/step_s": step_s[i], "time/update_s": update_s[i]}
            if with_mem:
                row["mem/update_peak_gib"] = mem[i]
                if cuda:  # the CUDA probe also logs the allocator's reserved peak
                    row["mem/update_peak_reserved_gib"] = mem[i] * 1.5
            if i in (0, 2):
                row["eval/accuracy"] = acc * (0.5 if i == 0 else 1.0)
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 4, "train/lo')  # torn last line of a killed run: skipped
    summary = {"eval/accuracy_start": acc / 2, "eval/accuracy_end": acc, "eval/accuracy_greedy_start": greedy / 2,
               "eval/accuracy_greedy_end": greedy, "steps": 3, "wall_s": 10.0}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01"
    for i, r in enumerate(RUNS):
        make_run(root / str(i), *r)  # nested one level deeper, like Hydra's job subdirs
    return tmp_path / "multirun"


def row(df: pd.DataFrame, selector: str, keep: float) -> pd.Series:
    hit = df[(df["selector"] == selector) & np.isclose(df["keep"], keep)]
    assert len(hit) == 1, df
    return hit.iloc[0]


def test_numbers(sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    build_report([sweep], out)
    df = pd.read_csv(out / "report.csv")
    assert len(df) == 3

    full = row(df, "full", 1.0)  # keep=0.2 in the config of a full run is reported as 1.0
    assert full["runs"] == 2
    assert full["acc_mean"] == pytest.approx(0.70)
    assert full["acc_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.8
    assert full["greedy_mean"] == pytest.approx(0.80)
    assert full["update_peak_gib"] == pytest.approx(2.0)  # median per run (2, 2), then mean
    assert full["step_s"] == pytest.approx(2.0)  # medians 1 and 3
    assert full["update_s"] == pytest.approx(1.0)  # medians 0.5 and 1.5
    assert full["acc_diff_vs_full"] == pytest.approx(0.0)
    assert full["update_peak_ratio"] == pytest.approx(1.0)

    ta = row(df, "type_aware", 0.2)
    assert ta["runs"] == 2
    assert ta["acc_mean"] == pytest.approx(0.60)
    assert ta["acc_std"] == pytest.approx(math.sqrt(0.02))
    assert ta["acc_diff_vs_full"] == pytest.approx(-0.10)
    assert ta["greedy_mean"] == pytest.approx(0.65)
    assert ta["greedy_diff_vs_full"] == pytest.approx(-0.15)
    assert ta["update_peak_gib"] == pytest.approx(1.0)
    assert ta["update_peak_ratio"] == pytest.approx(0.5)
    assert ta["step_s"] == pytest.approx(1.5)
    assert ta["step_ratio"] == pytest.approx(0.75)
    assert ta["update_ratio"] == pytest.approx(0.25)
    assert ta["keep_frac"] == pytest.approx(0.2)

    en = row(df, "entropy", 0.5)
    assert en["runs"] == 1
    assert math.isnan(en["acc_std"])  # one seed: no std
    assert en["acc_diff_vs_full"] == pytest.approx(-0.05)
    assert en["update_peak_ratio"] == pytest.approx(0.75)
    assert en["step_ratio"] == pytest.approx(0.75)
    assert en["update_ratio"] == pytest.approx(0.5)

    assert list(df["selector"])[0] == "full"
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 5
    md = (out / "report.md").read_text()
    assert "| selector |" in md and "type_aware" in md and "nan" not in md.lower()


def test_plots_are_real_pngs(sweep: Path, tmp_path: Path):
    import matplotlib.image as mpimg

    out = tmp_path / "out"
    build_report([sweep], out)
    for name in ("accuracy_vs_keep.png", "memory_vs_keep.png", "accuracy_over_steps.png", "accuracy_vs_update_time.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].var()) > 0, f"{name} is blank"


def test_missing_memory_is_blank_not_a_crash(tmp_path: Path):
    make_run(tmp_path / "runs", "full", 1.0, 0, 0.5, 0.5, [0] * 3, [1.0] * 3, [1.0] * 3, 1.0, with_mem=False)
    make_run(tmp_path / "runs", "entropy", 0.5, 0, 0.4, 0.4, [0] * 3, [1.0] * 3, [0.5] * 3, 0.5, with_mem=False)
    df = build_report([tmp_path / "runs"], tmp_path / "out")
    assert df["update_peak_gib"].isna().all() and df["update_peak_ratio"].isna().all()
    assert df.set_index("selector").loc["entropy", "update_ratio"] == pytest.approx(0.5)
    assert not (tmp_path / "out" / "memory_vs_keep.png").exists()
    assert (tmp_path / "out" / "accuracy_vs_keep.png").exists()


def test_run_dir_given_directly_and_cli(sweep: Path, tmp_path: Path, capsys):
    one = next(p.parent for p in sweep.rglob("summary.json"))
    assert main_report([str(one), "--out", str(tmp_path / "o1")]) == 0
    assert "| selector |" in capsys.readouterr().out
    assert main_report([str(sweep)]) == 0  # default out dir: the first path
    assert (sweep / "report.csv").is_file()


def test_no_runs_is_one_clear_line(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main_report([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no runs found" in err


# ---------------------------------------------------------------- intervals, paired differences, curves (issue 16)

T975 = {2: 4.3027, 3: 3.1824}  # Student-t table, two-sided 95%


def three_seed_sweep(root: Path) -> Path:
    """full on seeds 0-2, type_aware 0.2 on seeds 0-3 (seed 3 has no `full` partner)."""
    ones = [1.0] * 3
    for seed, acc in enumerate([0.60, 0.70, 0.80]):
        make_run(root, "full", 1.0, seed, acc, acc, [2.0] * 3, ones, ones, 1.0)
    for seed, acc in enumerate([0.55, 0.70, 0.70, 0.65]):
        make_run(root, "type_aware", 0.2, seed, acc, acc, [1.0] * 3, ones, [0.25] * 3, 0.2)
    return root


def test_intervals_and_paired_difference_by_hand(tmp_path: Path):
    df = build_report([three_seed_sweep(tmp_path / "runs")], tmp_path / "out")
    full, ta = row(df, "full", 1.0), row(df, "type_aware", 0.2)
    half = T975[2] * 0.1 / math.sqrt(3)  # full: mean 0.7, s 0.1, n 3
    assert (full["acc_mean"], full["acc_lo"], full["acc_hi"]) == (pytest.approx(0.7), pytest.approx(0.7 - half, abs=1e-4),
                                                                  pytest.approx(0.7 + half, abs=1e-4))
    half = T975[3] * math.sqrt(0.005) / 2  # type_aware: mean 0.65, s^2 = 0.015 / 3, n 4
    assert ta["runs"] == 4 and ta["acc_mean"] == pytest.approx(0.65)
    assert (ta["acc_lo"], ta["acc_hi"]) == (pytest.approx(0.65 - half, abs=1e-4), pytest.approx(0.65 + half, abs=1e-4))
    # paired on seeds 0-2 only: differences -0.05, 0, -0.10
    half = T975[2] * 0.05 / math.sqrt(3)
    assert ta["pairs"] == 3 and ta["acc_vs_full"] == pytest.approx(-0.05)
    assert (ta["acc_vs_full_lo"], ta["acc_vs_full_hi"]) == (pytest.approx(-0.05 - half, abs=1e-4), pytest.approx(-0.05 + half, abs=1e-4))
    assert ta["greedy_vs_full"] == pytest.approx(-0.05)
    assert ta["update_s"] == pytest.approx(0.25) and ta["update_s_lo"] == pytest.approx(0.25)  # no spread
    assert ta["update_ratio"] == pytest.approx(0.25)

    md = (tmp_path / "out" / "report.md").read_text()
    assert "95% Student-t" in md  # the output says which interval
    assert "| full | 1 | 0,1,2 | 0.700 [0.452, 0.948] |" in md
    assert "| type_aware | 0.2 | 0,1,2,3 | 0.650 [0.537, 0.763] | -0.050 [-0.174, 0.074] | 3 |" in md


def test_learning_curves_are_seed_means_with_intervals(tmp_path: Path):
    build_report([three_seed_sweep(tmp_path / "runs")], tmp_path / "out")
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")
    full = curves[(curves["selector"] == "full") & (curves["metric"] == "accuracy")].set_index("step")
    assert list(full.index) == [1, 3]  # every eval step
    half = T975[2] * 0.05 / math.sqrt(3)  # step 1: 0.30, 0.35, 0.40
    assert full.loc[1, "n"] == 3 and full.loc[1, "mean"] == pytest.approx(0.35)
    assert full.loc[1, "lo"] == pytest.approx(0.35 - half, abs=1e-4) and full.loc[1, "hi"] == pytest.approx(0.35 + half, abs=1e-4)
    assert full.loc[3, "mean"] == pytest.approx(0.7)
    ta = curves[(curves["selector"] == "type_aware") & (curves["metric"] == "accuracy")].set_index("step")
    assert ta.loc[3, "n"] == 4 and ta.loc[3, "mean"] == pytest.approx(0.65)


def test_memory_below_resolution_is_marked_not_a_ratio(tmp_path: Path, capsys):
    ones = [1.0] * 3
    for seed in (0, 1):  # RSS peaks of a few tens of MB: 0.03 vs 0.062 GiB would read as "2.07x"
        make_run(tmp_path / "rss", "full", 1.0, seed, 0.5, 0.5, [0.03] * 3, ones, ones, 1.0)
        make_run(tmp_path / "rss", "type_aware", 0.2, seed, 0.5, 0.5, [0.062] * 3, ones, ones, 0.2)
    df = build_report([tmp_path / "rss"], tmp_path / "out")
    assert not df["update_peak_resolved"].any() and df["update_peak_ratio"].isna().all()
    assert row(df, "type_aware", 0.2)["update_peak_gib"] == pytest.approx(0.062)  # the raw value stays in the CSV
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| <0.1 | unresolved |" in md and "2.07" not in md and "below the probe's resolution" in md

    # a lower floor (documented flag) resolves them; the CUDA allocator's count is never floored
    assert main_report([str(tmp_path / "rss"), "--out", str(tmp_path / "o2"), "--mem-floor-gib", "0.01"]) == 0
    assert pd.read_csv(tmp_path / "o2" / "report.csv").set_index("selector").loc["type_aware", "update_peak_ratio"] == pytest.approx(2.0667, abs=1e-3)
    for seed in (0, 1):
        make_run(tmp_path / "cuda", "full", 1.0, seed, 0.5, 0.5, [0.03] * 3, ones, ones, 1.0, cuda=True)
        make_run(tmp_path / "cuda", "type_aware", 0.2, seed, 0.5, 0.5, [0.062] * 3, ones, ones, 0.2, cuda=True)
    df = build_report([tmp_path / "cuda"], tmp_path / "o3")
    assert df["update_peak_resolved"].all() and row(df, "type_aware", 0.2)["update_peak_ratio"] == pytest.approx(2.0667, abs=1e-3)
    assert set(df["mem_probe"]) == {"cuda"}
