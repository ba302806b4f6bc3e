"""[0] Loading the teacher/student pair through `from_pretrained`, with cheap checks first.

`check_pair` reads only configs and tokenizers, so a missing path or a vocabulary mismatch costs
seconds, not a model load or a rollout.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tipdistill.config import ConfigError, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_pair(cfg: TrainConfig, *, prepare_if_missing: bool = True) -> tuple[str, str]:
    """(student, teacher) paths or hub ids; for the embedded pair, run `prepare` when not cached."""
    if cfg.model.embedded is None or (cfg.model.student and cfg.model.teacher):
        return str(cfg.model.student), str(cfg.model.teacher)
    from tipdistill import embedded

    out = embedded.pair_dir(cfg.model.embedded, cfg.task, cfg.rollout.max_completion_length)
    if not (out / "prepare.json").exists():
        if not prepare_if_missing:
            raise ConfigError(f"embedded pair not prepared at {out}; fix: run `tipdistill prepare` with the same model/task overrides")
        out = embedded.prepare(cfg.model.embedded, cfg.task, cfg.rollout.max_completion_length)
    return cfg.model.student or str(out / "student"), cfg.model.teacher or str(out / "teacher")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or name.count("/") != 1


def _load_meta(name: str, role: str, trust_remote_code: bool):
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{role} model path '{name}' does not exist; fix: set model.{role}=<an HF-format directory or a hub id>")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {role} model '{name}' ({first}); fix: set model.{role}=<an HF-format directory or a cached hub id>") from None
    return config, tokenizer


def check_pair(student: str, teacher: str, trust_remote_code: bool = False) -> int:
    """Fail fast unless both models share one tokenizer. Returns the logits width both heads share.

    Heads padded to different widths within one family (Qwen 151,936 vs 152,064) are fine: the
    divergence is computed over the shared prefix of ids, which covers every id the tokenizer emits.
    """
    s_cfg, s_tok = _load_meta(student, "student", trust_remote_code)
    t_cfg, t_tok = _load_meta(teacher, "teacher", trust_remote_code)
    if s_tok.get_vocab() != t_tok.get_vocab():
        raise ConfigError(
            f"teacher and student vocabularies differ ({len(t_tok)} vs {len(s_tok)} tokens); fix: pick a pair that shares one tokenizer"
        )
    s_width, t_width = s_cfg.get_text_config().vocab_size, t_cfg.get_text_config().vocab_size
    if s_width > t_width:
        raise ConfigError(f"the student's LM head ({s_width} ids) is wider than the teacher's ({t_width}): the student could sample "
                          "ids the teacher cannot score; fix: swap in a student whose head is no wider than the teacher's")
    width = min(s_width, t_width)
    if width < len(s_tok):
        raise ConfigError(f"LM head width {width} is smaller than the tokenizer ({len(s_tok)} tokens); fix: check model.student/model.teacher")
    return width


def load_model(name: str, dtype: str, device: torch.device, *, trainable: bool, trust_remote_code: bool = False):
    model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def resident_head(model, device: torch.device) -> torch.nn.Linear:
    """The LM head as a linear layer that stays on `device` when the body (`model.model`) is moved away.

    Tied embeddings (small Qwen models) share one tensor between the input embedding and the head,
    so moving the body would take the head with it: those get a frozen copy on `device` (still a
    `nn.Linear`, which the fused LM-head pass projects through)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return head
    weight = head.weight.detach().to(device)
    copy = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(head, "bias", None) is not None,
                           device="meta", dtype=weight.dtype)
    copy.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    if copy.bias is not None:
        copy.bias = torch.nn.Parameter(head.bias.detach().to(device).clone(), requires_grad=False)
    return copy


@contextmanager
def visiting(module: torch.nn.Module, device: torch.device, enabled: bool):
    """Two-phase placement (`teacher_offload`): the module lives on CPU and is on `device` only inside
    the block; the allocator's cache is released after it leaves."""
    if not enabled:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_context(name: str) -> int:
    cfg = AutoConfig.from_pretrained(name).get_text_config()
    return int(getattr(cfg, "max_position_embeddings", 2048))
