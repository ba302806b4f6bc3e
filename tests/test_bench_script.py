"""scripts/bench_update.py stays runnable: a tiny batch, two configurations, the table and the target
lines are printed. (The targets themselves are the benchmark's job on realistic shapes, not a test's.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_update_runs_and_reports(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--configs", "peer,full,type_aware@0.5",
                          "--batch", "1", "--resp-len", "16", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| peer | 1.0 | 16 |" in out.stdout and "| type_aware@0.5 | 0.5 | 8 |" in out.stdout
    assert "peak memory reduced by >= 47% at keep 0.5 vs peer:" in out.stdout
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows  # machine-readable copy written
