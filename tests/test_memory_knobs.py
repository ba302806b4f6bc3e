"""[3]-[6] The memory knobs a GPU user turns on: gradient checkpointing, bf16 autocast, teacher offload.

They matter on CUDA, but each one's behaviour is checked here on CPU with a real (tiny) model:
checkpointing saves fewer activations for the same gradients, autocast runs the matmuls in bf16,
and the offloaded teacher keeps a working LM head on the device even when its embeddings are tied.
"""

from __future__ import annotations

import torch

from conftest import random_rollout, tiny_qwen
from tipdistill.fused_head import kept_token_loss
from tipdistill.models import resident_head
from tipdistill.teacher import response_hidden

V = 64


def tiny(seed: int, tied: bool):
    return tiny_qwen(seed, vocab=V, layers=3, tied=tied)


def batch():
    return random_rollout(V, (5, 7), (9, 4, 6, 9))


def loss_and_grads(student, teacher, rollout, *, saved: list | None = None, autocast: bool = False):
    rows = slice(0, rollout.input_ids_B_L.shape[0])
    mask = rollout.response_mask_B_T
    with torch.no_grad():
        t_hidden = response_hidden(teacher, rollout, rows)
    student.zero_grad(set_to_none=True)

    def pack(x):
        if saved is not None:
            saved.append(x.numel() * x.element_size())
        return x

    dtypes = []
    hook = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = response_hidden(student, rollout, rows)
        loss_sum, _ = kept_token_loss(hidden, t_hidden, mask, student.get_output_embeddings(), teacher.get_output_embeddings(),
                                      "reverse_kl", 0.5, 16, V)
    hook.remove()
    loss = loss_sum / mask.sum()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}, dtypes[0]


def test_gradient_checkpointing_same_gradients_fewer_saved_activations():
    student, teacher, rollout = tiny(0, False), tiny(1, False), batch()
    student.train()
    plain_bytes, ckpt_bytes = [], []
    loss_a, grads_a, _ = loss_and_grads(student, teacher, rollout, saved=plain_bytes)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_b, grads_b, _ = loss_and_grads(student, teacher, rollout, saved=ckpt_bytes)
    assert loss_a == loss_b
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-6, rtol=1e-5), name
    # three decoder layers' internals are recomputed in backward, not kept
    assert sum(ckpt_bytes) < 0.6 * sum(plain_bytes), (sum(ckpt_bytes), sum(plain_bytes))


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_the_loss():
    student, teacher, rollout = tiny(0, False), tiny(1, False), batch()
    loss32, grads32, dtype32 = loss_and_grads(student, teacher, rollout)
    loss16, grads16, dtype16 = loss_and_grads(student, teacher, rollout, autocast=True)
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.03 * loss32
    assert all(g.dtype == torch.float32 for g in grads16.values())  # master weights and grads stay fp32
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads16.values()]),
                                                torch.cat([g.flatten() for g in grads32.values()]), dim=0)
    assert cos > 0.99


def test_offloaded_teacher_keeps_a_working_head_when_embeddings_are_tied():
    for tied in (True, False):
        teacher = tiny(1, tied)
        assert (teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight) == tied
        hidden = torch.randn(5, 32)
        expected = teacher.get_output_embeddings()(hidden)
        head = resident_head(teacher, torch.device("cpu"))
        teacher.model.to("meta")  # the body leaves (on CUDA: to CPU); the head must not follow it
        assert torch.allclose(head(hidden), expected)
