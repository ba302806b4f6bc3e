"""report: compare runs side by side, from local files only (no W&B, no network).

Reads each run's `config_resolved.yaml`, `metrics.jsonl` and `summary.json`, reduces every run to
one row, then every (task, model, loss, selector, keep) group to one row: accuracy mean/std over
seeds, its difference to `selector=full`, and update-phase memory and time with their ratios to
`full`. Writes `report.csv` (groups), `runs.csv` (one row per run), `report.md` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

GROUP_KEYS = ["task", "model", "loss", "selector", "keep"]
REF_KEYS = ["task", "model", "loss"]  # a group's `full` reference shares these


class ReportError(RuntimeError):
    """Nothing to report; the message is one line that says what was expected."""


# ---------------------------------------------------------------- finding and reading runs


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories (those holding `summary.json`) under each path, at any depth."""
    runs: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory (give run directories or a multirun directory)")
        if (path / "summary.json").is_file():
            runs.add(path.resolve())
        else:
            runs.update(p.parent.resolve() for p in path.rglob("summary.json"))
    return sorted(runs)


def _read_jsonl(path: Path) -> pd.DataFrame:
    """One row per logged step; a torn last line (a killed run) is skipped, not fatal."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return pd.DataFrame(rows)


def _read_config(run_dir: Path) -> dict:
    for name in ("config_resolved.yaml", ".hydra/config.yaml"):
        if (run_dir / name).is_file():
            return yaml.safe_load((run_dir / name).read_text()) or {}
    return {}


def _name(cfg: dict, group: str) -> Any:
    node = cfg.get(group)
    return node.get("name") if isinstance(node, dict) else node


def _col(df: pd.DataFrame, key: str) -> pd.Series:
    if key not in df.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(df[key], errors="coerce").dropna()


def _median(df: pd.DataFrame, key: str) -> float:
    s = _col(df, key)
    return float(s.median()) if len(s) else math.nan


def _num(d: dict, key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def load_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    """One run reduced to a flat row, plus its per-step metrics (for the over-steps plot)."""
    cfg = _read_config(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    selector = _name(cfg, "selector")
    keep = cfg.get("keep", math.nan)
    row = {
        "run_dir": str(run_dir),
        "task": _name(cfg, "task"),
        "model": _name(cfg, "model"),
        "loss": _name(cfg, "loss"),
        "selector": selector,
        # the trainer ignores `keep` for selector=full: it trains on every token
        "keep": 1.0 if selector == "full" else float(keep) if keep is not None else math.nan,
        "seed": cfg.get("seed"),
        "acc_start": _num(summary, "eval/accuracy_start"),
        "acc_end": _num(summary, "eval/accuracy_end"),
        "greedy_start": _num(summary, "eval/accuracy_greedy_start"),
        "greedy_end": _num(summary, "eval/accuracy_greedy_end"),
        # mean partial credit (planning: share of constraints met); equals accuracy on 0/1 tasks
        "score_start": _num(summary, "eval/score_start"),
        "score_end": _num(summary, "eval/score_end"),
        "steps": _num(summary, "steps"),
        "wall_s": _num(summary, "wall_s"),
        "update_peak_gib": _median(metrics, "mem/update_peak_gib"),
        "step_s": _median(metrics, "time/step_s"),
        "update_s": _median(metrics, "time/update_s"),
        "keep_frac": float(_col(metrics, "select/keep_frac").mean()) if len(_col(metrics, "select/keep_frac")) else math.nan,
    }
    for key in ("task", "model", "loss", "selector"):
        row[key] = "?" if row[key] is None else str(row[key])
    return row, metrics


# ---------------------------------------------------------------- aggregation


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Groups over seeds (std is the sample std, ddof=1: blank for a single seed), then ratios to full."""
    g = runs.groupby(GROUP_KEYS, dropna=False, sort=False)
    out = g.agg(
        runs=("run_dir", "size"),
        seeds=("seed", lambda s: ",".join(str(x) for x in sorted(s.dropna().tolist()))),
        acc_mean=("acc_end", "mean"),
        acc_std=("acc_end", "std"),
        greedy_mean=("greedy_end", "mean"),
        acc_start_mean=("acc_start", "mean"),
        score_mean=("score_end", "mean"),
        score_start_mean=("score_start", "mean"),
        keep_frac=("keep_frac", "mean"),
        update_peak_gib=("update_peak_gib", "mean"),
        step_s=("step_s", "mean"),
        update_s=("update_s", "mean"),
    ).reset_index()

    full = out[out["selector"] == "full"].set_index(REF_KEYS)
    pairs = [("acc_diff_vs_full", "acc_mean", "diff"), ("greedy_diff_vs_full", "greedy_mean", "diff"),
             ("score_diff_vs_full", "score_mean", "diff"),
             ("update_peak_ratio", "update_peak_gib", "ratio"), ("step_ratio", "step_s", "ratio"),
             ("update_ratio", "update_s", "ratio")]
    for new, _, _ in pairs:
        out[new] = math.nan
    for i, row in out.iterrows():
        key = tuple(row[k] for k in REF_KEYS)
        if key not in full.index:
            continue
        ref = full.loc[[key]].iloc[0]
        for new, col, how in pairs:
            a, b = row[col], ref[col]
            out.at[i, new] = a - b if how == "diff" else (a / b if b and not math.isnan(b) else math.nan)

    out["_full_last"] = out["selector"] != "full"
    out = out.sort_values(REF_KEYS + ["_full_last", "selector", "keep"], ascending=[True] * 5 + [False])
    cols = GROUP_KEYS + ["runs", "seeds", "acc_mean", "acc_std", "acc_diff_vs_full", "greedy_mean", "greedy_diff_vs_full",
                         "acc_start_mean", "score_mean", "score_diff_vs_full", "score_start_mean", "keep_frac", "update_peak_gib", "update_peak_ratio", "step_s", "step_ratio",
                         "update_s", "update_ratio"]
    return out[cols].reset_index(drop=True)


