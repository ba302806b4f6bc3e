"""[0] The embedded pair: a character tokenizer and two small causal LMs trained on a task.

`tipdistill prepare` builds both, pre-trains them on the task's reference solutions (teacher well,
student deliberately under-trained at a constant lr so distillation can still move it) and saves
them in Hugging Face format, so that everything downstream loads them through `from_pretrained`
exactly as it would load a hub model. The cache key is a hash of everything that shapes the
result, so a changed recipe never silently reuses an old pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tipdistill.config import EmbeddedConfig, NetConfig, TaskConfig
from tipdistill.evaluate import evaluate
from tipdistill.rollout.hf_engine import HFEngine
from tipdistill.tasks import Task, build_task, encode_prompt

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the tokenizer or training code changes what `prepare` produces
SPECIALS = ["<pad>", "<eos>", "<unk>"]
CHARSET = " 0123456789+-*/=?:;.,()[]<>|#_" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Every character is one token; specials first so ids 0..2 are pad, eos, unk."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARSET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def build_model(net: NetConfig, tokenizer: PreTrainedTokenizerFast, vocab_pad_to: int, max_len: int) -> LlamaForCausalLM:
    """A small Llama-architecture model from a config; `vocab_pad_to` widens the LM head with ids the
    tokenizer never emits. (Llama, not Qwen2: transformers 5 reloads any qwen2 checkpoint's tokenizer as
    the byte-level Qwen2Tokenizer, which would drop the character tokenizer's spaces.)"""
    vocab_size = max(len(tokenizer), vocab_pad_to)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=net.hidden,
        intermediate_size=net.intermediate,
        num_hidden_layers=net.layers,
        num_attention_heads=net.heads,
        num_key_value_heads=net.kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def supervised_batch(tokenizer, task: Task, problems, device) -> dict[str, torch.Tensor]:
    """prompt + reference solution + EOS, right-padded; labels only on the solution and EOS."""
    rows = []
    for p in problems:
        prompt = encode_prompt(tokenizer, p.prompt)
        answer = tokenizer.encode(task.solution(p), add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
    attention_mask = (torch.arange(width, device=device)[None] < torch.tensor([len(i) for i, _ in rows], device=device)[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: Task, problems, max_new_tokens: int) -> float:
    """Greedy held-out accuracy with HF generate (prepare runs before any rollout engine exists)."""
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    responses = HFEngine(model, tokenizer).generate(prompt_ids, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=0)
    # A problem counts only when fully solved (score 1.0); partial credit (planning) is not accuracy.
    return sum(task.score(p, tokenizer.decode(r, skip_special_tokens=True)) == 1.0 for p, r in zip(problems, responses)) / len(problems)


def pretrain(model, tokenizer, task: Task, net: NetConfig, seed: int, max_new_tokens: int, role: str) -> dict:
    """Supervised pre-training on fresh problems; returns the recipe's measured outcome."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=net.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < net.warmup:
            return (step + 1) / net.warmup
        if net.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - net.warmup) / max(1, net.steps - net.warmup)))
        return 1.0

    probe = task.eval_problems()[:100]  # the held-out split interleaves difficulties, so its head is a fair sample
    t0, acc, step = time.time(), float("nan"), 0
    for step in range(net.steps):
        for group in opt.param_groups:
            group["lr"] = net.lr * lr_at(step)
        model.train()
        loss = model(**supervised_batch(tokenizer, task, task.train_problems(rng, net.batch_size), "cpu")).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if net.stop_accuracy is not None and (step + 1) % 100 == 0:
            model.eval()
            acc = greedy_accuracy(model, tokenizer, task, probe, max_new_tokens)
            log.info("prepare %s: step %d loss %.3f greedy %.3f", role, step + 1, loss.item(), acc)
            if acc >= net.stop_accuracy:
                break
    model.eval()
    seconds = round(time.time() - t0, 1)
    held_out = evaluate(HFEngine(model, tokenizer), task, tokenizer, task.eval_problems(), samples=2, greedy=True,
                        max_tokens=max_new_tokens, seed=seed)
    log.info("prepare %s: held-out %s", role, held_out)
    return {"steps": step + 1, "final_loss": float(loss.item()), "seconds": seconds, "held_out": held_out}


def cache_key(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> str:
    blob = json.dumps(
        {"v": FORMAT_VERSION, "emb": {k: v for k, v in asdict(emb).items() if k != "cache_dir"},
         "task": asdict(task_cfg), "max_new_tokens": max_new_tokens, "charset": CHARSET},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pair_dir(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> Path:
    return Path(emb.cache_dir).expanduser() / f"embedded-{task_cfg.name}-{cache_key(emb, task_cfg, max_new_tokens)}"


def prepare(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> Path:
    """Build, pre-train and cache the pair (idempotent). Returns the directory holding teacher/ and student/."""
    out = pair_dir(emb, task_cfg, max_new_tokens)
    if (out / "prepare.json").exists():
        return out
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = build_task(task_cfg)
    tokenizer = build_tokenizer()
    max_len = 256 + max_new_tokens
    report = {"cache_key": out.name, "embedded": asdict(emb), "task": asdict(task_cfg)}
    for role, net, seed in (("teacher", emb.teacher, emb.seed), ("student", emb.student, emb.seed + 1)):
        log.info("prepare: training the %s (%s)", role, net)
        torch.manual_seed(seed)
        model = build_model(net, tokenizer, emb.vocab_pad_to, max_len)
        report[role] = pretrain(model, tokenizer, task, net, seed, max_new_tokens, role)
        report[role]["params"] = sum(p.numel() for p in model.parameters())
        log.info("prepare: %s done %s", role, report[role])
        tmp = out.parent / f".{out.name}.{role}.tmp"
        model.save_pretrained(tmp / role)
        tokenizer.save_pretrained(tmp / role)
        (out).mkdir(parents=True, exist_ok=True)
        if (out / role).exists():
            import shutil

            shutil.rmtree(out / role)
        (tmp / role).rename(out / role)
        tmp.rmdir()
    (out / "prepare.json").write_text(json.dumps(report, indent=2))  # written last: marks the pair complete
    return out
