"""report: compare runs side by side, from local files only (no W&B, no network).

Reads each run's `config_resolved.yaml`, `metrics.jsonl` and `summary.json`, reduces every run to
one row, then every (task, model, loss, selector, keep) group to one row: final accuracy (sampled,
greedy, constraint score) as a mean over seeds with its 95% Student-t interval, the difference to
`selector=full` paired over the seeds both have (with its interval), update time and update peak
memory with their ratios to `full`. Also the learning curves (every eval step, mean over seeds with
its interval). Writes `report.csv` (groups), `runs.csv` (one row per run), `curves.csv`, `report.md`
and PNG plots. The command line is tipdistill/report_cmd.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml

from tipdistill.stats import LEVEL, paired_difference, t_interval

GROUP_KEYS = ["task", "model", "loss", "selector", "keep"]
REF_KEYS = ["task", "model", "loss"]  # a group's `full` reference shares these
# short name -> per-run column: the final evaluation metrics that get intervals and paired differences
METRICS = {"acc": "acc_end", "greedy": "greedy_end", "score": "score_end"}
# eval metric logged per eval step -> short name used in curves.csv and plot names
CURVE_METRICS = {"eval/accuracy": "accuracy", "eval/accuracy_greedy": "accuracy_greedy", "eval/score": "score"}

# On CPU the probe reports how far the process RSS rose above its level when the update began. Below
# about 0.1 GiB that rise says more about the allocator than about the update: memory freed earlier in
# the step (rollout, teacher pass, the last update) is reused without raising RSS, and glibc grows RSS
# in steps of up to a 64 MiB arena plus a 32 MiB mmap threshold (96 MiB). CUDA peaks come from the
# torch allocator, which counts bytes: no floor there.
MEM_FLOOR_GIB = 0.1
MEM_RULE = ("CPU update peaks are the rise of the process RSS during the update; a configuration whose mean peak is "
            "below {floor:g} GiB is below the probe's resolution (allocator reuse and glibc's arena and mmap "
            "steps, up to 96 MiB, decide such values) and is shown as `<{floor:g}`, with no ratio to `full`. "
            "CUDA peaks (torch allocator) have no floor.")
INTERVAL_RULE = (f"Intervals: {LEVEL:.0%} Student-t over seeds, mean ± t(0.975, n-1)·s/√n (s: sample std, ddof=1; "
                 "none for one seed). Differences to `full` are paired over the seeds both have (n pairs); "
                 "intervals are not clipped to [0, 1].")


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
    """One run reduced to a flat row, plus its per-step metrics (for the learning curves)."""
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
        # the CUDA probe also logs the reserved peak; the CPU (RSS) probe does not
        "mem_probe": ("cuda" if "mem/update_peak_reserved_gib" in metrics.columns
                      else "rss" if "mem/update_peak_gib" in metrics.columns else ""),
        "step_s": _median(metrics, "time/step_s"),
        "update_s": _median(metrics, "time/update_s"),
        "keep_frac": float(_col(metrics, "select/keep_frac").mean()) if len(_col(metrics, "select/keep_frac")) else math.nan,
    }
    for key in ("task", "model", "loss", "selector"):
        row[key] = "?" if row[key] is None else str(row[key])
    return row, metrics


# ---------------------------------------------------------------- aggregation


def by_seed(runs: pd.DataFrame, col: str) -> dict:
    """seed -> value of one group's runs (a seed run twice counts once, as the mean of its runs)."""
    sub = runs[["seed", col]].dropna()
    return {s: float(v) for s, v in sub.groupby("seed")[col].mean().items()}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def aggregate(runs: pd.DataFrame, mem_floor_gib: float = MEM_FLOOR_GIB) -> pd.DataFrame:
    """Groups over seeds: means, sample std (ddof=1), t-intervals, and differences/ratios to `full`."""
    rows = []
    groups = {key: sub for key, sub in runs.groupby(GROUP_KEYS, dropna=False, sort=False)}
    for key, sub in groups.items():
        row = dict(zip(GROUP_KEYS, key))
        row["runs"] = len(sub)
        row["seeds"] = ",".join(str(x) for x in sorted(sub["seed"].dropna().tolist()))
        for short, col in METRICS.items():
            iv = t_interval(sub[col])
            row[f"{short}_mean"], row[f"{short}_lo"], row[f"{short}_hi"] = iv.mean, iv.lo, iv.hi
        row["acc_std"] = float(sub["acc_end"].std()) if sub["acc_end"].notna().sum() > 1 else math.nan
        row["acc_start_mean"] = float(sub["acc_start"].mean())
        row["score_start_mean"] = float(sub["score_start"].mean())
        row["keep_frac"] = float(sub["keep_frac"].mean())
        row["update_peak_gib"] = float(sub["update_peak_gib"].mean())
        row["mem_probe"] = ",".join(sorted(set(sub["mem_probe"]) - {""}))
        # resolved: a CUDA allocator count, or an RSS rise at or above the floor
        row["update_peak_resolved"] = bool(row["mem_probe"] == "cuda" or row["update_peak_gib"] >= mem_floor_gib)
        row["step_s"] = float(sub["step_s"].mean())
        iv = t_interval(sub["update_s"])
        row["update_s"], row["update_s_lo"], row["update_s_hi"] = iv.mean, iv.lo, iv.hi
        rows.append(row)
    out = pd.DataFrame(rows)

    # differences to the `full` group of the same (task, model, loss)
    for short in METRICS:
        for suffix in ("diff_vs_full", "vs_full", "vs_full_lo", "vs_full_hi"):
            out[f"{short}_{suffix}"] = math.nan
    for col in ("pairs", "update_peak_ratio", "step_ratio", "update_ratio"):
        out[col] = math.nan
    for i, row in out.iterrows():
        ref_key = tuple(row[k] for k in REF_KEYS) + ("full", 1.0)
        if ref_key not in groups:
            continue
        ref = out[(out[REF_KEYS + ["selector"]] == pd.Series(ref_key[:4], index=REF_KEYS + ["selector"])).all(axis=1)].iloc[0]
        sub, ref_sub = groups[tuple(row[k] for k in GROUP_KEYS)], groups[ref_key]
        for short, col in METRICS.items():
            out.at[i, f"{short}_diff_vs_full"] = row[f"{short}_mean"] - ref[f"{short}_mean"]  # difference of means
            iv = paired_difference(by_seed(sub, col), by_seed(ref_sub, col))
            out.at[i, f"{short}_vs_full"], out.at[i, f"{short}_vs_full_lo"], out.at[i, f"{short}_vs_full_hi"] = iv.mean, iv.lo, iv.hi
            if short == "acc":
                out.at[i, "pairs"] = iv.n
        if row["update_peak_resolved"] and ref["update_peak_resolved"]:
            out.at[i, "update_peak_ratio"] = _ratio(row["update_peak_gib"], ref["update_peak_gib"])
        out.at[i, "step_ratio"] = _ratio(row["step_s"], ref["step_s"])
        out.at[i, "update_ratio"] = _ratio(row["update_s"], ref["update_s"])

    out["_full_last"] = out["selector"] != "full"
    out = out.sort_values(REF_KEYS + ["_full_last", "selector", "keep"], ascending=[True] * 5 + [False])
    cols = GROUP_KEYS + ["runs", "seeds",
                         "acc_mean", "acc_std", "acc_lo", "acc_hi", "acc_diff_vs_full", "acc_vs_full", "acc_vs_full_lo", "acc_vs_full_hi", "pairs",
                         "greedy_mean", "greedy_lo", "greedy_hi", "greedy_diff_vs_full", "greedy_vs_full", "greedy_vs_full_lo", "greedy_vs_full_hi",
                         "acc_start_mean",
                         "score_mean", "score_lo", "score_hi", "score_diff_vs_full", "score_vs_full", "score_vs_full_lo", "score_vs_full_hi",
                         "score_start_mean", "keep_frac",
                         "update_peak_gib", "mem_probe", "update_peak_resolved", "update_peak_ratio", "step_s", "step_ratio",
                         "update_s", "update_s_lo", "update_s_hi", "update_ratio"]
    return out[cols].reset_index(drop=True)