# ---------------------------------------------------------------- output


def to_markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (own formatter: keeps `tabulate` out of the dependencies); NaN is blank."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _plots(table: pd.DataFrame, runs: pd.DataFrame, histories: dict[str, pd.DataFrame], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    combos = table[REF_KEYS].drop_duplicates().itertuples(index=False)
    combos = list(combos)
    for combo in combos:
        part = table[(table[REF_KEYS] == pd.Series(combo, index=REF_KEYS)).all(axis=1)]
        suffix = "" if len(combos) == 1 else "_" + "_".join(str(c) for c in combo)
        title = " / ".join(str(c) for c in combo)
        for stem, col, err, ylabel in (("accuracy_vs_keep", "acc_mean", "acc_std", "final accuracy (eval/accuracy_end)"),
                                       ("memory_vs_keep", "update_peak_gib", None, "update peak memory (GiB)")):
            if part[col].notna().sum() == 0:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for sel, sub in part[part["selector"] != "full"].groupby("selector"):
                sub = sub.sort_values("keep")
                yerr = sub[err].fillna(0) if err else None
                ax.errorbar(sub["keep"], sub[col], yerr=yerr, marker="o", capsize=3, label=str(sel))
            ref = part[part["selector"] == "full"][col].dropna()
            if len(ref):
                ax.axhline(float(ref.iloc[0]), color="black", linestyle="--", label="full")
            ax.set_xlabel("keep (fraction of response tokens trained on)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
            path = out_dir / f"{stem}{suffix}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for run in runs.itertuples(index=False):
        h = histories.get(run.run_dir)
        if h is None or "eval/accuracy" not in h.columns or "step" not in h.columns:
            continue
        pts = h[["step", "eval/accuracy"]].apply(pd.to_numeric, errors="coerce").dropna()
        if len(pts):
            ax.plot(pts["step"], pts["eval/accuracy"], marker=".", label=run.label)
            drawn += 1
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("eval/accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / "accuracy_over_steps.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    plt.close(fig)
    return written


def build_report(paths: list[Path], out_dir: Path) -> pd.DataFrame:
    """Find runs under `paths`, write report.csv/runs.csv/report.md/PNGs into `out_dir`, return the table."""
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ReportError(f"no runs found under {', '.join(map(str, paths))} (a run directory holds summary.json)")
    rows, histories = [], {}
    for d in run_dirs:
        row, hist = load_run(d)
        rows.append(row)
        histories[row["run_dir"]] = hist
    runs = pd.DataFrame(rows)
    runs["label"] = [f"{r.selector}-keep{r.keep:g}-seed{r.seed}" for r in runs.itertuples(index=False)]
    table = aggregate(runs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "report.csv", index=False)
    runs.to_csv(out_dir / "runs.csv", index=False)
    # columns that are the same for every row (e.g. one task) are stated once above the table
    const = [k for k in REF_KEYS if table[k].nunique() <= 1]
    shown = table.drop(columns=const)
    head = ", ".join(f"{k}={table[k].iloc[0]}" for k in const)
    (out_dir / "report.md").write_text(f"{len(runs)} runs; {head}\n\n" + to_markdown(shown))
    _plots(table, runs, histories, out_dir)
    return table


def main_report(argv: list[str]) -> int:
    """`tipdistill report <dir>... [--out DIR]`: print the markdown table; exit 1 with one line on no runs."""
    parser = argparse.ArgumentParser(prog="tipdistill report", description="Compare finished runs side by side.")
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or multirun directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.* and plots (default: the first path)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.paths[0]
    try:
        build_report(args.paths, out)
    except ReportError as exc:
        print(f"tipdistill report: {exc}", file=sys.stderr)
        return 1
    print((out / "report.md").read_text(), end="")
    print(f"written: {out / 'report.csv'}, {out / 'report.md'} and plots in {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_report(sys.argv[1:]))
