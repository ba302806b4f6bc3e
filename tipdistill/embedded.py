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
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tipdistill.config import EmbeddedConfig, NetConfig
from tipdistill.evaluate import evaluate
from tipdistill.rollout import token_rules
from tipdistill.rollout.hf_engine import HFEngine
from tipdistill.tasks import Task, TaskConfig, build_task, encode_prompt

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


def build_model(net: NetConfig, tokenizer: PreTrainedTokenizerFast, max_len: int) -> LlamaForCausalLM:
    """A small Llama-architecture model from a config, one LM-head row per token (`widen` pads it).
    (Llama, not Qwen2: transformers 5 reloads any qwen2 checkpoint's tokenizer as the byte-level
    Qwen2Tokenizer, which would drop the character tokenizer's spaces.)"""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
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


def hf_engine(model, tokenizer) -> HFEngine:
    """Generation from the in-memory model (prepare runs before anything is saved), with the stop rule
    the saved pair will have."""
    return HFEngine(model, token_rules(tokenizer, model.config.max_position_embeddings, model.generation_config))


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: Task, problems, max_new_tokens: int) -> float:
    """Greedy held-out accuracy with HF generate (prepare runs before any rollout engine exists)."""
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    responses = hf_engine(model, tokenizer).generate(prompt_ids, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=0)
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
    held_out = evaluate(hf_engine(model, tokenizer), task, tokenizer, task.eval_problems(), samples=2, greedy=True,
                        max_tokens=max_new_tokens, seed=seed)
    log.info("prepare %s: held-out %s", role, held_out)
    return {"steps": step + 1, "final_loss": float(loss.item()), "seconds": seconds, "held_out": held_out}


# Pairs prepared before each task owned its config fields hashed one flat task config holding every
# task's fields, null where a task had none, and planning's cell counts under the name `digits`.
# Hashing a task's fields in that layout keeps every pair prepared since then valid.
_FLAT_TASK_FIELDS = ("digits", "path", "split", "eval_path", "eval_name")
_FLAT_NAMES = {"forbidden_cells": "digits"}