def curves(runs: pd.DataFrame, histories: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Learning curves: each eval metric at each logged step, mean and t-interval over a group's seeds."""
    long = []
    for run in runs.itertuples(index=False):
        h = histories.get(run.run_dir)
        if h is None or "step" not in h.columns:
            continue
        for key, short in CURVE_METRICS.items():
            if key not in h.columns:
                continue
            pts = h[["step", key]].apply(pd.to_numeric, errors="coerce").dropna()
            long += [{**{k: getattr(run, k) for k in GROUP_KEYS}, "metric": short, "step": int(s), "value": float(v)}
                     for s, v in zip(pts["step"], pts[key])]
    cols = GROUP_KEYS + ["metric", "step", "n", "mean", "lo", "hi"]
    if not long:
        return pd.DataFrame(columns=cols)
    rows = []
    for key, sub in pd.DataFrame(long).groupby(GROUP_KEYS + ["metric", "step"], sort=True):
        iv = t_interval(sub["value"])
        rows.append({**dict(zip(GROUP_KEYS + ["metric", "step"], key)), "n": iv.n, "mean": iv.mean, "lo": iv.lo, "hi": iv.hi})
    return pd.DataFrame(rows)[cols]


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


def fmt_interval(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    """`0.612 [0.551, 0.673]`; just the mean for one seed; blank without data."""
    if mean is None or math.isnan(mean):
        return ""
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m if math.isnan(lo) else f"{m} [{lo:.3f}, {hi:.3f}]"


def _fmt(v: float, spec: str = ".3g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def has_partial_credit(table: pd.DataFrame) -> bool:
    """True when the constraint score differs from accuracy somewhere (planning), so it gets its own columns."""
    a, s = table["acc_mean"], table["score_mean"]
    both = a.notna() & s.notna()
    return bool(both.any() and ((a[both] - s[both]).abs() > 1e-12).any())


def display_table(table: pd.DataFrame, mem_floor_gib: float = MEM_FLOOR_GIB, brief: bool = False) -> pd.DataFrame:
    """The human table: intervals as `mean [lo, hi]`, unresolved memory as `<floor`; `brief` for headlines."""
    score = has_partial_credit(table)
    rows = []
    for r in table.itertuples(index=False):
        row = {"selector": r.selector, "keep": f"{r.keep:g}", "seeds": r.seeds,
               "acc [95% CI]": fmt_interval(r.acc_mean, r.acc_lo, r.acc_hi),
               "acc vs full, paired [95% CI]": "" if r.selector == "full" else fmt_interval(r.acc_vs_full, r.acc_vs_full_lo, r.acc_vs_full_hi, signed=True),
               "pairs": "" if r.selector == "full" or math.isnan(r.pairs) else f"{r.pairs:.0f}"}
        if score:
            row["score [95% CI]"] = fmt_interval(r.score_mean, r.score_lo, r.score_hi)
            row["score vs full"] = "" if r.selector == "full" else fmt_interval(r.score_vs_full, r.score_vs_full_lo, r.score_vs_full_hi, signed=True)
        if not brief:
            row["greedy [95% CI]"] = fmt_interval(r.greedy_mean, r.greedy_lo, r.greedy_hi)
            row["greedy vs full"] = "" if r.selector == "full" else fmt_interval(r.greedy_vs_full, r.greedy_vs_full_lo, r.greedy_vs_full_hi, signed=True)
            row["acc start"] = _fmt(r.acc_start_mean, ".3f")
            row["keep_frac"] = _fmt(r.keep_frac, ".3f")
        row["update s"] = _fmt(r.update_s)
        row["update / full"] = _fmt(r.update_ratio, ".2f")
        if math.isnan(r.update_peak_gib):
            row["update peak GiB"], row["peak / full"] = "", ""
        elif not r.update_peak_resolved:
            row["update peak GiB"], row["peak / full"] = f"<{mem_floor_gib:g}", "unresolved"
        else:
            row["update peak GiB"] = _fmt(r.update_peak_gib)
            row["peak / full"] = _fmt(r.update_peak_ratio, ".2f") if not math.isnan(r.update_peak_ratio) else "unresolved"
        if not brief:
            row["step s"] = _fmt(r.step_s)
            row["step / full"] = _fmt(r.step_ratio, ".2f")
        rows.append(row)
    return pd.DataFrame(rows)


def combos(table: pd.DataFrame) -> list[tuple]:
    """The (task, model, loss) combinations in table order; each gets its own `full` reference and plots."""
    return list(dict.fromkeys(tuple(r) for r in table[REF_KEYS].itertuples(index=False)))


def combo_suffix(combo: tuple, all_combos: list[tuple]) -> str:
    return "" if len(all_combos) == 1 else "_" + "_".join(str(c) for c in combo)


def _part(df: pd.DataFrame, combo: tuple) -> pd.DataFrame:
    return df[(df[REF_KEYS] == pd.Series(combo, index=REF_KEYS)).all(axis=1)] if len(df) else df


# ---------------------------------------------------------------- plots

# A fixed colour per selector (stable across reports), a line style and marker per keep.
SELECTOR_ORDER = ["full", "random", "entropy", "entropy_topk", "divergence", "q3", "type_aware", "type_aware_bottom"]
KEEP_STYLES = ["-", "--", ":", "-."]
KEEP_MARKERS = ["o", "s", "^", "D", "v"]


class _Style:
    def __init__(self, table: pd.DataFrame):
        import matplotlib

        palette = list(matplotlib.colormaps["tab10"].colors)
        palette = palette[:7] + palette[8:]  # tab10's grey would look like `full`'s black
        names = [s for s in SELECTOR_ORDER if s != "full"] + sorted(set(table["selector"]) - set(SELECTOR_ORDER))
        self.colour = {s: palette[i % len(palette)] for i, s in enumerate(names)}
        self.colour["full"] = "black"
        keeps = sorted({float(k) for k in table.loc[table["selector"] != "full", "keep"].dropna()}, reverse=True)
        self.keeps = keeps
        self.line = {k: KEEP_STYLES[i % len(KEEP_STYLES)] for i, k in enumerate(keeps)}
        self.marker = {k: KEEP_MARKERS[i % len(KEEP_MARKERS)] for i, k in enumerate(keeps)}
        self.line[1.0], self.marker[1.0] = "-", "*"
        self.selectors = [s for s in SELECTOR_ORDER if s in set(table["selector"])] + sorted(set(table["selector"]) - set(SELECTOR_ORDER))

    def legend(self, ax, part: pd.DataFrame, keeps: bool = True, lines: bool = True, extra: list | None = None) -> None:
        """Keys outside the axes for what `part` holds: colour = selector, line style / marker = keep."""
        from matplotlib.lines import Line2D

        present = set(part["selector"])
        handles = [Line2D([], [], color=self.colour[s], lw=2.5, label=s) for s in self.selectors if s in present]
        if keeps:
            shown = {float(k) for k in part.loc[part["selector"] != "full", "keep"]}
            handles += [Line2D([], [], color="grey", ls=self.line[k] if lines else "none", marker=None if lines else self.marker[k],
                               label=f"keep {k:g}") for k in self.keeps if k in shown]
        handles += extra or []
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # `tight` keeps the outside legend in the image
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _plots(table: pd.DataFrame, curve_df: pd.DataFrame, out_dir: Path, mem_floor_gib: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    style = _Style(table)
    written: list[Path] = []
    all_combos = combos(table)
    for combo in all_combos:
        part = _part(table, combo)
        suffix = combo_suffix(combo, all_combos)
        title = " / ".join(str(c) for c in combo)
        ref = part[part["selector"] == "full"]

        # --- final accuracy and update memory against keep, error bars = 95% interval over seeds
        for stem, col, lo, hi, ylabel in (("accuracy_vs_keep", "acc_mean", "acc_lo", "acc_hi", "final accuracy (eval/accuracy_end)"),
                                          ("memory_vs_keep", "update_peak_gib", None, None, "update peak memory (GiB)")):
            if part[col].notna().sum() == 0:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            others = [s for s in style.selectors if s != "full" and s in set(part["selector"])]
            for i, sel in enumerate(others):
                sub = part[part["selector"] == sel].sort_values("keep")
                yerr = _yerr(sub, col, lo, hi) if lo else None
                dodge = (i - (len(others) - 1) / 2) * 0.004  # side by side, so the error bars stay apart
                ax.errorbar(sub["keep"] + dodge, sub[col], yerr=yerr, color=style.colour[sel], marker="o", capsize=3)
            extra = []
            if len(ref) and not math.isnan(ref[col].iloc[0]):
                y = float(ref[col].iloc[0])
                ax.axhline(y, color="black", linestyle="--")
                if lo and not math.isnan(ref[lo].iloc[0]):
                    ax.axhspan(float(ref[lo].iloc[0]), float(ref[hi].iloc[0]), color="black", alpha=0.08)
            if stem == "memory_vs_keep" and part["mem_probe"].str.contains("rss").any():
                ax.axhspan(0, mem_floor_gib, color="grey", alpha=0.2)
                extra.append(Patch(color="grey", alpha=0.2, label=f"below resolution\n(RSS < {mem_floor_gib:g} GiB)"))
            ax.set_xlabel("keep (fraction of response tokens trained on)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            style.legend(ax, part, keeps=False, extra=extra)
            written.append(_save(fig, out_dir / f"{stem}{suffix}.png"))

        # --- the trade-off: final accuracy against update time per step, both with intervals
        if part["acc_mean"].notna().any() and part["update_s"].notna().any():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in part.itertuples(index=False):
                k = 1.0 if r.selector == "full" else float(r.keep)
                ax.errorbar([r.update_s], [r.acc_mean], xerr=_err1(r.update_s, r.update_s_lo, r.update_s_hi),
                            yerr=_err1(r.acc_mean, r.acc_lo, r.acc_hi), color=style.colour[r.selector],
                            marker=style.marker.get(k, "o"), markersize=8 if r.selector == "full" else 6, capsize=3, ls="none")
            ax.set_xlabel("update time per step (s, median over steps, mean over seeds)")
            ax.set_ylabel("final accuracy (eval/accuracy_end)")
            ax.set_title(f"{title}: accuracy vs update cost (95% intervals)")
            ax.grid(alpha=0.3)
            style.legend(ax, part, lines=False)
            written.append(_save(fig, out_dir / f"accuracy_vs_update_time{suffix}.png"))

        # --- learning curves: mean over seeds with its interval as a band; one panel per keep, `full` in each
        keeps = sorted({float(k) for k in part.loc[part["selector"] != "full", "keep"]}, reverse=True) or [1.0]
        metrics = ["accuracy"] + (["score"] if has_partial_credit(part) else [])
        for metric in metrics:
            cpart = _part(curve_df, combo)
            cpart = cpart[cpart["metric"] == metric] if len(cpart) else cpart
            if not len(cpart):
                continue
            fig, axes = plt.subplots(1, len(keeps), figsize=(3.6 * len(keeps) + 1.6, 4), sharey=True, squeeze=False)
            for ax, keep in zip(axes[0], keeps):
                shown = cpart[(cpart["selector"] == "full") | ((cpart["selector"] != "full") & (cpart["keep"] == keep))]
                for (sel, k), sub in shown.groupby(["selector", "keep"]):
                    sub = sub.sort_values("step")
                    ax.plot(sub["step"], sub["mean"], color=style.colour[sel], ls=style.line.get(float(k), "-"), lw=1.6)
                    band = sub.dropna(subset=["lo", "hi"])
                    if len(band):
                        ax.fill_between(band["step"], band["lo"], band["hi"], color=style.colour[sel], alpha=0.12, lw=0)
                ax.set_title(f"keep {keep:g}" if keep != 1.0 or len(keeps) > 1 else title)
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel(f"eval/{metric}\n(mean over seeds, band: 95% interval)")
            fig.suptitle(title, y=1.03)
            style.legend(axes[0][-1], part)
            written.append(_save(fig, out_dir / f"{metric}_over_steps{suffix}.png"))
    return written


def _yerr(sub: pd.DataFrame, col: str, lo: str, hi: str):
    low = (sub[col] - sub[lo]).fillna(0).clip(lower=0)
    high = (sub[hi] - sub[col]).fillna(0).clip(lower=0)
    return np.vstack([low.to_numpy(dtype=float), high.to_numpy(dtype=float)])


def _err1(m: float, lo: float, hi: float):
    return None if math.isnan(lo) else np.array([[m - lo], [hi - m]])


# ---------------------------------------------------------------- the whole report


@dataclass
class Report:
    """Everything `tipdistill report` computes; the evidence writer reuses it."""

    runs: pd.DataFrame
    table: pd.DataFrame
    curves: pd.DataFrame
    mem_floor_gib: float = MEM_FLOOR_GIB
    plots: list[Path] = field(default_factory=list)


def load_report(paths: list[Path], mem_floor_gib: float = MEM_FLOOR_GIB) -> Report:
    """Find and read every run under `paths`; aggregate; no files written."""
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
    table = aggregate(runs, mem_floor_gib)
    return Report(runs, table, curves(runs, histories), mem_floor_gib)


def report_markdown(rep: Report) -> str:
    """report.md: one table per (task, model, loss), with the interval and memory rules stated above."""
    table = rep.table
    lines = [f"{len(rep.runs)} runs. {INTERVAL_RULE}", "", MEM_RULE.format(floor=rep.mem_floor_gib), ""]
    all_combos = combos(table)
    for combo in all_combos:
        part = _part(table, combo)
        if len(all_combos) > 1:
            lines += [f"## {' / '.join(map(str, combo))}", ""]
        else:
            lines += [", ".join(f"{k}={v}" for k, v in zip(REF_KEYS, combo)), ""]
        lines.append(to_markdown(display_table(part, rep.mem_floor_gib)))
    return "\n".join(lines)


def write_report(rep: Report, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rep.table.to_csv(out_dir / "report.csv", index=False)
    rep.runs.to_csv(out_dir / "runs.csv", index=False)
    rep.curves.to_csv(out_dir / "curves.csv", index=False)
    (out_dir / "report.md").write_text(report_markdown(rep))
    rep.plots = _plots(rep.table, rep.curves, out_dir, rep.mem_floor_gib)


def build_report(paths: list[Path], out_dir: Path, mem_floor_gib: float = MEM_FLOOR_GIB) -> pd.DataFrame:
    """Find runs under `paths`, write report.csv/runs.csv/curves.csv/report.md/PNGs into `out_dir`, return the table."""
    rep = load_report(paths, mem_floor_gib)
    write_report(rep, Path(out_dir))
    return rep.table
