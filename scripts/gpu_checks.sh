#!/usr/bin/env bash
# One prepared GPU check for a device session (issue 5), run in a single call from the repo root:
#   bash scripts/gpu_checks.sh
# 1) the update-step benchmark on the CUDA preset (Qwen2.5-0.5B-shaped student, Qwen2.5-1.5B-shaped
#    teacher, bf16, 8 x 1024 response tokens, V = 151,936), all 11 configurations;
# 2) if time is left, the target configurations again with student gradient checkpointing.
# Bounded to about 6.5 minutes of command time (each pass has its own --budget; later configs are
# skipped, the table is still printed). Results go to $OUT (the device tool brings them back) or
# outputs/gpu_checks. Needs only torch + transformers: the benchmark times tipdistill.update.update_step,
# which imports without Hydra/omegaconf/wandb/vLLM (tests/test_imports.py checks it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEST="${OUT:-outputs/gpu_checks}"
mkdir -p "$DEST"
START=$(date +%s)

"$PY" - <<'EOF' 2>&1 | tee "$DEST/env.txt"
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"card: {torch.cuda.get_device_name()} ({p.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}) | transformers {transformers.__version__}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_checks: CUDA/torch check failed"; exit 1; }

echo "=== pass 1: all configurations, no gradient checkpointing ==="
"$PY" scripts/bench_update.py --device cuda --phases --budget 270 --out "$DEST/bench_update_cuda" 2>&1 \
  | tee "$DEST/bench_update_cuda.log"
rc1=${PIPESTATUS[0]}

ELAPSED=$(( $(date +%s) - START ))
if [ "$ELAPSED" -lt 240 ]; then
  echo "=== pass 2: student gradient checkpointing (target configurations), ${ELAPSED} s elapsed ==="
  "$PY" scripts/bench_update.py --device cuda --grad-ckpt --phases --budget 140 \
    --configs peer,full,entropy@0.5,type_aware@0.5,entropy@0.2,type_aware@0.2 \
    --out "$DEST/bench_update_cuda_gradckpt" 2>&1 | tee "$DEST/bench_update_cuda_gradckpt.log"
else
  echo "=== pass 2 skipped: ${ELAPSED} s elapsed ==="
fi
echo "gpu_checks: done in $(( $(date +%s) - START )) s (pass 1 rc=$rc1); results in $DEST"
exit "$rc1"
