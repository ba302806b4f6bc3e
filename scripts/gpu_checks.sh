#!/usr/bin/env bash
# One prepared GPU check for a device session (issues 5 and 15), run in a single call from the repo root:
#   bash scripts/gpu_checks.sh
# Bounded to about 8.5 minutes of command time (each step has its own budget or timeout); every step
# prints a short table, all of it lands in $OUT (the device tool brings it back) or outputs/gpu_checks.
#  0) a world-size-1 FSDP2 run of the update step (issue 13, scripts/fsdp_check.py): the same steps as one
#     process and as a 1-rank FSDP2 job (sharded student and teacher, bf16 MixedPrecisionPolicy over fp32
#     master shards, the fused head on the unsharded head weight): step time, peak memory, losses and
#     the weight difference;                                                                  <= 150 s
#  1) correctness of the fused LM-head loss on CUDA: bf16 autocast over an fp32 head and fp32, against
#     float64 (tests/test_fused_head.py's checks, on the device);                              ~20 s
#  2) the chunk size of the fused pass on this GPU (scripts/bench_chunk.py; its pick goes into
#     tipdistill/fused_head.py CHUNK_ROWS["cuda"] / BLOCK_ROWS["cuda"]);                      ~60 s
#  3) the update-step benchmark on the CUDA preset (Qwen2.5-0.5B-shaped student, 1.5B-shaped teacher,
#     8 x 1024 response tokens, V = 151,936, fp32 master student under bf16 autocast, teacher bf16):
#     both peers (peer-style, TRL's generalized_jsd_loss), full and the selective keeps;      ~200 s
#  4) Liger-Kernel's fused linear JSD against ours on kept rows (scripts/bench_liger.py).     ~40 s
#  5) `bash scripts/gpu_checks.sh profile` runs only this one: where a warm update step's time goes
#     (bench_update.py --profile: per-phase times with syncs, device busy time against wall time, top
#     aten ops) for peer, full and the selective keeps at 0.2, with and without grad ckpt.       ~150 s
# Needs torch + transformers (the update step imports without Hydra/omegaconf/wandb/vLLM). The GPU box
# has no network: TRL (step 3's second peer) and Liger-Kernel (step 4) are pure Python, so stage them
# here and carry the folder along (run's carry: [".gpu_deps"]); steps without them say so and go on:
#   pip install --no-deps --target .gpu_deps liger-kernel==0.8.5 trl==1.16.0
#   pip install --no-deps --target .gpu_deps --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 --platform any datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (TRL imports datasets, which the GPU image lacks; its Python is 3.12). Run there as
#   bash scripts/gpu_checks.sh; then tar $OUT into one file: the device tool brings back 8 files at most.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEST="${OUT:-outputs/gpu_checks}"
mkdir -p "$DEST"
[ -d .gpu_deps ] && export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export TRL_EXPERIMENTAL_SILENCE=1
START=$(date +%s)

"$PY" - <<'EOF' 2>&1 | tee "$DEST/env.txt"
import importlib.util, torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
extra = {m: importlib.util.find_spec(m) is not None for m in ("trl", "liger_kernel", "triton")}
print(f"card: {torch.cuda.get_device_name()} ({p.total_memory / 2**30:.0f} GiB) | torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}) | transformers {transformers.__version__} | importable: {extra}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_checks: CUDA/torch check failed"; exit 1; }

if [ "${1:-all}" = profile ]; then
  echo "=== 5) where a warm update step's time goes (torch.profiler) ==="
  "$PY" scripts/bench_update.py --device cuda --profile --budget 110 --configs peer,full,type_aware@0.2,q3@0.2 \
    --out "$DEST/profile_update_cuda" 2>&1 | tee "$DEST/profile_update_cuda.log"
  rc=${PIPESTATUS[0]}
  "$PY" scripts/bench_update.py --device cuda --profile --grad-ckpt --budget 80 --configs peer,full,type_aware@0.2 \
    --out "$DEST/profile_update_cuda_gradckpt" 2>&1 | tee "$DEST/profile_update_cuda_gradckpt.log"
  echo "gpu_checks profile: done in $(( $(date +%s) - START )) s (rc=$rc, grad ckpt rc=${PIPESTATUS[0]}); results in $DEST"
  exit "$rc"
fi

