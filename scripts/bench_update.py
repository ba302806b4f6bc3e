#!/usr/bin/env python
"""Benchmark of one update step (issues 5, 15): peak memory and latency of two peer all-token updates
against tipdistill's update (selector=full and selective keeps), on one fixed batch.

What one "update step" is here, for every configuration: student forward with grad -> (ours: per-token
statistics no-grad chunked -> selection) -> divergence -> backward -> clip_grad_norm_ -> AdamW step ->
LR schedule -> zero_grad. Ours is `tipdistill.update.update_step` itself, the function the training loop
calls, under a `TrainConfig` of the defaults with one micro-batch (the whole batch) and the preset's
chunk; its phases are the ones it reports to the timer. The teacher's hidden states (stage 3, the same
for both paths) are computed once at setup by `tipdistill.teacher.Teacher` and are not timed. Two peers,
each with full student logits [B,T,V] with grad and full teacher logits [B,T,V] (no grad, projected inside
its step, on the response positions only: a peer projecting all prompt+response columns would use more):
  * `peer` (written out below, `peer_update`): reverse KL (`DIVERGENCES["reverse_kl"]`, fp32) over 64
    positions at a time (the divergence chunk of the paper's code base), masked mean;
  * `trl`: TRL's own `GKDTrainer.generalized_jsd_loss` on the full logits (beta = 1 is reverse KL, TRL's
    convention; the config's loss maps to its beta), labels -100 off the mask, summed then divided by the
    token count. Code this project did not write; needs the `bench` extra (`pip install trl`).
Both run under the same dtype policy as ours (`runtime.autocast()`).

Every configuration runs in a fresh subprocess (`--one <config>`), which prints one `BENCH_JSON {...}`
line; the parent builds the table. Models: Qwen2ForCausalLM from a Qwen2Config with random weights and
the Qwen vocabulary (151,936), no download. The selection uses real statistics of the two models.

Memory, per configuration:
  * CUDA: `torch.cuda.reset_peak_memory_stats()` before each step, `max_memory_allocated()` after;
    peak = max over the timed steps; baseline = `memory_allocated()` after setup (weights + AdamW
    state + the teacher's hidden states, no grads).
  * CPU: peak = `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end of the child (the kernel's RSS
    high-water mark over the whole fresh process: setup + warm-up + timed steps); baseline = current
    RSS (/proc/self/statm) after setup (models built, AdamW state allocated by a zero-gradient step,
    teacher hidden states, no grads). If the setup's own high-water mark is not exceeded by the steps, the row is flagged.
    Per-phase peaks on CPU come from a thread sampling /proc/self/statm every few ms (can miss
    spikes shorter than the interval; the ru_maxrss peak cannot). The parent never imports torch:
    Linux carries the pre-exec RSS high-water mark into the child's ru_maxrss, so a heavy parent
    would leak into every child's peak. Children run with MALLOC_MMAP_THRESHOLD_=4 MiB so freed
    buffers leave RSS (glibc otherwise keeps sub-32 MiB chunk buffers as heap fragments, which made
    a keep-0.2 run look bigger than selector=full); `--malloc-default` turns that off.

CPU preset: sized for 2 cores and minutes (4 x 512 tokens, narrow models) while keeping the real
vocabulary, so the logits dominate as they do at scale; fp32. CUDA preset: Qwen2.5-0.5B-shaped student,
Qwen2.5-1.5B-shaped teacher, 8 x 1024 response tokens, the dtype policy of the presets (`model.dtype=bfloat16`:
fp32 master student under bf16 autocast, teacher in bf16). Ours runs at the device's default chunk
(`fused_head.CHUNK_ROWS`) unless --chunk says otherwise.

Floor estimate (first principles, a lower-bound-style sanity column; all in the weight dtype unless said):
    baseline = weights(student + teacher) + AdamW state (2 x student params)
    peak     = baseline + max over phases of:
      loss/backward: student activations (no grad ckpt: B*L*layers*(10*H + 4*I) elements;
                     grad ckpt: B*L*layers*H + one layer) + teacher hidden B*T*Ht
                     + tied embedding grads 2*V*Hs (lm_head and input-embedding grads, summed) + logits buffers
      optimizer:     all student grads
    logits buffers: peer  B*T*V * (student logits [dtype] + log-softmax [fp32] + grad [dtype]
                                    + teacher logits [dtype])
                    ours  two chunk*V fp32 buffers + four block-rows*V scratch + the fp32 head gradient V*Hs
                          + kept hidden states K*(Hs + Ht)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
VOCAB = 151_936  # Qwen2 / Qwen2.5 vocabulary (logits width)
SELECTIVE = ("entropy", "type_aware", "q3")
KEEPS = (0.5, 0.2, 0.1)
PEERS = ("peer", "trl")
PEER_CHUNK = 64  # the peer's divergence chunk (positions); its logits are whole-batch either way
# Issue 15's targets, ratios to `peer` in one run: update time at each keep, and peak memory above the
# post-setup baseline at every keep.
TIME_TARGETS = {1.0: 0.40, 0.5: 0.45, 0.2: 0.40}
MEMORY_TARGET = 0.10

PRESETS = {
    # 4 x 512 response tokens: enough that (tokens x V) logits dominate, as at real scale (at 4 x 128 the
    # fixed weights + AdamW state + runtime are most of every peak and hide the saving); ~15 min on 2 cores.
    "cpu": dict(
        dtype="float32", batch=4, resp_len=512, prompt_len=16, chunk=None, warmup=1, repeats=2, timeout=600,
        student=dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=512),
        teacher=dict(hidden=192, layers=3, heads=3, kv_heads=1, intermediate=768),
    ),
    "cuda": dict(  # Qwen2.5-0.5B-shaped student, Qwen2.5-1.5B-shaped teacher; dtype = the compute dtype (model.dtype)
        dtype="bfloat16", batch=8, resp_len=1024, prompt_len=64, chunk=None, warmup=1, repeats=3, timeout=150,
        student=dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
        teacher=dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    ),
}


def all_configs() -> list[str]:
    """Target-relevant first (peer, full, keep 0.5, keep 0.2), so a run cut short by --budget still decides them."""
    return [*PEERS, "full"] + [f"{sel}@{keep}" for keep in KEEPS for sel in SELECTIVE]


def parse_config(name: str) -> tuple[str, float]:
    if name in (*PEERS, "full"):
        return name, 1.0
    sel, keep = name.split("@")
    return sel, float(keep)


# --- dev aid: rehearse the GPU machine's bare environment --------------------------------------------


def block_imports(names: list[str]) -> None:
    """Dev aid: make `import <name>` fail, to rehearse the GPU machine's bare environment on CPU."""
    import importlib.abc

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in names:
                raise ImportError(f"{fullname} blocked by --block-imports")
            return None

    sys.meta_path.insert(0, _Block())


