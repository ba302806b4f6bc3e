"""[6] The dtype policy: fp32 master weights by default, bf16 only as compute dtype; pure-bf16 student
weights only with the Kahan-compensated optimizer; plain AdamW on bf16 weights refused.

At the paper's lr (1e-6) an AdamW step moves a weight by about 1e-6, far below half a bf16 step next to
a typical weight (6e-5 at 0.02): pure-bf16 AdamW rounds nearly every update away. These tests take one
real step at that lr under each preset's dtype and check the weights moved.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import compose

LR = 1e-6  # conf/experiment/paper_base.yaml


def typed(overrides):
    from tipdistill.config import validate

    return validate(compose(overrides))


def tiny_student(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).to(dtype)


def one_step(model, optimizer, amp):
    """A real step: loss = next-token CE of a random batch under the policy's autocast."""
    from tipdistill.precision import UpdateMeter

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with amp:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    metrics = UpdateMeter(optimizer)()
    optimizer.zero_grad(set_to_none=True)
    return metrics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_step_at_the_paper_lr_moves_the_students_weights(dtype):
    """Each preset dtype (embedded: float32; every real pair: bfloat16) at lr 1e-6: every weight that got a
    gradient changes in one step. The model computes in bf16 under autocast; its weights stay fp32."""
    from tipdistill.precision import build_optimizer, precision

    cfg = typed([f"model.dtype={dtype}", f"optim.lr={LR}", "optim.warmup_steps=0"])
    prec = precision(cfg)
    assert prec.student == torch.float32 and prec.compute == getattr(torch, dtype)
    model = tiny_student(prec.student)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = one_step(model, build_optimizer(cfg, model.parameters()), prec.autocast(torch.device("cpu")))
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    with_grad = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # unseen token rows get none
    assert moved >= with_grad, (moved, with_grad)
    assert m["optim/update_moved_frac"] == pytest.approx(moved / sum(p.numel() for p in model.parameters()))
    assert 0 < m["optim/update_ratio"] < 1e-3


