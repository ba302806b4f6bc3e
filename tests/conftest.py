"""Shared fixtures: a tiny embedded pair prepared once per session (seconds, not minutes),
hermetic W&B and cache locations."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")

# Small enough to prepare in seconds; the same code path as the default pair.
TINY_PAIR = [
    "model.embedded.teacher.steps=40", "model.embedded.teacher.stop_accuracy=null",
    "model.embedded.teacher.layers=1", "model.embedded.teacher.hidden=32", "model.embedded.teacher.heads=1", "model.embedded.teacher.kv_heads=1", "model.embedded.teacher.intermediate=64",
    "model.embedded.student.steps=20", "model.embedded.student.layers=1", "model.embedded.student.hidden=32",
    "model.embedded.student.intermediate=64", "model.embedded.student.heads=1", "model.embedded.student.kv_heads=1", "task.eval_size=12", "rollout.max_completion_length=40",
]
TINY_RUN = ["steps=2", "eval_every=1", "prompts_per_step=4", "rollouts_per_prompt=2", "eval.samples=1"]


# Tiny models: one thread beats two (thread hand-offs dominate), and CI has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("env")
    os.environ.setdefault("TIPDISTILL_CACHE", str(base / "cache"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ[var] = str(base / var.lower())
    os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE", "offline")
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return base


def tiny_qwen(seed: int, *, vocab: int, layers: int, tied: bool):
    """A random Qwen2ForCausalLM small enough for unit tests of the update path (hidden 32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg)


def random_rollout(vocab: int, prompt_lens: tuple[int, ...], response_lens: tuple[int, ...]):
    """A rollout batch of random ids, len(response_lens) / len(prompt_lens) responses per prompt."""
    import torch

    from tipdistill.rollout import TokenRules, make_rollout

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in response_lens]
    rules = TokenRules(stop_ids=(1,), pad_id=0, n_token_ids=vocab, context=max(prompt_lens) + max(response_lens) + 1)
    return make_rollout(prompts, responses, len(responses) // len(prompts), rules)


def stats_of(h, rkl, fkl=None, mask=None):
    """TokenStats from nested lists ([B][T]); fkl defaults to 0 and the mask to all valid."""
    import torch

    from tipdistill.types import TokenStats

    h = torch.tensor(h, dtype=torch.float32)
    rkl = torch.tensor(rkl, dtype=torch.float32)
    fkl = torch.zeros_like(h) if fkl is None else torch.tensor(fkl, dtype=torch.float32)
    mask = torch.ones_like(h, dtype=torch.bool) if mask is None else torch.tensor(mask)
    return TokenStats(h_B_T=h * mask, rkl_B_T=rkl * mask, fkl_B_T=fkl * mask, mask_B_T=mask)


def compose(overrides: list[str] | None = None):
    """The real Hydra composition of conf/train.yaml, as the CLI does it."""
    return compose_many([list(overrides or [])])[0]


def compose_many(override_lists: list[list[str]], hydra_config: bool = False) -> list:
    """Compose conf/train.yaml once per override list inside one Hydra initialisation (faster than one each)."""
    from hydra import compose as hydra_compose

    with hydra_session():
        return [hydra_compose(config_name="train", overrides=o, return_hydra_config=hydra_config) for o in override_lists]


@contextmanager
def hydra_session():
    """One Hydra initialisation over conf/ for every composition inside it (the 1,000 fuzz cases: 292 s with
    one initialisation each, 250 s with one in all); nested sessions reuse the outer one."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tipdistill.config import register_configs

    if GlobalHydra.instance().is_initialized():
        yield
        return
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A directory holding one untrained tiny embedded-architecture model and its tokenizer (HF format):
    for tests that need a saved model but not a trained pair (no `prepare`)."""
    from tipdistill.config import NetConfig
    from tipdistill.embedded import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer()
    build_model(NetConfig(layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64), tok, 64).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def load_config(overrides: list[str]):
    """What `tipdistill train <overrides>` does before any work: Hydra composition, then validation.
    Returns the TrainConfig, or raises ConfigError with the one line the CLI prints (exit code 2)."""
    from tipdistill.bad_input import describe
    from tipdistill.config import ConfigError, chosen_task, config_groups, schema_for, validate

    try:
        cfg = compose(overrides)
    except Exception as exc:  # the CLI words composition errors the same way (cli._run_app)
        line = describe(exc, schema_for(chosen_task(overrides)), overrides, config_groups())
        if line is None:
            raise
        raise ConfigError(line) from None
    return validate(cfg, overrides=overrides)


@pytest.fixture(scope="session")
def tiny_pair(hermetic_env):
    """(student_dir, teacher_dir, typed config) of a tiny prepared embedded pair."""
    from tipdistill.config import validate
    from tipdistill.models import resolve_pair

    cfg = validate(compose(TINY_PAIR))
    student, teacher = resolve_pair(cfg)
    return student, teacher, cfg