# --- child: one configuration -------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): on a shared machine it moves far less
    with other load than wall time does (OpenMP's spin-waits still count), so it is reported next to it."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PhaseMeter:
    """Per-phase wall time and peak memory of the profiled (first warm-up) step. CUDA: allocator peak
    per phase (sync + reset at entry). CPU: a thread samples RSS every `interval_s` and charges it to
    the current phase. After `close()` phases are no-ops, so timed steps run without syncs or sampling."""

    enabled = True

    def __init__(self, device, interval_s: float = 0.003):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.peak: dict[str, int] = {}
        self.time: dict[str, float] = {}
        self.current = "idle"
        self._stop = threading.Event()
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._charge(self.current, rss_bytes())

    def _charge(self, phase: str, value: int) -> None:
        if value > self.peak.get(phase, 0):
            self.peak[phase] = value

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def phase(self, name: str):
        meter = self
        if not self.enabled:
            import contextlib

            return contextlib.nullcontext()

        class _Ctx:
            def __enter__(self):
                meter.sync()
                if meter.cuda:
                    meter.torch.cuda.reset_peak_memory_stats(meter.device)
                else:
                    meter._charge(name, rss_bytes())
                meter.current = name
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                meter.sync()
                meter.time[name] = meter.time.get(name, 0.0) + time.perf_counter() - self.t0
                if meter.cuda:
                    meter._charge(name, meter.torch.cuda.max_memory_allocated(meter.device))
                else:
                    meter._charge(name, rss_bytes())
                meter.current = "idle"

        return _Ctx()

    def close(self) -> None:
        self.enabled = False
        self._stop.set()


def build_pair(p: dict, device, dtype, student_dtype):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def make(shape: dict, seed: int, dtype):
        cfg = Qwen2Config(
            vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=max(4096, p["prompt_len"] + p["resp_len"]), tie_word_embeddings=True,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, attn_implementation="sdpa",
        )
        torch.manual_seed(seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of a 1.5B model
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(old)
        # Built in `dtype` already; no .to(dtype), which would also cast the fp32 RoPE inv_freq buffer
        # (from_pretrained(dtype=...) leaves it fp32 too).
        return model.to(device)

    student = make(p["student"], 1, student_dtype)  # the weights AdamW updates: fp32 master weights
    teacher = make(p["teacher"], 2, dtype)  # frozen, stored in the compute dtype (the dtype policy)
    student.train(True).requires_grad_(True)  # as models.load_model(trainable=True)
    teacher.train(False).requires_grad_(False)
    return student, teacher


def make_batch(p: dict, device):
    import torch
    from tipdistill.types import Rollout

    B, Lp, T = p["batch"], p["prompt_len"], p["resp_len"]
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (B, Lp + T), generator=g)
    return Rollout(
        input_ids_B_L=ids.to(device), attention_mask_B_L=torch.ones(B, Lp + T, dtype=torch.long, device=device),
        response_mask_B_T=torch.ones(B, T, dtype=torch.bool, device=device), prompt_len=Lp,
        truncated_B=torch.ones(B, dtype=torch.bool), prompt_index_B=torch.arange(B),
    )


def run_one(args) -> dict:
    import torch

    # tipdistill's update step imports without Hydra/omegaconf/wandb/vLLM (a bare GPU box)
    from tipdistill.config import LossConfig, ModelConfig, ScoringConfig, SelectorConfig, TrainConfig
    from tipdistill.losses import DIVERGENCES
    from tipdistill.precision import DTYPES, precision
    from tipdistill.runtime import LocalRuntime
    from tipdistill.teacher import Teacher, response_hidden
    from tipdistill.fused_head import BLOCK_ROWS, default_chunk
    from tipdistill.update import Heads, make_optimizer, update_step

    p = json.loads(args.params)
    device = torch.device(args.device)
    name, keep = parse_config(args.one)
    cuda = device.type == "cuda"
    # The training config of this configuration: the defaults, the preset's compute dtype (model.dtype; the
    # student keeps fp32 master weights), one micro-batch (the whole batch), the chunk (null: the device's
    # default). seed 1: the selection seeds of earlier versions.
    cfg = TrainConfig(keep=keep, seed=1, device=args.device, micro_batch_size=p["batch"], gradient_checkpointing=p["grad_ckpt"],
                      model=ModelConfig(dtype=p["dtype"]), selector=SelectorConfig(name="full" if name in PEERS else name),
                      scoring=ScoringConfig(chunk_size=p["chunk"]), loss=LossConfig(chunk_size=p["chunk"]))
    runtime = LocalRuntime(device, precision(cfg))
    trl_loss = None
    if name == "trl":  # imported at setup (seconds), not in the timed step
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        trl_loss = GKDTrainer.generalized_jsd_loss

    t_setup = time.perf_counter()
    student, teacher = build_pair(p, device, DTYPES[cfg.model.dtype], DTYPES[cfg.model.student_dtype])
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    heads = Heads(student.get_output_embeddings(), teacher.get_output_embeddings())
    optimizer, scheduler = make_optimizer(cfg, student)
    for prm in student.parameters():  # allocate the AdamW state now: a zero-gradient step is a no-op update
        prm.grad = torch.zeros_like(prm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rollout = make_batch(p, device)
    mask_B_T = rollout.response_mask_B_T
    # [3] outside the timed step: both paths need the same teacher hidden states (the fixed batch, a frozen teacher)
    teacher_hidden_B_T_H = Teacher(teacher, runtime).hidden_states(rollout, cfg.micro_batch_size)
    if cuda:
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = rss_bytes()
    setup_maxrss = None if cuda else maxrss_bytes()
    setup_s = time.perf_counter() - t_setup
    meter = PhaseMeter(device)
    info: dict = {}

    def our_update(step: int) -> None:
        result = update_step(student, heads, rollout, teacher_hidden_B_T_H, optimizer, scheduler, cfg=cfg, step=step,
                             runtime=runtime, timer=meter.phase)
        stats, keep_mask_B_T, m = result.stats, result.keep_mask_B_T, result.stats.mask_B_T
        info.update(loss=result.metrics["train/loss"], kept=result.metrics["train/kept_tokens"], tokens=int(m.sum()),
                    h_mean=float(stats.h_B_T[m].mean()), h_std=float(stats.h_B_T[m].std()),
                    rkl_mean=float(stats.rkl_B_T[m].mean()), rkl_std=float(stats.rkl_B_T[m].std()),
                    fkl_mean=None if stats.fkl_B_T is None else float(stats.fkl_B_T[m].mean()),
                    kept_h_mean=float(stats.h_B_T[keep_mask_B_T].mean()), kept_rkl_mean=float(stats.rkl_B_T[keep_mask_B_T].mean()))

    reverse_kl = DIVERGENCES.get("reverse_kl")
    trl_beta = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": cfg.loss.beta}[cfg.loss.name]  # TRL's convention

    def peer_update(step: int) -> None:
        B, T = mask_B_T.shape
        with meter.phase("student_forward"), runtime.autocast():
            s_logits_B_T_V = heads.student(response_hidden(student, rollout, slice(0, B)))  # full, with grad
        with meter.phase("loss"), runtime.autocast():
            with torch.no_grad():
                t_logits_B_T_V = heads.teacher(teacher_hidden_B_T_H)  # full [B, T, V], no grad
            n = int(mask_B_T.sum())
            if name == "trl":  # TRL's own loss on the full logits; labels -100 off the mask
                labels_B_T = torch.where(mask_B_T, rollout.response_ids_B_T, -100)
                loss = trl_loss(s_logits_B_T_V, t_logits_B_T_V, labels=labels_B_T, beta=trl_beta, reduction="sum") / max(1, n)
            else:
                loss_sum = 0.0
                for s_C_V, t_C_V, m_C in zip(s_logits_B_T_V.reshape(B * T, -1).split(PEER_CHUNK),
                                             t_logits_B_T_V.reshape(B * T, -1).split(PEER_CHUNK), mask_B_T.reshape(-1).split(PEER_CHUNK)):
                    div_C = reverse_kl(s_C_V, t_C_V)  # fp32 log-softmax of the chunk, autograd keeps it
                    loss_sum = loss_sum + torch.where(m_C, div_C, 0.0).sum()
                loss = loss_sum / max(1, n)
                del loss_sum
        with meter.phase("backward"):
            loss.backward()
        info.update(loss=float(loss.detach()), kept=n, tokens=n)
        del loss, s_logits_B_T_V, t_logits_B_T_V
        with meter.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    update = peer_update if name in PEERS else our_update
    times, cpu_times, peaks, warm_peaks = [], [], [], []
    if p["warmup"] < 1:
        meter.close()  # no warm-up step to profile: no per-phase numbers
    for step in range(p["warmup"] + p["repeats"]):
        if step == 1:
            meter.close()  # phases were profiled on step 0 (a warm-up step)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        update(step)
        if cuda:
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
        peak = torch.cuda.max_memory_allocated(device) if cuda else maxrss_bytes()
        if cuda and step == 0 and meter.peak:  # the profiled step reset the counter per phase
            peak = max(peak, *meter.peak.values())
        (warm_peaks if step < p["warmup"] else peaks).append(peak)
        if step >= p["warmup"]:
            times.append(dt)
            cpu_times.append(dc)
    meter.close()
    phase_peak, phase_time = dict(meter.peak), dict(meter.time)
    profiled = profile_steps(update, meter, device, p["warmup"] + p["repeats"]) if p.get("profile") else None
    peak = max(peaks)  # CUDA: reset before each step, max_memory_allocated after; CPU: ru_maxrss
    out = {
        "config": args.one, "selector": name, "keep": keep, "device": str(device),
        "chunk": cfg.loss.chunk_size or default_chunk(device), "block": BLOCK_ROWS.get(device.type),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "peak_bytes": peak, "baseline_bytes": baseline, "warmup_peak_bytes": max(warm_peaks) if warm_peaks else None,
        "setup_maxrss_bytes": setup_maxrss,
        "step_peak_not_above_setup": (setup_maxrss is not None and peak <= setup_maxrss),
        "times_s": times, "median_s": statistics.median(times), "setup_s": setup_s,
        "cpu_times_s": cpu_times, "median_cpu_s": statistics.median(cpu_times),
        "phase_peak_bytes": phase_peak, "phase_time_s": phase_time, "profile": profiled,
        "student_params": sum(x.numel() for x in student.parameters()),
        "teacher_params": sum(x.numel() for x in teacher.parameters()),
        **info,
    }
    if cuda:
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


def profile_steps(update, meter: PhaseMeter, device, first_step: int, n: int = 2) -> dict:
    """--profile: where a warm step's time goes, measured after the timed steps (it changes none of their
    numbers). First n steps with a device sync at every phase boundary (mean wall time per phase; the syncs
    stop host/device overlap, so the phases can add up to more than an unsynced step); then one step under
    torch.profiler: the device's busy time (the sum of kernel times, CPU op time on CPU) against the step's
    wall time, and the ops that take most of it. Busy time far below the wall time means the step waits on
    the host (launches, syncs), not on arithmetic."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    meter.time, meter.enabled = {}, True
    synced = []
    for i in range(n):
        meter.sync()
        t0 = time.perf_counter()
        update(first_step + i)
        meter.sync()
        synced.append(time.perf_counter() - t0)
    phase_s = {k: v / n for k, v in meter.time.items()}
    meter.close()
    meter.sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        update(first_step + n)
        meter.sync()
        wall = time.perf_counter() - t0

    def self_us(e) -> float:  # CUDA: the device time of the kernels an op launched itself; CPU: its own CPU time
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    events = prof.key_averages()
    # busy: kernels (device-side events) only; an op's self device time repeats its kernels' time
    busy_us = sum(self_us(e) for e in events if (e.device_type != torch.autograd.DeviceType.CPU) == cuda)
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=self_us, reverse=True)
    top = [{"name": e.key, "calls": e.count, "s": self_us(e) / 1e6} for e in ops[:12] if self_us(e) > 0]
    return {"synced_step_s": statistics.median(synced), "phase_s": phase_s, "profiled_wall_s": wall,
            "busy_s": busy_us / 1e6, "top": top}


# --- floor estimate ---------------------------------------------------------------------------------------------


def qwen2_params(shape: dict) -> int:
    H, I, n = shape["hidden"], shape["intermediate"], shape["layers"]
    hd = H // shape["heads"]
    kv = shape["kv_heads"] * hd
    attn = H * H + H + 2 * (H * kv + kv) + H * H  # q (bias), k, v (bias), o
    layer = attn + 3 * H * I + 2 * H
    return VOCAB * H + n * layer + H  # tied embeddings


def floor_estimate(p: dict, name: str, kept: int, chunk: int = 128, block: int = 8) -> dict:
    bw = 2 if p["dtype"] in ("bfloat16", "float16") else 4
    s, t = p["student"], p["teacher"]
    B, T, L = p["batch"], p["resp_len"], p["prompt_len"] + p["resp_len"]
    Ps, Pt = qwen2_params(s), qwen2_params(t)
    weights = Ps * 4 + Pt * bw  # fp32 master student, teacher in the compute dtype
    adam = 2 * Ps * 4
    Hs, Is, ns = s["hidden"], s["intermediate"], s["layers"]
    if p["grad_ckpt"]:
        act = B * L * (ns * Hs + 10 * Hs + 4 * Is) * bw
    else:
        act = B * L * ns * (10 * Hs + 4 * Is) * bw
    t_hidden = B * T * t["hidden"] * bw
    emb_grad = 2 * VOCAB * Hs * bw  # tied: the lm_head grad and the dense input-embedding grad meet in one sum
    N = B * T
    if name in PEERS:
        logits = N * VOCAB * (bw + 4 + bw + bw)
    else:
        logits = (2 * min(chunk, N) + 4 * block) * VOCAB * 4 + VOCAB * Hs * 4 + kept * (Hs + t["hidden"]) * 4
    transient = max(act + t_hidden + emb_grad + logits, Ps * 4)
    return {"weights": weights, "adam": adam, "activations": act, "teacher_hidden": t_hidden, "emb_grad": emb_grad,
            "logits": logits, "baseline": weights + adam, "total": weights + adam + transient}


# --- parent: run all, tabulate --------------------------------------------------------------------------------------


def fmt(x, nd=2):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def run_all(args, p: dict) -> int:
    configs = args.configs.split(",") if args.configs else all_configs()
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for cfg in configs:
        left = args.budget - (time.perf_counter() - t_all) if args.budget else None
        if left is not None and left < 20:
            print(f"[{cfg}] SKIPPED: --budget {args.budget} s spent", flush=True)
            results[cfg] = {"config": cfg, "error": "skipped (budget)"}
            continue
        timeout = p["timeout"] if left is None else min(p["timeout"], left)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", cfg, "--device", args.device,
               "--params", json.dumps(p)]
        if args.block_imports:
            cmd += ["--block-imports", args.block_imports]
        env = dict(os.environ)
        if args.device == "cpu" and not args.malloc_default:
            # A fixed glibc mmap threshold (this also turns off its dynamic raise up to 32 MiB): every
            # buffer >= 4 MiB is its own mapping, returned to the OS on free, so RSS follows the live
            # tensors instead of heap fragments retained from earlier chunks. Costs page faults (time).
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 1024 * 1024))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            print(f"[{cfg}] TIMEOUT after {timeout:.0f} s", flush=True)
            results[cfg] = {"config": cfg, "error": "timeout"}
            continue
        line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout)[-2000:]
            print(f"[{cfg}] FAILED rc={proc.returncode}\n{tail}", flush=True)
            results[cfg] = {"config": cfg, "error": f"rc={proc.returncode}"}
            continue
        r = json.loads(line[len("BENCH_JSON "):])
        r["wall_s"] = time.perf_counter() - t0
        results[cfg] = r
        print(f"[{cfg}] peak {r['peak_bytes'] / GIB:.2f} GiB, median step {r['median_s']:.3f} s ({r['median_cpu_s']:.2f} CPU s) "
              f"(steps {', '.join(f'{x:.2f}' for x in r['times_s'])}), kept {r['kept']}, child {r['wall_s']:.0f} s", flush=True)
    total_s = time.perf_counter() - t_all
    md = report(results, p, args, total_s)
    print(md)
    if args.out:
        out = Path(args.out)
        base = out.with_suffix("") if out.suffix in (".json", ".md") else out
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".md").write_text(md)
        base.with_suffix(".json").write_text(json.dumps({"params": p, "device": args.device, "total_s": total_s,
                                                         "results": results}, indent=2))
        print(f"wrote {base.with_suffix('.md')} and {base.with_suffix('.json')}")
    return 0 if all("error" not in r for r in results.values()) else 1


def report(results: dict, p: dict, args, total_s: float) -> str:
    ok = {k: r for k, r in results.items() if "error" not in r}
    peer, trl, full = ok.get("peer"), ok.get("trl"), ok.get("full")
    any_r = next(iter(ok.values()), {})
    ours_any = next((r for r in ok.values() if r["selector"] not in PEERS), {})
    lines = []
    dev = any_r.get("device_name", args.device)
    lines.append(f"## Update-step benchmark: {dev} (torch {any_r.get('torch', '?')}, {any_r.get('threads', '?')} threads)")
    lines.append("")
    lines.append(f"B={p['batch']} x T={p['resp_len']} response tokens (+{p['prompt_len']} prompt), V={VOCAB}, compute {p['dtype']} "
                 f"(fp32 master student{', teacher ' + p['dtype'] if p['dtype'] != 'float32' else ''}), "
                 f"our chunk {ours_any.get('chunk', p['chunk'])} (row blocks {ours_any.get('block', '-')}), peer divergence chunk {PEER_CHUNK}, "
                 f"grad ckpt {'on' if p['grad_ckpt'] else 'off'}, {p['warmup']} warm-up + {p['repeats']} timed steps; "
                 f"student {p['student']} ({any_r.get('student_params', 0) / 1e6:.1f}M), "
                 f"teacher {p['teacher']} ({any_r.get('teacher_params', 0) / 1e6:.1f}M). "
                 f"Peak: {'max_memory_allocated per step' if args.device == 'cuda' else 'ru_maxrss of a fresh process (setup + all steps)'}; "
                 f"baseline: {'memory_allocated' if args.device == 'cuda' else 'RSS'} after setup (weights + AdamW state).")
    lines.append("")

    def above(r):
        return r["peak_bytes"] - r["baseline_bytes"]

    def ratio(x, y):
        return None if y is None else x / y

    lines.append("| config | keep | kept tokens | peak GiB | above baseline GiB | floor estimate GiB | median step s | "
                 "time / peer | time / trl | time / full | CPU s | CPU / peer | above-baseline mem / peer | above-baseline mem / trl |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg, r in results.items():
        if "error" in r:
            lines.append(f"| {cfg} | | | {r['error']} | | | | | | | | | | |")
            continue
        fl = floor_estimate(p, r["selector"], r["kept"], r.get("chunk") or 128, r.get("block") or 8)
        flag = " (!)" if r.get("step_peak_not_above_setup") else ""
        med = r["median_s"]
        lines.append(
            f"| {cfg} | {fmt(r['keep'], 1)} | {r['kept']} | {fmt(r['peak_bytes'] / GIB)}{flag} | {fmt(above(r) / GIB)} | "
            f"{fmt(fl['total'] / GIB)} | {fmt(med, 3)} | {fmt(ratio(med, peer and peer['median_s']))} | "
            f"{fmt(ratio(med, trl and trl['median_s']))} | {fmt(ratio(med, full and full['median_s']))} | "
            f"{fmt(r.get('median_cpu_s'), 2)} | {fmt(ratio(r['median_cpu_s'], peer and peer.get('median_cpu_s')) if 'median_cpu_s' in r else None)} | "
            f"{fmt(ratio(above(r), peer and above(peer)), 3)} | {fmt(ratio(above(r), trl and above(trl)), 3)} |")
    if ok:
        b = statistics.median(r["baseline_bytes"] for r in ok.values())
        fl = floor_estimate(p, "full", 0)
        lines.append("")
        lines.append(f"Post-setup baseline (median over configs): {b / GIB:.2f} GiB measured vs {fl['baseline'] / GIB:.2f} GiB "
                     f"weights + AdamW estimated" + (" (the rest is the Python/torch runtime and allocator slack)."
                                                      if args.device == "cpu" else " (the rest: batch tensors, CUDA/cuBLAS workspaces)."))
    if any(r.get("step_peak_not_above_setup") for r in ok.values()):
        lines.append("")
        lines.append("(!) the update steps never exceeded the setup's RSS high-water mark: the peak shown is the setup's.")
    lines.append("")

    # --- targets (issue 15): ratios to the peer-style update, measured side by side in this run
    missed = False
    for keep, need in TIME_TARGETS.items():
        rows = [r for r in ok.values() if r["selector"] not in PEERS and abs(r["keep"] - keep) < 1e-9]
        if peer is None or not rows:
            lines.append(f"update time at keep {keep} <= {need:.2f}x peer: n/a (missing runs)")
            missed = True
            continue
        worst = max(rows, key=lambda r: r["median_s"])
        passed = worst["median_s"] / peer["median_s"] <= need
        missed |= not passed
        detail = ", ".join(f"{r['config']} {r['median_s'] / peer['median_s']:.2f}x" for r in rows)
        cpu = max(r["median_cpu_s"] for r in rows) / peer["median_cpu_s"]
        lines.append(f"update time at keep {keep} <= {need:.2f}x peer: {'PASS' if passed else 'FAIL'} "
                     f"(worst {worst['median_s'] / peer['median_s']:.2f}x; {detail}; CPU time worst {cpu:.2f}x)")
    rows = [r for r in ok.values() if r["selector"] not in PEERS]
    if peer is None or not rows:
        lines.append(f"peak memory above baseline <= {MEMORY_TARGET:.2f}x peer's at every keep: n/a (missing runs)")
        missed = True
    else:
        worst = max(rows, key=above)
        passed = above(worst) / above(peer) <= MEMORY_TARGET
        missed |= not passed
        lines.append(f"peak memory above baseline <= {MEMORY_TARGET:.2f}x peer's at every keep: {'PASS' if passed else 'FAIL'} "
                     f"(worst {worst['config']} {above(worst) / above(peer):.3f}x: {above(worst) / GIB:.2f} vs {above(peer) / GIB:.2f} GiB)")
    if trl and peer:
        lines.append(f"TRL's generalized_jsd_loss vs peer: time {trl['median_s'] / peer['median_s']:.2f}x, "
                     f"memory above baseline {above(trl) / above(peer):.2f}x; loss {trl['loss']:.6f} vs {peer['loss']:.6f}")

    if missed or args.phases:
        lines.append("")
        lines.append("Where the memory goes: per-phase peak GiB above the post-setup baseline "
                     + ("(allocator peak per phase)" if args.device == "cuda" else "(RSS sampled every ~3 ms)")
                     + " and phase times s, both from the first warm-up step; floor components GiB")
        lines.append("")
        phases = ["student_forward", "statistics", "selection", "loss", "backward", "optimizer"]
        lines.append("| config | " + " | ".join(phases) + " | phase times s | floor: act / logits / t-hidden / emb-grad |")
        lines.append("|---|" + "---|" * (len(phases) + 2))
        for cfg, r in ok.items():
            pk = r["phase_peak_bytes"]
            cells = [fmt((pk[ph] - r["baseline_bytes"]) / GIB) if ph in pk else "-" for ph in phases]
            tm = " / ".join(f"{r['phase_time_s'].get(ph, 0):.2f}" for ph in phases)
            fl = floor_estimate(p, r["selector"], r["kept"], r.get("chunk") or 128, r.get("block") or 8)
            fc = " / ".join(fmt(fl[k] / GIB) for k in ("activations", "logits", "teacher_hidden", "emb_grad"))
            lines.append(f"| {cfg} | " + " | ".join(cells) + f" | {tm} | {fc} |")
    lines.append("")
    if ok:
        r = next((x for x in ok.values() if x["selector"] not in PEERS), None)
        if r:
            fkl = "not computed" if r.get("fkl_mean") is None else f"{r['fkl_mean']:.4f}"
            lines.append(f"Statistics (real, from the two random-weight models; {r['config']}): h mean {r['h_mean']:.5f} "
                         f"(std {r['h_std']:.2e}), rkl mean {r['rkl_mean']:.4f} (std {r['rkl_std']:.2e}), fkl mean {fkl}; "
                         f"kept tokens: h mean {r['kept_h_mean']:.5f}, rkl mean {r['kept_rkl_mean']:.4f}.")
        losses = ", ".join(f"{k} {r['loss']:.6f}" for k, r in ok.items() if k in (*PEERS, "full"))
        if losses:
            lines.append(f"All-token losses (the same batch and weights): {losses}.")
    profiled = {k: r["profile"] for k, r in ok.items() if r.get("profile")}
    if profiled:
        phases = ["student_forward", "statistics", "selection", "loss", "backward", "optimizer"]
        busy = "device busy (kernel time)" if args.device == "cuda" else "CPU op time"
        lines.append("")
        lines.append(f"Where a warm step's time goes (--profile, steps after the timed ones): per-phase s with a device sync "
                     f"at each boundary (mean of 2 steps), then one step under torch.profiler: {busy} against its wall time")
        lines.append("")
        lines.append("| config | median step s | synced step s | " + " | ".join(phases) + f" | profiled step s | {busy} s | busy / wall |")
        lines.append("|---|" + "---|" * (len(phases) + 5))
        for k, pr in profiled.items():
            cells = [f"{pr['phase_s'][ph]:.4f}" if ph in pr["phase_s"] else "-" for ph in phases]
            lines.append(f"| {k} | {ok[k]['median_s']:.4f} | {pr['synced_step_s']:.4f} | " + " | ".join(cells)
                         + f" | {pr['profiled_wall_s']:.4f} | {pr['busy_s']:.4f} | {pr['busy_s'] / pr['profiled_wall_s']:.2f} |")
        for k, pr in profiled.items():
            lines.append("")
            lines.append(f"Top aten ops of {k} ({busy}): " + "; ".join(f"{t['name']} x{t['calls']} {t['s'] * 1e3:.1f} ms" for t in pr["top"]))
    lines.append(f"Total benchmark wall time: {total_s:.0f} s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="also picks the size preset")
    ap.add_argument("--configs", default=None, help=f"comma list (default all): {','.join(all_configs())}")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--resp-len", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--chunk", type=int, help="positions per LM-head chunk of ours (statistics and loss); default: the device's")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--timeout", type=int, help="seconds per configuration subprocess")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run: later configs are skipped, the table still printed")
    ap.add_argument("--grad-ckpt", action="store_true", help="student gradient checkpointing (non-reentrant)")
    ap.add_argument("--phases", action="store_true", help="always print the per-phase memory table")
    ap.add_argument("--profile", action="store_true", help="after the timed steps: per-phase times with syncs and a torch.profiler step")
    ap.add_argument("--malloc-default", action="store_true", help="CPU: keep glibc's default mmap threshold")
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    ap.add_argument("--block-imports", default="", help="dev aid, e.g. hydra,omegaconf,wandb,vllm: rehearse a bare env")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.block_imports:
        block_imports([x for x in args.block_imports.split(",") if x])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the GPU machine has the tree but not the editable install
    if args.one:
        print("BENCH_JSON " + json.dumps(run_one(args)), flush=True)
        return 0
    p = dict(PRESETS[args.device])
    for key in ("batch", "resp_len", "prompt_len", "chunk", "warmup", "repeats", "timeout"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    p["grad_ckpt"] = args.grad_ckpt
    p["profile"] = args.profile
    return run_all(args, p)


if __name__ == "__main__":
    sys.exit(main())
