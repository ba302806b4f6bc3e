#!/usr/bin/env python
"""World-size-1 FSDP2 check of the update step (issue 13), for a machine with one GPU.

The same update steps on one fixed batch, run twice: as one process (`LocalRuntime`) and as a 1-rank
FSDP2 job (`DistributedRuntime`: the student sharded with its embedding/head unit and fp32 master shards
under a bf16 `MixedPrecisionPolicy`, the teacher sharded with its head resident, the loss's head chunks
outside FSDP's hooks). Prints a short table: per runtime the median step time, peak memory, loss and
gradient norm of each step, and the largest weight difference from the one-process run after the last
step (one rank: the same numbers up to bf16 rounding order).

    python scripts/fsdp_check.py                  # CUDA: Qwen2.5-0.5B-shaped student, 1.5B-shaped teacher, bf16 compute
    python scripts/fsdp_check.py --device cpu     # a tiny smoke run (seconds)

Needs torch and transformers only; starts its own 1-process group unless run under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tipdistill.config import LossConfig, ModelConfig, ScoringConfig, SelectorConfig, TrainConfig  # noqa: E402
from tipdistill.precision import precision  # noqa: E402
from tipdistill.runtime import LocalRuntime  # noqa: E402
from tipdistill.teacher import Teacher  # noqa: E402
from tipdistill.types import Rollout  # noqa: E402
from tipdistill.update import Heads, make_optimizer, update_step  # noqa: E402

PRESETS = {
    "cuda": dict(vocab=151_936, batch=8, prompt_len=64, resp_len=1024, chunk=512,
                 student=dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
                 teacher=dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)),
    "cpu": dict(vocab=2048, batch=4, prompt_len=16, resp_len=48, chunk=64,
                student=dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128),
                teacher=dict(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=192)),
}


def join_one_process_group() -> None:
    """Outside torchrun: a world of one, as torchrun would describe it."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tipdistill.distributed import start

    start()


def build(p: dict, shape: dict, seed: int, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=p["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      max_position_embeddings=max(4096, p["prompt_len"] + p["resp_len"]), tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def batch(p: dict, device: torch.device) -> Rollout:
    B, Lp, T = p["batch"], p["prompt_len"], p["resp_len"]
    ids = torch.randint(0, p["vocab"], (B, Lp + T), generator=torch.Generator().manual_seed(1234))
    lengths = torch.linspace(T // 2, T, B).long()  # ragged responses: padding and masks are exercised
    mask = torch.arange(T)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(B, Lp, dtype=torch.long), mask.long()], 1)
    return Rollout(ids.to(device), attention.to(device), mask.to(device), Lp, torch.zeros(B, dtype=torch.bool), torch.arange(B))


def run(kind: str, p: dict, cfg: TrainConfig, device: torch.device, steps: int) -> dict:
    from tipdistill.distributed import DistributedRuntime

    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        runtime = DistributedRuntime(device, precision(cfg), 0, 1, init_device_mesh(device.type, (1,)))
    else:
        runtime = LocalRuntime(device, precision(cfg))
    student = build(p, p["student"], 1, torch.float32, device).train(True).requires_grad_(True)  # fp32 master weights
    teacher = build(p, p["teacher"], 2, runtime.precision.compute, device).train(False).requires_grad_(False)
    if kind == "fsdp2":
        runtime.shard(student, trainable=True)
        runtime.shard(teacher, trainable=False)
    heads = Heads(runtime.lm_head(student), teacher.get_output_embeddings())
    optimizer, scheduler = make_optimizer(cfg, student)
    rollout = batch(p, device)
    t_hidden = Teacher(teacher, runtime).hidden_states(rollout, cfg.micro_batch_size)
    cuda = device.type == "cuda"
    times, peaks, losses, norms = [], [], [], []
    for step in range(1, steps + 1):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = update_step(student, heads, rollout, t_hidden, optimizer, scheduler, cfg=cfg, step=step, runtime=runtime)
        if cuda:
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
        times.append(time.perf_counter() - t0)
        losses.append(result.metrics["train/loss"])
        norms.append(result.metrics["optim/grad_norm"])
    weights = {name: t.detach().float().cpu() for name, t in runtime.full_weights(student)}
    del student, teacher, optimizer, t_hidden
    if cuda:
        torch.cuda.empty_cache()
    return {"runtime": kind, "median_step_s": statistics.median(times[1:] or times), "peak_gib": max(peaks) if peaks else None,
            "loss": losses, "grad_norm": norms, "kept": result.metrics["train/kept_tokens"], "weights": weights}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--selector", default="type_aware")
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/fsdp_check"))
    args = ap.parse_args()
    device = torch.device(args.device)
    p = PRESETS["cuda" if device.type == "cuda" else "cpu"]
    join_one_process_group()
    cfg = TrainConfig(model=ModelConfig(dtype="bfloat16"), selector=SelectorConfig(name=args.selector), keep=args.keep,
                      micro_batch_size=p["batch"], scoring=ScoringConfig(chunk_size=p["chunk"]), loss=LossConfig(chunk_size=p["chunk"]),
                      device=device.type)
    rows = [run(kind, p, cfg, device, args.steps) for kind in ("local", "fsdp2")]
    ref = rows[0]["weights"]
    print(f"update step, {args.selector}@{args.keep}, B={p['batch']} x T={p['resp_len']}, V={p['vocab']}, bf16 compute over fp32 "
          f"master weights, {args.steps} steps, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print("| runtime | median step s | peak GiB | loss per step | grad norm per step | max abs weight diff vs local |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = max(float((r["weights"][k] - ref[k]).abs().max()) for k in ref)
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['runtime']} | {r['median_step_s']:.3f} | {peak} | {', '.join(f'{x:.5f}' for x in r['loss'])} | "
              f"{', '.join(f'{x:.4f}' for x in r['grad_norm'])} | {diff:.2e} |")
        r["max_weight_diff"] = diff
        del r["weights"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fsdp_check.json").write_text(json.dumps(rows, indent=1))
    from tipdistill.distributed import finish

    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