def cache_key(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> str:
    task = dict.fromkeys(_FLAT_TASK_FIELDS)
    task.update({_FLAT_NAMES.get(k, k): v for k, v in asdict(task_cfg).items()})
    blob = json.dumps(
        {"v": FORMAT_VERSION, "emb": {k: v for k, v in asdict(emb).items() if k != "cache_dir"},
         **({"wide": "padded-from-narrow"} if emb.vocab_pad_to else {}),
         "task": task, "max_new_tokens": max_new_tokens, "charset": CHARSET},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pair_dir(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> Path:
    cache_dir = emb.cache_dir or os.environ.get("TIPDISTILL_CACHE") or "~/.cache/tipdistill"
    return Path(cache_dir).expanduser() / f"embedded-{task_cfg.name}-{cache_key(emb, task_cfg, max_new_tokens)}"


def widen(model: LlamaForCausalLM, width: int, calibration: dict[str, torch.Tensor], margin: float = 25.0) -> LlamaForCausalLM:
    """The same model with its (tied) embedding / LM head padded to `width` ids, behaviour kept.

    The extra rows all point along -u, where u is the least-squares solution of h . u = 1 over the
    final hidden states h of the calibration positions (prompts + reference solutions), scaled so that
    at every calibration position their logit sits at least `margin` nats below the best real id. The
    extra ids then carry ~0 probability (`extra_id_mass` measures it on held-out data), like the
    unused padded rows of real vocabularies, while every logits tensor becomes `width` wide."""
    n = model.config.vocab_size
    hidden_N_H = _final_hidden(model, calibration)
    u_H = torch.linalg.lstsq(hidden_N_H, torch.ones(hidden_N_H.shape[0], 1)).solution[:, 0]
    along_N = hidden_N_H @ u_H
    if float(along_N.min()) <= 0:
        raise RuntimeError("widen: no direction is positive on every calibration hidden state; cannot pad the head safely")
    best_N = (hidden_N_H @ model.get_output_embeddings().weight.T).max(-1).values
    alpha = float(((margin - best_N) / along_N).clamp(min=0).max())
    model.resize_token_embeddings(width, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = -alpha * u_H
    return model


@torch.no_grad()
def _final_hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.last_hidden_state[batch["attention_mask"].bool()]


@torch.no_grad()
def extra_id_mass(model, n_real: int, batch: dict[str, torch.Tensor]) -> float:
    """Largest probability any position gives to the padded ids (should be ~0)."""
    logits = model.get_output_embeddings()(_final_hidden(model, batch)).float()
    return float(logits.softmax(-1)[:, n_real:].sum(-1).max())


def prepare(emb: EmbeddedConfig, task_cfg: TaskConfig, max_new_tokens: int) -> Path:
    """Build, pre-train and cache the pair (idempotent). Returns the directory holding teacher/ and student/."""
    out = pair_dir(emb, task_cfg, max_new_tokens)
    if (out / "prepare.json").exists():
        return out
    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = build_task(task_cfg)
    tokenizer = build_tokenizer()
    report = {"cache_key": out.name, "embedded": asdict(emb), "task": asdict(task_cfg)}
    if emb.vocab_pad_to > len(tokenizer):
        # A wide pair is the narrow pair padded: pre-training at a 32k-wide head would take an hour on
        # 2 cores and teach nothing new; the padded ids are never produced, as in real vocabularies.
        narrow = prepare(replace(emb, vocab_pad_to=0), task_cfg, max_new_tokens)
        base = json.loads((narrow / "prepare.json").read_text())
        calibration = supervised_batch(tokenizer, task, task.train_problems(random.Random(emb.seed), 256), "cpu")
        held = supervised_batch(tokenizer, task, task.eval_problems(), "cpu")
        for role in ("teacher", "student"):
            model = widen(LlamaForCausalLM.from_pretrained(narrow / role), emb.vocab_pad_to, calibration)
            report[role] = {**base[role], "params": sum(p.numel() for p in model.parameters()),
                            "widened_from": narrow.name, "vocab_width": emb.vocab_pad_to,
                            "extra_id_mass_max_held_out": extra_id_mass(model, len(tokenizer), held),
                            "held_out": evaluate(hf_engine(model, tokenizer), task, tokenizer, task.eval_problems(), samples=2,
                                                 greedy=True, max_tokens=max_new_tokens, seed=emb.seed + (role == "student"))}
            log.info("prepare: widened %s to %d ids: %s", role, emb.vocab_pad_to, report[role])
            _save(model, tokenizer, out, role)
    else:
        max_len = 256 + max_new_tokens
        for role, net, seed in (("teacher", emb.teacher, emb.seed), ("student", emb.student, emb.seed + 1)):
            log.info("prepare: training the %s (%s)", role, net)
            torch.manual_seed(seed)
            model = build_model(net, tokenizer, max_len)
            report[role] = pretrain(model, tokenizer, task, net, seed, max_new_tokens, role)
            report[role]["params"] = sum(p.numel() for p in model.parameters())
            log.info("prepare: %s done %s", role, report[role])
            _save(model, tokenizer, out, role)
    (out / "prepare.json").write_text(json.dumps(report, indent=2))  # written last: marks the pair complete
    return out


def _save(model, tokenizer, out: Path, role: str) -> None:
    """Write to a temp dir, then rename: a killed prepare never leaves a half-written model."""
    import shutil

    tmp = out.parent / f".{out.name}.{role}.tmp"
    model.save_pretrained(tmp / role)
    tokenizer.save_pretrained(tmp / role)
    out.mkdir(parents=True, exist_ok=True)
    if (out / role).exists():
        shutil.rmtree(out / role)
    (tmp / role).rename(out / role)
    tmp.rmdir()
