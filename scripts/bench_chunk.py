#!/usr/bin/env python
"""Chooses the fused LM-head pass's chunk size (and, on CPU, its row-block size) for this device by
measurement: `tipdistill.fused_head.CHUNK_ROWS` / `BLOCK_ROWS` hold the values it picked.

For each (chunk, block) it times, on the benchmark preset's shapes (bench_update.py: V = 151,936; CPU
4 x 512 positions, student H 128, teacher H 192, fp32; CUDA 8 x 1024 positions, H 896 / 1536, bf16
autocast over an fp32 student head), the two passes an update step runs over its positions:
  stats  the statistics pass (h and rkl of every position, no grad): what a selective keep pays on all tokens
  loss   the fused loss with its gradients over every position (selector=full, statistics included)
with a fresh workspace per pass, as update_step has, and reports the workspace's bytes (the pass's
memory above its inputs). The pick: the fastest stats + loss, unless a smaller chunk is within 5% of it
(less memory for the same time).

    python scripts/bench_chunk.py                      # CPU, ~3 min on 2 cores
    python scripts/bench_chunk.py --device cuda        # a GPU box (scripts/gpu_checks.sh runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the GPU machine has the tree but not the editable install

VOCAB = 151_936
SHAPES = {"cpu": dict(N=2048, Hs=128, Ht=192, chunks=(64, 128, 256, 512), blocks=(4, 8, 16, 64)),
          "cuda": dict(N=8192, Hs=896, Ht=1536, chunks=(256, 512, 1024, 2048), blocks=(128, 512, 2048))}


def main() -> int:
    import torch

    from tipdistill.fused_head import STATS, Workspace, head_pass, kept_token_loss
    import tipdistill.fused_head as fh

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--chunks", default=None, help="comma list of chunk sizes")
    ap.add_argument("--blocks", default=None, help="comma list of row-block sizes")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[args.device]
    chunks = [int(x) for x in args.chunks.split(",")] if args.chunks else shape["chunks"]
    blocks = [int(x) for x in args.blocks.split(",")] if args.blocks else shape["blocks"]
    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32

    g = torch.Generator().manual_seed(0)
    N, Hs, Ht = shape["N"], shape["Hs"], shape["Ht"]
    student_head = torch.nn.Linear(Hs, VOCAB, bias=False).to(device)  # fp32 master weights
    teacher_head = torch.nn.Linear(Ht, VOCAB, bias=False).to(device=device, dtype=compute).requires_grad_(False)
    with torch.no_grad():  # weights and hidden states of the scale a trained model has (logits of a few units)
        student_head.weight.copy_(0.02 * torch.randn(VOCAB, Hs, generator=g))
        teacher_head.weight.copy_((0.02 * torch.randn(VOCAB, Ht, generator=g)).to(compute))
    s_N_H = (torch.randn(N, Hs, generator=g) * 3).to(device)
    t_N_H = (torch.randn(N, Ht, generator=g) * 3).to(device=device, dtype=compute)
    keep_1_N = torch.ones(1, N, dtype=torch.bool, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def stats_pass(chunk):
        with torch.autocast(device.type, dtype=compute, enabled=cuda):
            head_pass(s_N_H, t_N_H, student_head, teacher_head, want=frozenset({"h", "rkl"}), chunk_rows=chunk, workspace=Workspace())

    def loss_pass(chunk):
        student_head.zero_grad(set_to_none=True)
        h = s_N_H[None].clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=compute, enabled=cuda):
            from tipdistill.types import TokenStats

            loss, n = kept_token_loss(h, t_N_H[None], keep_1_N, student_head, teacher_head, "reverse_kl", 0.5, chunk,
                                      stats_out=TokenStats.zeros(keep_1_N), workspace=Workspace())
        (loss / n).backward()

    rows = []
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"N={N}, V={VOCAB}, Hs={Hs}, Ht={Ht}, compute {str(compute).removeprefix('torch.')}", flush=True)
    print("| chunk | block | stats s | loss+grad s | total s | buffers MiB |")
    print("|---|---|---|---|---|---|")
    for chunk in chunks:
        for block in blocks:
            if block > chunk:
                continue
            fh.BLOCK_ROWS[device.type] = block
            ts, tl = timed(lambda: stats_pass(chunk)), timed(lambda: loss_pass(chunk))
            buf_mib = (2 * chunk + 4 * block) * VOCAB * 4 / 2**20
            rows.append((chunk, block, ts, tl, ts + tl, buf_mib))
            print(f"| {chunk} | {block} | {ts:.3f} | {tl:.3f} | {ts + tl:.3f} | {buf_mib:.0f} |", flush=True)
    best = min(rows, key=lambda r: r[4])
    pick = min((r for r in rows if r[4] <= 1.05 * best[4]), key=lambda r: (r[5], r[4]))
    print(f"\nfastest: chunk {best[0]}, block {best[1]} ({best[4]:.3f} s); "
          f"pick (smallest buffers within 5%): chunk {pick[0]}, block {pick[1]} ({pick[4]:.3f} s, {pick[5]:.0f} MiB)")
    print(f"BENCH_CHUNK {device.type} chunk={pick[0]} block={pick[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
