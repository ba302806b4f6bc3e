"""evidence: verdicts on the TIP paper's claims, computed from a report's runs, written as one markdown file.

`tipdistill report <grid dir> --results docs/results.md` calls `write_results`. Every number in that
file comes from the run directories (and, for the commands, machine and wall time, from the
`grid.json` that scripts/evidence_grid.py keeps); nothing is typed by hand. Each claim is a set of
differences A - B between two configurations of one task, each with its 95% interval paired over the
seeds both have, and a verdict by the rule in tipdistill/stats.py (VERDICT_RULE).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tipdistill.report import (INTERVAL_RULE, MEM_RULE, METRICS, REF_KEYS, Report, by_seed, combos, display_table,
                               fmt_interval, has_partial_credit, to_markdown, _part)
from tipdistill.stats import NO_DATA, VERDICT_RULE, combine, difference, verdict

FULL = ("full", 1.0)
# (c) claims a small gap, not a gain: it holds when Q3 at 10% is at most this far below all tokens
NEAR_MARGIN = 0.02
OTHER_RULES = ("random", "entropy", "entropy_topk", "divergence", "q3", "type_aware_bottom")


@dataclass(frozen=True)
class Comparison:
    """The claim `metric(A) - metric(B) > bound` on one task; A and B are (selector, keep)."""

    task: str
    a: tuple[str, float]
    b: tuple[str, float]
    bound: float = 0.0

    def label(self) -> str:
        name = lambda c: "full" if c[0] == "full" else f"{c[0]}@{c[1]:g}"  # noqa: E731
        tail = "" if self.bound == 0 else f" (bound {self.bound:+g})"
        return f"{name(self.a)} − {name(self.b)}{tail}"


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the paper's statement, in the words
    comparisons: tuple[Comparison, ...]
    tested: str = ""  # how a claim of several comparisons is tested, in words

    def tested_as(self) -> str:
        return self.tested or "; ".join(c.label() for c in self.comparisons)


CLAIMS = (
    Claim("a", "entropy sampling at 50% is at least as good as all tokens",
          (Comparison("arithmetic", ("entropy", 0.5), FULL),)),
    Claim("b", "type-aware Soft-OR at 50% and 20% is the best selective rule",
          tuple(Comparison("arithmetic", ("type_aware", k), (other, k)) for k in (0.5, 0.2) for other in OTHER_RULES),
          tested=f"type_aware − each other rule ({', '.join(OTHER_RULES)}) at the same keep, 0.5 and 0.2"),
    Claim("c", f"Q3-only at 10% nearly matches all tokens (tested as: at most {NEAR_MARGIN:g} below)",
          (Comparison("arithmetic", ("q3", 0.1), FULL, bound=-NEAR_MARGIN),)),
    Claim("d", "the top half by Soft-OR beats the bottom half",
          (Comparison("arithmetic", ("type_aware", 0.5), ("type_aware_bottom", 0.5)),)),
    Claim("e", "Q3-only at 20% beats all tokens on planning",
          (Comparison("planning", ("q3", 0.2), FULL),)),
)


def _runs_of(runs: pd.DataFrame, combo: tuple, cfg: tuple[str, float]) -> pd.DataFrame:
    part = _part(runs, combo)
    return part[(part["selector"] == cfg[0]) & ((part["keep"] - cfg[1]).abs() < 1e-9)]


def compare(runs: pd.DataFrame, combo: tuple, comp: Comparison, metric: str = "acc") -> dict:
    """One row: the difference A - B of a final metric on `combo`, its interval and the verdict."""
    col = METRICS[metric]
    a, b = _runs_of(runs, combo, comp.a), _runs_of(runs, combo, comp.b)
    iv = difference(by_seed(a, col), by_seed(b, col))
    return {"task": combo[0], "comparison": comp.label(), "metric": metric, "bound": comp.bound,
            "seeds_a": len(a), "seeds_b": len(b), "n": iv.n, "kind": iv.kind if iv.n else "",
            "mean": iv.mean, "lo": iv.lo, "hi": iv.hi, "verdict": verdict(iv, comp.bound)}


def _task_combos(runs: pd.DataFrame, task: str) -> list[tuple]:
    return [c for c in combos(runs) if c[0] == task] or [(task, "?", "?")]


def claim_rows(runs: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """Every comparison of every claim, on each (model, loss) combination of the claim's task."""
    rows = []
    for claim in CLAIMS:
        for comp in claim.comparisons:
            for combo in _task_combos(runs, comp.task):
                rows.append({"claim": claim.key, **compare(runs, combo, comp, metric), "model": combo[1], "loss": combo[2]})
    return pd.DataFrame(rows)