echo "=== 0) world-size-1 FSDP2 vs one process (update step) ==="
timeout 150 "$PY" scripts/fsdp_check.py --device cuda --out "$DEST/fsdp_check" 2>&1 | tee "$DEST/fsdp_check.log"
rc_fsdp=${PIPESTATUS[0]}

echo "=== 1) fused loss on CUDA against float64 ==="
timeout 60 "$PY" - <<'EOF' 2>&1 | tee "$DEST/fused_correctness.txt"
import sys, torch
sys.path.insert(0, ".")
from tipdistill.fused_head import kept_token_loss
from tipdistill.losses import naive_masked_loss
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
K, Hs, Ht, V = 300, 64, 96, 151936
print("| compute | divergence | loss rel err | grad_h rel err | grad_W rel err |")
print("|---|---|---|---|---|")
for compute in (torch.float32, torch.bfloat16):
    Ws, Wt = 0.05 * torch.randn(V, Hs, generator=g), 0.05 * torch.randn(V, Ht, generator=g)
    hs, ht = 3 * torch.randn(1, K, Hs, generator=g), 3 * torch.randn(1, K, Ht, generator=g)
    keep = torch.ones(1, K, dtype=torch.bool, device=dev)
    for div in ("reverse_kl", "forward_kl", "jsd"):
        out = []
        for dtype, fn, kw in ((torch.float64, naive_masked_loss, {}), (torch.float32, kept_token_loss, {"chunk_size": 128})):
            s_head = torch.nn.Linear(Hs, V, bias=False, device=dev, dtype=dtype)
            t_head = torch.nn.Linear(Ht, V, bias=False, device=dev, dtype=dtype).requires_grad_(False)
            rnd = (lambda x: x.to(compute).to(dtype)) if dtype == torch.float64 else (lambda x: x.to(dtype))
            with torch.no_grad():
                s_head.weight.copy_(rnd(Ws)); t_head.weight.copy_(rnd(Wt))
            h = rnd(hs).to(dev).requires_grad_(True)
            with torch.autocast("cuda", dtype=compute, enabled=compute != torch.float32 and dtype != torch.float64):
                loss, n = fn(h, rnd(ht).to(dev), keep, s_head, t_head, div, 0.5, **kw)
            (loss / n).backward()
            out.append([loss.detach().double(), h.grad.double(), s_head.weight.grad.double()])
        errs = [float((a - b).norm() / b.norm()) for a, b in zip(out[1], out[0])]
        print(f"| {str(compute).removeprefix('torch.')} | {div} | {errs[0]:.1e} | {errs[1]:.1e} | {errs[2]:.1e} |", flush=True)
        assert all(e < (1e-5 if compute == torch.float32 else 2e-2) for e in errs), f"fused loss off on CUDA: {errs}"
EOF
rc0=${PIPESTATUS[0]}

echo "=== 2) chunk size of the fused pass on this GPU ==="
timeout 90 "$PY" scripts/bench_chunk.py --device cuda 2>&1 | tee "$DEST/bench_chunk_cuda.txt"
CHUNK=$(sed -n 's/^BENCH_CHUNK cuda chunk=\([0-9]*\) block=\([0-9]*\)$/\1/p' "$DEST/bench_chunk_cuda.txt")

echo "=== 3) update-step benchmark, CUDA preset, both peers${CHUNK:+, chunk $CHUNK} ==="
"$PY" scripts/bench_update.py --device cuda --phases --budget 210 ${CHUNK:+--chunk "$CHUNK"} \
  --configs peer,trl,full,type_aware@0.5,q3@0.5,type_aware@0.2,q3@0.2,type_aware@0.1 \
  --out "$DEST/bench_update_cuda" 2>&1 | tee "$DEST/bench_update_cuda.log"
rc1=${PIPESTATUS[0]}

echo "=== 4) Liger-Kernel fused linear JSD vs ours ==="
timeout 75 "$PY" scripts/bench_liger.py --device cuda 2>&1 | tee "$DEST/bench_liger.txt"

echo "gpu_checks: done in $(( $(date +%s) - START )) s (fsdp rc=$rc_fsdp, correctness rc=$rc0, benchmark rc=$rc1); results in $DEST"
[ "$rc_fsdp" -eq 0 ] && [ "$rc0" -eq 0 ] && [ "$rc1" -eq 0 ]
