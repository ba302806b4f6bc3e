#!/usr/bin/env python
"""Evaluates Liger-Kernel's fused linear JSD as a backend of the fused kept-token loss (issue 15, item 4).

Why its interface fits: `LigerFusedLinearJSDFunction(student_input (K, H), student_weight (V, H),
teacher_input (K, H'), teacher_weight (V, H'), shift_labels=None, jsd_beta, ignore_index, temperature,
accum_dtype)` takes gathered rows (our kept hidden states) and the two heads' weights (sliced to
`vocab_width`); its JSD is beta KL(T||M) + (1 - beta) KL(S||M) with M = beta T + (1 - beta) S, beta = 1 the
reverse KL and 0 the forward KL: TRL's convention and ours (`losses.jsd`). It returns the mean over the
rows (our sum is K times it) and computes its gradients in forward, as ours does. What it does not
give: the per-token statistics (h, rkl, fkl) `selector=full` takes from our pass, so it could only
serve the selective keeps' loss; its chunk size follows V / H, not a measured default.

The rule (printed as the verdict): adopt it behind `fused_head.kept_token_loss` only if it is faster at
every K measured and as close to a float64 reference (same bf16-rounded operands) as ours.

    python scripts/bench_liger.py                    # CUDA; liger_kernel importable (pip install liger-kernel)
    python scripts/bench_liger.py --device cpu       # ours only, at small sizes: a dry run of this script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = 151_936


def main() -> int:
    import torch

    from tipdistill.fused_head import kept_token_loss

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        N, Hs, Ht, V, compute, n_ref = 8192, 896, 1536, VOCAB, torch.bfloat16, 512
    else:
        N, Hs, Ht, V, compute, n_ref = 256, 64, 96, 4096, torch.float32, 64
    try:
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        LigerFusedLinearJSDFunction = None
        print(f"liger_kernel not importable ({type(e).__name__}: {e}); ours only")

    g = torch.Generator().manual_seed(0)
    Ws = (0.02 * torch.randn(V, Hs, generator=g)).to(device)  # fp32 master weights
    Wt = (0.02 * torch.randn(V, Ht, generator=g)).to(device=device, dtype=compute)
    hs = (3 * torch.randn(N, Hs, generator=g)).to(device)
    ht = (3 * torch.randn(N, Ht, generator=g)).to(device=device, dtype=compute)
    student_head = torch.nn.Linear(Hs, V, bias=False, device=device)
    teacher_head = torch.nn.Linear(Ht, V, bias=False, device=device, dtype=compute).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(Ws)
        teacher_head.weight.copy_(Wt)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def ours(K, divergence, beta):
        student_head.zero_grad(set_to_none=True)
        h = hs[None, :K].clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=compute, enabled=cuda):
            loss, n = kept_token_loss(h, ht[None, :K], torch.ones(1, K, dtype=torch.bool, device=device), student_head, teacher_head,
                                      divergence, beta, None)
        (loss / n).backward()
        return loss.detach().double(), h.grad[0].double(), student_head.weight.grad.double()

    def liger(K, divergence, beta):
        jsd_beta = {"reverse_kl": 1.0, "forward_kl": 0.0}.get(divergence, beta)
        h = hs[:K].to(compute).clone().requires_grad_(True)
        w = Ws.to(compute).requires_grad_(True)  # its operands in bf16 (its autocast path rounds logits to bf16)
        loss = LigerFusedLinearJSDFunction.apply(h, w, ht[:K], Wt, None, jsd_beta, -100, 1.0, torch.float32)
        loss.backward()  # loss is the mean over K rows: the same gradient scale as ours' sum / K
        return (loss.detach() * K).double(), h.grad.double(), w.grad.double()

    def reference(K, divergence, beta):
        """float64 on the bf16-rounded operands, autograd through the definitions in losses.py."""
        from tipdistill.losses import naive_masked_loss

        s_head = torch.nn.Linear(Hs, V, bias=False, device=device, dtype=torch.float64)
        t_head = torch.nn.Linear(Ht, V, bias=False, device=device, dtype=torch.float64).requires_grad_(False)
        with torch.no_grad():
            s_head.weight.copy_(Ws.to(compute).double())
            t_head.weight.copy_(Wt.double())
        h = hs[None, :K].to(compute).double().requires_grad_(True)
        loss, n = naive_masked_loss(h, ht[None, :K].double(), torch.ones(1, K, dtype=torch.bool, device=device), s_head, t_head,
                                    divergence, beta)
        (loss / n).backward()
        return loss.detach(), h.grad[0], s_head.weight.grad

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    def timed(fn, K, divergence, beta):
        fn(K, divergence, beta)
        times, peaks = [], []
        for _ in range(args.repeats):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn(K, divergence, beta)
            sync()
            times.append(time.perf_counter() - t0)
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else float("nan"))
        return statistics.median(times), max(peaks)

    backends = {"ours": ours} | ({"liger": liger} if LigerFusedLinearJSDFunction is not None else {})
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}; V={V}, Hs={Hs}, Ht={Ht}, "
          f"compute {str(compute).removeprefix('torch.')}; error = relative L2 error against float64 on {n_ref} rows")
    print("| backend | divergence | loss err | grad_h err | grad_W err | time s (K=N) | peak GiB (K=N) | time s (K=0.2N) |")
    print("|---|---|---|---|---|---|---|---|")
    verdict = []
    for divergence, beta in (("reverse_kl", 0.5), ("jsd", 0.5)):
        ref = reference(n_ref, divergence, beta)
        row = {}
        for name, fn in backends.items():
            got = fn(n_ref, divergence, beta)
            errs = [rel(a, b) for a, b in zip(got, ref)]
            t_full, peak = timed(fn, N, divergence, beta)
            t_part, _ = timed(fn, N // 5, divergence, beta)
            row[name] = (errs, t_full, t_part)
            print(f"| {name} | {divergence} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | {t_full:.4f} | {peak:.2f} | {t_part:.4f} |",
                  flush=True)
        if "liger" in row:
            (eo, tfo, tpo), (el, tfl, tpl) = row["ours"], row["liger"]
            faster = tfl < tfo and tpl < tpo
            as_close = all(x <= 1.5 * max(y, 1e-6) for x, y in zip(el, eo))
            verdict.append(f"{divergence}: liger {'faster' if faster else 'not faster'} ({tfl / tfo:.2f}x at K=N, {tpl / tpo:.2f}x at K=0.2N), "
                           f"{'as close' if as_close else 'less close'} to float64")
    if verdict:
        adopt = all("not faster" not in v and "less close" not in v for v in verdict)
        print("\nverdict: " + "; ".join(verdict) + f" -> {'ADOPT for the selective loss' if adopt else 'keep ours'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