def claim_verdicts(detail: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: the combined verdict of its comparisons (see VERDICT_RULE)."""
    out = []
    for claim in CLAIMS:
        sub = detail[detail["claim"] == claim.key]
        row = {"claim": f"({claim.key})", "statement": claim.text, "tested as": claim.tested_as(),
               "task": ", ".join(dict.fromkeys(sub["task"])), "pairs": "", "difference [95% CI]": ""}
        if len(sub) == 1:
            r = sub.iloc[0]
            row.update({"pairs": _pairs(r), "difference [95% CI]": fmt_interval(r["mean"], r["lo"], r["hi"], signed=True)})
        else:
            counts = sub["verdict"].value_counts()
            row["difference [95% CI]"] = f"{len(sub)} comparisons: " + ", ".join(f"{n} {v}" for v, n in counts.items())
        row["verdict"] = combine(sub["verdict"])
        out.append(row)
    return pd.DataFrame(out)


def _pairs(r: pd.Series) -> str:
    if not r["n"]:
        return "0"
    return f"{r['n']:.0f}" + (" (unpaired, Welch)" if r["kind"] == "welch" else "")


def random_controls(runs: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """Each selective rule against `random` at the same keep, wherever both were run."""
    rows = []
    for combo in combos(runs):
        part = _part(runs, combo)
        configs = sorted({(r.selector, float(r.keep)) for r in part.itertuples(index=False)}, key=lambda c: (-c[1], c[0]))
        for sel, keep in configs:
            if sel in ("full", "random") or ("random", keep) not in configs:
                continue
            rows.append({**compare(runs, combo, Comparison(combo[0], (sel, keep), ("random", keep)), metric),
                         "model": combo[1], "loss": combo[2]})
    return pd.DataFrame(rows)


def _detail_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Comparison rows as shown: the difference with its interval, the number of seed pairs, the verdict."""
    cols = (["claim"] if "claim" in rows else []) + ["task", "comparison", "metric"]
    shown = rows[cols].copy() if len(rows) else pd.DataFrame(columns=cols)
    if "claim" in shown:
        shown["claim"] = [c if len(str(c)) > 1 else f"({c})" for c in shown["claim"]]
    shown["pairs"] = [_pairs(r) for _, r in rows.iterrows()]
    shown["difference [95% CI]"] = [fmt_interval(r["mean"], r["lo"], r["hi"], signed=True) for _, r in rows.iterrows()]
    shown["verdict"] = list(rows["verdict"]) if len(rows) else []
    return shown


def supplementary(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The claims on greedy accuracy; claims and random controls on the constraint score where it differs from accuracy."""
    parts = [claim_rows(runs, "greedy")]
    credit = [t for t in dict.fromkeys(table["task"]) if has_partial_credit(table[table["task"] == t])]
    if credit:
        parts += [claim_rows(runs, "score"), random_controls(runs, "score").assign(claim="control")]
    parts = [p[p["task"].isin(table["task"])] for p in parts if len(p)]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(out):
        out = out[(out["metric"] != "score") | out["task"].isin(credit)].reset_index(drop=True)
    return out


# ---------------------------------------------------------------- how the grid ran


def find_grid_logs(paths: list[Path]) -> list[dict]:
    """The grid.json files (scripts/evidence_grid.py) at or under the given paths."""
    found: dict[Path, dict] = {}
    for path in map(Path, paths):
        for p in [path / "grid.json", *path.rglob("grid.json")]:
            if p.is_file() and p.resolve() not in found:
                found[p.resolve()] = json.loads(p.read_text())
    return list(found.values())


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def completeness(grids: list[dict], n_runs: int) -> list[str]:
    """A line saying the grid is unfinished when its last sitting planned more jobs than have results:
    verdicts over fewer seeds than planned must not read as the grid's final word."""
    planned = sum(g["sittings"][-1].get("planned", 0) for g in grids if g.get("sittings"))
    if not planned or n_runs >= planned:
        return []
    last = [g["sittings"][-1]["command"] for g in grids if g.get("sittings")]
    return [f"**Partial grid: {n_runs} of {planned} planned jobs have finished.** The verdicts below use the seeds "
            f"present; `{last[-1]}` continues the grid (finished jobs are skipped), then rerun this command.", ""]


def provenance(grids: list[dict], runs: pd.DataFrame, report_command: list[str]) -> list[str]:
    """Markdown lines: the commands, the machine and the wall time, all read from grid.json and the runs."""
    lines = ["## How these numbers were produced", ""]
    sittings = [s for g in grids for s in g.get("sittings", [])]
    if sittings:
        lines += ["Commands, one per sitting (a rerun skips finished jobs), then the report:", "", "```bash"]
        lines += [s["command"] for s in sittings] + [" ".join(report_command), "```", ""]
        machines = {json.dumps(s.get("machine", {}), sort_keys=True): s.get("machine", {}) for s in sittings}
        for m in machines.values():  # one line per distinct machine, fields in the order the grid wrote them
            lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in m.items()) + ".")
        lines.append("")
        lines += ["| sitting | started | finished | wall | jobs run | skipped (already done) | failed | jobs side by side | threads per job | load average at start / end |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        total = 0.0
        for i, s in enumerate(sittings, 1):
            wall = float(s.get("wall_s") or 0.0)
            total += wall
            load = f"{_load(s.get('load_start'))} / {_load(s.get('load_end'))}"
            lines.append(f"| {i} | {s.get('started', '')} | {s.get('finished') or 'did not finish'} | {_hours(wall)} | {s.get('ran', 0)} | "
                         f"{s.get('skipped', 0)} | {s.get('failed', 0)} | {s.get('jobs_parallel', '')} | {s.get('threads_per_job', '')} | {load} |")
        lines += ["", f"Grid wall time, all sittings: {_hours(total)}."]
    else:
        lines += ["No grid.json under the given paths: commands, machine and grid wall time were not recorded "
                  "(these runs did not come from scripts/evidence_grid.py).", "", "Report command:", "", "```bash",
                  " ".join(report_command), "```", ""]
    per_task = runs.groupby("task")["wall_s"].agg(["sum", "count"])
    lines.append("Sum of the jobs' own wall times (summary.json): "
                 + "; ".join(f"{t}: {_hours(r['sum'])} over {r['count']:.0f} runs" for t, r in per_task.iterrows()) + ".")
    return lines + [""]


def _load(v) -> str:
    return "" if not v else "/".join(f"{x:.2f}" for x in v)


# ---------------------------------------------------------------- the file


def write_results(rep: Report, paths: list[Path], out_md: Path, command: list[str]) -> Path:
    """docs/results.md: verdicts, the random control, per-task tables and plots, provenance and method."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out_md.parent / f"{out_md.stem}_figures"
    fig_dir.mkdir(exist_ok=True)
    for p in rep.plots:
        shutil.copy2(p, fig_dir / p.name)

    runs, table = rep.runs, rep.table
    detail = claim_rows(runs)
    controls = random_controls(runs)
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    md = ["# Results: token selection on the embedded tasks, with intervals over seeds", "",
          f"_Written by `{' '.join(command)}` on {now} from {len(runs)} runs. Do not edit by hand: rerun the command._", "",
          *completeness(find_grid_logs(paths), len(runs)),
          "## Verdicts on the paper's claims", "",
          "Metric: final held-out sampled accuracy (`eval/accuracy_end`); planning counts fully valid plans. "
          "Difference: A − B paired over the seeds both configurations have.", "", VERDICT_RULE, "",
          to_markdown(claim_verdicts(detail)),
          "Every comparison behind the verdicts:", "", to_markdown(_detail_table(detail)),
          "## The control the paper lacks: each rule against random selection at the same keep", "",
          "Verdict of the claim `rule − random > 0`, by the same rule.", "",
          to_markdown(_detail_table(controls)) if len(controls) else "No configuration shares a keep with a `random` run.\n"]

    sup = supplementary(runs, table)
    if len(sup):
        md += ["### The same comparisons on the other metrics (for information; the verdicts above use sampled accuracy)", "",
               "greedy = greedy accuracy; score = mean share of constraints met (tasks with partial credit only).", "",
               to_markdown(_detail_table(sup))]

    all_combos = combos(table)
    for combo in all_combos:
        part = _part(table, combo)
        steps = sorted({int(s) for s in _part(runs, combo)["steps"].dropna()})
        md += [f"## {combo[0]} ({'/'.join(map(str, combo[1:]))}, {', '.join(map(str, steps))} steps, "
               f"{len(_part(runs, combo))} runs)", "", to_markdown(display_table(part, rep.mem_floor_gib, brief=True)),
               "<details><summary>all columns</summary>", "", to_markdown(display_table(part, rep.mem_floor_gib)), "</details>", ""]
        suffix = "" if len(all_combos) == 1 else "_" + "_".join(str(c) for c in combo)
        for stem, caption in (("accuracy_over_steps", "learning curves (mean over seeds, band: 95% interval)"),
                              ("score_over_steps", "constraint score over steps"),
                              ("accuracy_vs_update_time", "accuracy against update time per step (95% intervals)"),
                              ("accuracy_vs_keep", "final accuracy against keep"),
                              ("memory_vs_keep", "update peak memory against keep")):
            name = f"{stem}{suffix}.png"
            if (fig_dir / name).is_file():
                md += [f"![{combo[0]}: {caption}]({fig_dir.name}/{name})", ""]

    md += provenance(find_grid_logs(paths), runs, command)
    md += ["## Method", "", INTERVAL_RULE, "", VERDICT_RULE, "", MEM_RULE.format(floor=rep.mem_floor_gib), "",
           "Update time is the median over steps of `time/update_s` (student forward, kept-token loss, backward, AdamW; "
           "the no-grad statistics pass and selection are `time/select_s`), then the mean over seeds.", ""]
    missing = detail[detail["verdict"] == NO_DATA]
    if len(missing):
        md += [f"Comparisons without data ({len(missing)}): a side has fewer than two seeds or was not run.", ""]
    out_md.write_text("\n".join(md))
    return out_md
