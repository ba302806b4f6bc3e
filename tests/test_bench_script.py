"""scripts/bench_update.py times the training code itself: a tiny batch through the configurations
checks that its `full` path is `update_step` (same loss as both peer all-token updates on the same
weights, the update step's own phases timed) and that the table and target lines are printed. (The
targets themselves are the benchmark's job on realistic shapes, not a test's.)"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tipdistill.update import PHASES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration  # three fresh processes with 152k-wide heads


def test_bench_update_times_the_update_step_and_reports(tmp_path):
    has_trl = importlib.util.find_spec("trl") is not None  # the optional `bench` extra
    configs = "peer,trl,full,type_aware@0.5" if has_trl else "peer,full,type_aware@0.5"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--configs", configs,
                          "--batch", "1", "--resp-len", "16", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| peer | 1.0 | 16 |" in out.stdout and "| type_aware@0.5 | 0.5 | 8 |" in out.stdout
    assert "update time at keep 0.5 <= 0.45x peer:" in out.stdout
    assert "peak memory above baseline <= 0.10x peer's at every keep:" in out.stdout
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    peer, full, half = results["peer"], results["full"], results["type_aware@0.5"]
    # Same models, batch and optimizer: the all-token loss of update_step equals the peer's formula.
    assert full["loss"] == pytest.approx(peer["loss"], rel=1e-4) and full["loss"] > 0
    if has_trl:  # TRL's own generalized_jsd_loss (beta = 1: reverse KL) on the full logits: the same number
        assert results["trl"]["loss"] == pytest.approx(peer["loss"], rel=1e-4)
    assert (full["kept"], half["kept"], half["tokens"]) == (16, 8, 16)
    assert set(half["phase_time_s"]) == set(PHASES)  # update_step's own phases
    assert set(full["phase_time_s"]) == set(PHASES) - {"statistics"}  # full's statistics come from its loss pass
    assert half["kept_rkl_mean"] != half["rkl_mean"]  # a real selection from real statistics