def test_plain_adamw_on_bf16_weights_is_what_the_policy_prevents():
    """The failure mode itself, in plain torch: bf16 weights + AdamW at lr 1e-6 stay almost bit-identical."""
    model = tiny_student(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    m = one_step(model, opt, torch.autocast("cpu", enabled=False))
    assert m["optim/update_moved_frac"] < 0.05


def test_pure_bf16_with_kahan_tracks_fp32_master_weights():
    """The opt-in (model.student_dtype=bfloat16 optim=adamw_kahan): bf16 weights, torch-optimi's AdamW with
    Kahan summation. Its master view (bf16 weight + compensation) moves from step 1 and follows the fp32
    trajectory; the bf16 weights themselves move once the summed updates pass half a bf16 step."""
    from tipdistill.precision import UpdateMeter, build_optimizer, precision

    cfg = typed(["model.dtype=bfloat16", "model.student_dtype=bfloat16", "optim=adamw_kahan", f"optim.lr={LR}"])
    assert precision(cfg).student == torch.bfloat16
    w0 = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.02
    ref = torch.nn.Parameter(w0.clone())
    ref_opt = torch.optim.AdamW([ref], lr=LR, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0)
    w = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt = build_optimizer(cfg, [w])
    meter = UpdateMeter(opt)
    g = torch.Generator().manual_seed(1)
    start = w.detach().float().clone()
    for step in range(200):
        grad = torch.randn(4096, generator=g) + 0.5
        ref.grad, w.grad = grad.clone(), grad.to(torch.bfloat16)
        ref_opt.step()
        m = meter()
        if step == 0:
            assert m["optim/update_moved_frac"] > 0.99 and m["optim/update_ratio"] > 0
    master = w.detach().float() + opt.state[w]["kahan_comp"].float()
    ref_update = ref.detach() - w0
    assert ((master - start) - ref_update).norm() < 0.05 * ref_update.norm()
    assert (w.detach().float() != start).float().mean() > 0.5  # 200 steps of 1e-6 pass half a bf16 step for most


def test_update_meter_samples_big_models_and_is_exact_on_small_ones():
    from tipdistill.precision import UpdateMeter

    p = torch.nn.Parameter(torch.randn(1000, 100))
    opt = torch.optim.SGD([p], lr=0.1)
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    p.grad[:500] = 1.0  # half the weights move
    exact = UpdateMeter(opt)()
    assert exact["optim/update_moved_frac"] == 0.5
    assert exact["optim/update_ratio"] == pytest.approx(float((p.detach() - before).norm() / before.norm()), rel=1e-5)
    p.grad = torch.zeros_like(p)
    p.grad[:500] = 1.0
    sampled = UpdateMeter(opt, sample=10_000)()  # 10% of the weights, evenly strided
    assert sampled["optim/update_moved_frac"] == pytest.approx(0.5, abs=0.01)
    assert sampled["optim/update_ratio"] == pytest.approx(exact["optim/update_ratio"], rel=0.1)


@pytest.mark.parametrize("overrides, message", [
    (["model.dtype=bfloat16", "model.student_dtype=bfloat16"],
     r"model.student_dtype=bfloat16 with plain AdamW: bf16 weights round away every update smaller than about \|w\|/512 .*"
     r"fix: drop model.student_dtype \(fp32 master weights, the default\) or add optim=adamw_kahan"),
    (["model.student_dtype=bfloat16", "optim=adamw_kahan"], r"model.student_dtype=bfloat16 needs model.dtype=bfloat16"),
    (["model.dtype=bfloat16", "optim=adamw_kahan"], r"optim=adamw_kahan compensates bf16 weights, but the student's are float32"),
    (["model.dtype=float16"], r"model.dtype=float16 is not supported: fp16 training needs loss scaling"),
    (["optim.name=sgd"], r"unknown optimizer 'sgd'; valid: adamw, adamw_kahan"),
])
def test_dtype_policy_errors_are_one_clear_line(overrides, message):
    from tipdistill.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        typed(overrides)


def test_plain_adamw_refuses_bf16_parameters_however_they_arrive():
    from tipdistill.config import ConfigError
    from tipdistill.precision import build_optimizer

    with pytest.raises(ConfigError, match=r"plain AdamW on bfloat16 weights rounds away .*fix:"):
        build_optimizer(typed([]), tiny_student(torch.bfloat16).parameters())


# --- the real loop: one step through `tipdistill train` ------------------------------------------------

def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


@pytest.mark.integration
@pytest.mark.parametrize("dtype_args", [
    ["model.dtype=float32"],  # the embedded preset
    [],  # every real preset: model.dtype=bfloat16
    ["model.student_dtype=bfloat16", "optim=adamw_kahan"],  # the pure-bf16 opt-in
], ids=["float32", "bfloat16", "pure_bf16_kahan"])
def test_train_one_step_at_the_paper_lr_moves_the_weights(tmp_path, dtype_args):
    """`tipdistill train` on a real preset (Qwen2-shaped stand-in, rollout=hf), one step at lr 1e-6: the
    student's saved weights differ from the initial ones almost everywhere (today's pure-bf16 AdamW left
    98.6% bit-identical), and optim/update_moved_frac says so at step 1."""
    from standins import build_tokenizer, cli, save_model

    tok = build_tokenizer("qwen")
    student = save_model(tmp_path / "org/student", "qwen", 288, tok, seed=1)
    teacher = save_model(tmp_path / "org/teacher", "qwen", 320, tok, seed=2)
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    out = cli(["train", "model=qwen25_1p5b_to_0p5b", f"model.student={student}", f"model.teacher={teacher}", "task=math500",
               f"task.path={data}", "task.eval_size=2", "steps=1", "prompts_per_step=2", "rollouts_per_prompt=2", "rollout=hf",
               "rollout.max_completion_length=16", "eval.samples=1", "eval.greedy=false", "device=cpu", "scoring.token_dump_every=0",
               f"optim.lr={LR}", "optim.warmup_steps=0", *dtype_args], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    initial, final = _weights(tmp_path / "org/student"), _weights(run_dir / "checkpoints/final")
    pure_bf16 = bool(dtype_args) and "model.student_dtype=bfloat16" in dtype_args
    changed = sum(int((w != initial[name].to(w.dtype)).sum()) for name, w in final.items())
    total = sum(w.numel() for w in final.values())
    step1 = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    if not pure_bf16:
        assert changed / total > 0.5, f"{changed} of {total} weights changed"
    # the fp32 master weights are what is saved (pure bf16: the bf16 weights)
    assert {w.dtype for w in final.values()} == {torch.bfloat16 if pure_bf16 else torch.float32}
    # pure bf16: the bf16 weights move once the Kahan-summed updates pass half a bf16 step; the master view moves now
    assert step1["optim/update_moved_frac"] > 0.5 and step1["optim/update_ratio"] > 0


def test_update_meter_samples_a_tensor_larger_than_float32_counts_exactly():
    """Above 2**24 weights a float32 linspace of sample indices rounds past the last one (an embedding of
    152k x 128 crashed the benchmark); the sample stays inside every tensor and sees the update."""
    import torch

    from tipdistill.precision import UpdateMeter

    p = torch.nn.Parameter(torch.ones(19_447_808))
    p.grad = torch.ones_like(p)
    meter = UpdateMeter(torch.optim.SGD([p], lr=0.5), sample=1 << 20)
    assert meter._master_sample().numel() == len(range(0, p.numel(), meter.stride)) >= 1 << 20
    m = meter()
    assert m["optim/update_moved_frac"] == 1.0 and abs(m["optim/update_ratio"] - 0.5) < 1e-6
