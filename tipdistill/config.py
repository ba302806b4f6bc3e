"""[0] Typed config schemas, validated once at start-up.

The one source of every default: the YAML files under conf/ name an option and set only what differs
from these dataclasses (each task's own fields are in tipdistill/tasks/). Every YAML file merges into
them, so a wrongly typed value fails at composition time. `validate(cfg)` then rejects keys the schema
does not know (also those added with `+`), runs the range checks in `__post_init__`, and raises
`ConfigError` with one line that says what is wrong and how to fix it (bad_input.py words the
composition errors the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tipdistill.errors import ConfigError
from tipdistill.tasks import TaskConfig
from tipdistill.tasks.arithmetic import ArithmeticConfig

# hydra/omegaconf are imported inside the functions that need them, so the numerical modules
# (scoring, selectors, losses) import on machines with only torch (e.g. a bare GPU box).


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # absolute: see cli.py


def config_groups() -> list[str]:
    """The config group names: one directory per group under conf/ (hydra/ and local/ are not schema sections)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "local"))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_choice(value: str, choices, what: str, key: str) -> None:
    _check(value in choices, f"unknown {what} '{value}'; valid: {', '.join(sorted(choices))} (set {key}=<one of them>)")


VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class NetConfig:
    """Size and pre-training recipe of one embedded Llama-architecture model (built and trained by `prepare`)."""

    layers: int = 2
    hidden: int = 96
    intermediate: int = 384
    heads: int = 3  # head size hidden/heads must be one vLLM's CPU attention supports (32, 64, 80, 96, 128, ...)
    kv_heads: int = 3
    steps: int = 400
    lr: float = 1e-3
    warmup: int = 50
    batch_size: int = 64
    schedule: str = "constant"  # constant | cosine; a constant-lr student stays movable by distillation
    stop_accuracy: Optional[float] = None  # stop early once greedy held-out accuracy reaches this

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "steps", "batch_size"):
            _check(getattr(self, name) > 0, f"model.embedded.*.{name} must be > 0, got {getattr(self, name)}")
        _check(self.hidden % self.heads == 0, f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        _check(self.hidden // self.heads in VLLM_HEAD_SIZES,
               f"head size hidden/heads = {self.hidden // self.heads} is not one vLLM's CPU attention supports "
               f"({', '.join(map(str, VLLM_HEAD_SIZES))}); fix: change model.embedded.<net>.hidden or .heads")
        _check(self.heads % self.kv_heads == 0, f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        _check_choice(self.schedule, ("constant", "cosine"), "pre-training schedule", "model.embedded.<net>.schedule")
        _check(self.lr > 0, f"model.embedded.*.lr must be > 0, got {self.lr}")
        _check(self.warmup >= 0, f"model.embedded.*.warmup must be >= 0, got {self.warmup}")
        _check(self.stop_accuracy is None or 0 < self.stop_accuracy <= 1,
               f"model.embedded.*.stop_accuracy must be in (0, 1] or null, got {self.stop_accuracy}")


@dataclass
class EmbeddedConfig:
    """The download-free pair: a character tokenizer and two small causal LMs trained on the task."""

    teacher: NetConfig = field(default_factory=lambda: NetConfig(layers=3, hidden=128, intermediate=512, heads=4, kv_heads=2, steps=1500, lr=2e-3, warmup=100, schedule="cosine", stop_accuracy=0.97))
    student: NetConfig = field(default_factory=NetConfig)
    vocab_pad_to: int = 0  # >0: pad the LM head to this width (ids never produced), a realistic-vocab variant
    seed: int = 1234
    cache_dir: Optional[str] = None  # null: $TIPDISTILL_CACHE, else ~/.cache/tipdistill

    def __post_init__(self) -> None:
        _check(self.vocab_pad_to >= 0, f"model.embedded.vocab_pad_to must be >= 0 (0 = no padding), got {self.vocab_pad_to}")


@dataclass
class ModelConfig:
    """[0] Who distils whom. `student`/`teacher` are hub ids or local HF-format directories;
    null means the embedded pair that `tipdistill prepare` builds and caches."""

    name: str = "embedded"
    student: Optional[str] = None
    teacher: Optional[str] = None
    dtype: str = "float32"  # compute dtype: teacher and vLLM weights, student under autocast (float32 | bfloat16)
    student_dtype: str = "float32"  # the student's trainable weights: float32 master weights | bfloat16 (only with optim=adamw_kahan)
    trust_remote_code: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3
    embedded: Optional[EmbeddedConfig] = field(default_factory=EmbeddedConfig)  # null for hub/local pairs

    def __post_init__(self) -> None:
        _check(self.dtype != "float16", "model.dtype=float16 is not supported: fp16 training needs loss scaling, which tipdistill does not do; "
                                        "fix: model.dtype=bfloat16 (or float32)")
        _check_choice(self.dtype, ("float32", "bfloat16"), "dtype", "model.dtype")
        _check_choice(self.student_dtype, ("float32", "bfloat16"), "student weight dtype", "model.student_dtype")
        if self.embedded is None:
            _check(self.student is not None and self.teacher is not None,
                   "model.student and model.teacher must be set for a non-embedded pair (a hub id or a local directory)")


@dataclass
class RolloutConfig:
    """[2] Generation backend and sampling (TRL's names)."""

    engine: str = "vllm"  # vllm | hf
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # vLLM engine (names as in vLLM's LLM(...)); ignored by rollout=hf
    max_model_len: Optional[int] = None  # null: the student's context length
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.3  # CUDA: share of the GPU vLLM may take (weights + KV cache)
    tensor_parallel_size: int = 1  # CUDA: GPUs the engine shards the student over
    enable_sleep_mode: bool = False  # CUDA: vLLM sleeps (KV cache freed, weights offloaded) during teacher + update
    kv_cache_gib: float = 1.0  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)

    def __post_init__(self) -> None:
        _check(self.max_completion_length > 0, f"rollout.max_completion_length must be > 0, got {self.max_completion_length}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0 for on-policy sampling, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.gpu_memory_utilization <= 1, f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.tensor_parallel_size >= 1, f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _check(self.max_num_seqs > 0, f"rollout.max_num_seqs must be > 0, got {self.max_num_seqs}")
        _check(self.kv_cache_gib > 0, f"rollout.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        _check(self.max_model_len is None or self.max_model_len > self.max_completion_length,
               f"rollout.max_model_len={self.max_model_len} must exceed rollout.max_completion_length={self.max_completion_length} "
               "(prompt + response); fix: raise it or set it to null (the student's context)")


@dataclass
class SelectorConfig:
    """[4] Which response tokens the update trains on; the ratio is the top-level `keep`."""

    name: str = "full"
    granularity: str = "per_sequence"  # per_sequence: floor(keep*m) of each rollout | per_batch
    entropy_clip_quantile: float = 0.98  # clip h at this batch quantile before min-max scaling
    rkl_clip_quantile: Optional[float] = None  # the paper does not clip delta; set e.g. 0.98 to do so

    def __post_init__(self) -> None:
        _check_choice(self.granularity, ("per_sequence", "per_batch"), "selection granularity", "selector.granularity")
        _check(0 < self.entropy_clip_quantile <= 1, f"selector.entropy_clip_quantile must be in (0, 1], got {self.entropy_clip_quantile}")
        _check(self.rkl_clip_quantile is None or 0 < self.rkl_clip_quantile <= 1,
               f"selector.rkl_clip_quantile must be in (0, 1] or null (no clipping), got {self.rkl_clip_quantile}")


@dataclass
class ScoringConfig:
    """[4a] Per-token statistics: chunking and the (configurable, paper-less) quadrant thresholds."""

    chunk_size: Optional[int] = None  # positions per LM-head chunk (bounds the logits buffers); null: the device's measured default (fused_head.CHUNK_ROWS)
    entropy_threshold: float = 0.1  # h (entropy / ln|V|) above this counts as "high entropy"
    rkl_threshold: float = 0.1  # reverse KL (nats) above this counts as "high divergence"
    token_dump_every: int = 50  # steps between per-token parquet dumps (0 = never)
    token_dump_sequences: int = 4  # rollouts per dump

    def __post_init__(self) -> None:
        _check(self.chunk_size is None or self.chunk_size > 0, f"scoring.chunk_size must be > 0 (or null), got {self.chunk_size}")
        _check(0 <= self.entropy_threshold <= 1, f"scoring.entropy_threshold must be in [0, 1] (h is entropy / ln|V|), got {self.entropy_threshold}")
        _check(self.rkl_threshold >= 0, f"scoring.rkl_threshold must be >= 0 (nats), got {self.rkl_threshold}")
        _check(self.token_dump_every >= 0, f"scoring.token_dump_every must be >= 0 (0 = never), got {self.token_dump_every}")
        _check(self.token_dump_sequences > 0, f"scoring.token_dump_sequences must be > 0, got {self.token_dump_sequences}")


@dataclass
class LossConfig:
    """[5] The per-token divergence; the direction is in the name."""

    name: str = "reverse_kl"  # reverse_kl = KL(student||teacher) | forward_kl = KL(teacher||student) | jsd
    beta: float = 0.5  # jsd only: 0 -> forward KL end, 1 -> reverse KL end (TRL's convention)
    chunk_size: Optional[int] = None  # kept positions per LM-head chunk of the fused loss; null: the device's measured default

    def __post_init__(self) -> None:
        _check(0 <= self.beta <= 1, f"loss.beta must be in [0, 1], got {self.beta}")
        _check(self.chunk_size is None or self.chunk_size > 0, f"loss.chunk_size must be > 0 (or null), got {self.chunk_size}")


@dataclass
class OptimConfig:
    """[6] AdamW with warmup, then constant or cosine."""

    name: str = "adamw"  # adamw (torch, fp32 weights) | adamw_kahan (torch-optimi, Kahan-compensated: pure-bf16 student)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check_choice(self.name, ("adamw", "adamw_kahan"), "optimizer", "optim")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        _check_choice(self.schedule, ("constant", "cosine"), "lr schedule", "optim.schedule")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.eps > 0, f"optim.eps must be > 0 (it keeps AdamW's denominator off zero), got {self.eps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1] (a fraction of optim.lr), got {self.min_lr_ratio}")
        # a negative max norm flips the gradient's sign in clip_grad_norm_; zero stops learning
        _check(self.grad_clip > 0, f"optim.grad_clip must be > 0 (the max gradient norm), got {self.grad_clip}")


@dataclass
class LoggerConfig:
    """[7] Extra metric sink; metrics.jsonl and summary.json are always written."""

    name: str = "none"  # none | wandb
    project: str = "tipdistill"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null: online with an API key, else offline
    tags: list[str] = field(default_factory=list)
    table_every: int = 50  # steps between sampled-rollout tables (0 = never)

    def __post_init__(self) -> None:
        _check(self.table_every >= 0, f"logger.table_every must be >= 0 (0 = never), got {self.table_every}")
        if self.mode is not None:  # wandb.init's modes; any other word failed there and the run went on without W&B
            _check_choice(self.mode, ("online", "offline", "disabled", "shared", "dryrun", "run"), "W&B mode", "logger.mode")


@dataclass
class EvalConfig:
    """Held-out accuracy: sampled at temperature 1.0 (mean over `samples` per problem) and greedy."""

    samples: int = 2
    greedy: bool = True

    def __post_init__(self) -> None:
        _check(self.samples > 0, f"eval.samples must be > 0, got {self.samples}")


@dataclass
class TrainConfig:
    """[0] The primary config of `tipdistill train`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=ArithmeticConfig)  # each task's own schema: tipdistill/tasks/
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    keep: float = 1.0  # retention ratio rho in (0, 1]; ignored by selector=full
    seed: int = 0
    steps: int = 200
    eval_every: int = 50
    prompts_per_step: int = 32
    rollouts_per_prompt: int = 2
    micro_batch_size: int = 64  # sequences per forward/backward; gradients accumulate over the step
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "."
    checkpoint_every: int = 50  # steps between checkpoints (also one at the end); 0 = only at the end
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    resume: Optional[str] = None  # a run directory to continue from its last checkpoint; "true" = this run dir; "auto" = this one if it has one
    max_consecutive_skips: int = 5  # non-finite loss/grad steps in a row before the run stops
    # [3]-[6] memory knobs for large models (useful on CUDA; they run, slower, on CPU); bf16 compute is model.dtype
    gradient_checkpointing: bool = False  # recompute the student's decoder layers in backward
    teacher_offload: bool = False  # teacher body on CPU except while it scores (two-phase); its LM head stays

    def __post_init__(self) -> None:
        _check(0 < self.keep <= 1, f"keep must be in (0, 1], got {self.keep} (e.g. keep=0.2 trains on 20% of response tokens)")
        for name in ("steps", "prompts_per_step", "rollouts_per_prompt", "micro_batch_size", "keep_checkpoints", "max_consecutive_skips"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        _check(self.eval_every >= 0, f"eval_every must be >= 0 (0 = only at start and end), got {self.eval_every}")
        # vLLM seeds numpy with it, which takes 0 <= seed < 2**32 (and fails only once both models are loaded)
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}")
        _check_choice(self.device, ("auto", "cpu", "cuda"), "device", "device")
        self._check_precision()
        _check_names(self)

    def _check_precision(self) -> None:
        """The dtype policy (tipdistill/precision.py): fp32 master weights unless pure bf16 is asked for
        explicitly, and then only with an optimizer that keeps small updates."""
        m, o = self.model, self.optim
        if m.student_dtype == "bfloat16":
            _check(o.name == "adamw_kahan", "model.student_dtype=bfloat16 with plain AdamW: bf16 weights round away every update smaller "
                                            "than about |w|/512 (at lr 1e-6 nearly all of them); fix: drop model.student_dtype (fp32 master "
                                            "weights, the default) or add optim=adamw_kahan (Kahan-compensated bf16 updates)")
            _check(m.dtype == "bfloat16", "model.student_dtype=bfloat16 needs model.dtype=bfloat16 (the compute dtype); fix: set both")
        else:
            _check(o.name == "adamw", "optim=adamw_kahan compensates bf16 weights, but the student's are float32; "
                                      "fix: add model.student_dtype=bfloat16 (pure bf16) or use optim=adamw")


def _check_names(cfg: TrainConfig) -> None:
    """Fail fast on an unknown selector, loss, rollout engine, task or logger name. Each registry lives
    with its stage; none of those modules imports this one, so the lazy imports close no cycle."""
    from tipdistill.losses import DIVERGENCES
    from tipdistill.rollout import ENGINES
    from tipdistill.selectors import SELECTORS
    from tipdistill.sinks import SINKS
    from tipdistill.tasks import TASKS

    for registry, name in ((SELECTORS, cfg.selector.name), (DIVERGENCES, cfg.loss.name), (ENGINES, cfg.rollout.engine),
                           (TASKS, cfg.task.name), (SINKS, cfg.logger.name)):
        _check(name in registry, registry.unknown(name))
    own = TASKS.get(cfg.task.name).config
    _check(isinstance(cfg.task, own), f"task.name={cfg.task.name} does not match the task fields of {type(cfg.task).__name__}; "
                                      f"fix: choose the task with task={cfg.task.name} (the config group), not task.name=")


def launch_time(pattern: str) -> str:
    """`${launch:%H-%M-%S}` in run and sweep directories: the time this job started, the same on every rank
    of a torchrun job (rank 0's clock, passed as TIPDISTILL_LAUNCH_TIME; Hydra's `${now:}` would be read on
    each rank, seconds apart: hydra #2070); the current time in one process."""
    import os
    from datetime import datetime

    shared = os.environ.get("TIPDISTILL_LAUNCH_TIME")
    return (datetime.fromtimestamp(float(shared)) if shared else datetime.now()).strftime(pattern)


def register_resolvers() -> None:
    """`${launch:...}`: needed wherever a config is resolved, also in a submitit task, which unpickles
    the launcher and its config without running the CLI's main()."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("launch"):
        OmegaConf.register_new_resolver("launch", launch_time, use_cache=True)


def register_configs() -> None:
    """Make the schemas available to Hydra's defaults lists: `base_train` (conf/train.yaml) and one
    `<task>_schema` per task (conf/task/<task>.yaml starts from its own)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from tipdistill.tasks import TASKS

    register_resolvers()
    cs = ConfigStore.instance()
    base = OmegaConf.structured(TrainConfig)
    # The task node is typed by the base class, so that whichever task schema the task group picks
    # can merge into it (a merge may narrow a node to a subclass, never switch between siblings).
    base.task = OmegaConf.structured(TaskConfig)
    cs.store(name="base_train", node=base)
    for name in TASKS:
        cs.store(group="task", name=f"{name}_schema", node=TASKS.get(name).config)


def chosen_task(overrides: Iterable[str] = ()) -> str:
    """The task a command line picks: its last `task=` override, else the one conf/train.yaml's defaults
    list names. Lets a composition error be checked against the right task's keys (no composed config yet;
    a task chosen inside an experiment file is not seen here, so such errors fall back to the base keys)."""
    from omegaconf import OmegaConf

    picked = [o.lstrip("+").split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("task=")]
    if picked:
        return picked[-1]
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    return next(str(d["task"]) for d in defaults if not isinstance(d, str) and "task" in d)


def schema_for(task: Any) -> type:
    """The schema a config is checked against: TrainConfig with `task` narrowed to one task's own config
    class (each task owns its fields), so `task.digits` is known with arithmetic and `task.path` is an
    unknown key there. `task`: that class, or a task name; anything else keeps the base."""
    import dataclasses

    from tipdistill.tasks import TASKS

    own = task if isinstance(task, type) and issubclass(task, TaskConfig) else None
    if own is None and isinstance(task, str) and task in TASKS:
        own = TASKS.get(task).config
    if own is None or own is TaskConfig:
        return TrainConfig
    # the narrowed class only describes keys; range checks run when the real TrainConfig is built
    return dataclasses.make_dataclass(f"TrainConfig_{own.__name__}", [("task", own, field(default_factory=own))],
                                      bases=(TrainConfig,), namespace={"__post_init__": lambda self: None})


def validate(cfg, overrides: Iterable[str] = ()) -> TrainConfig:
    """Turn the composed config into a typed, range-checked TrainConfig (raises ConfigError).

    First every key must be one the schema knows (`+typo=1` is an error, not a silently ignored
    key); `overrides`, the command line as typed, also catch a config group removed with `~`."""
    from omegaconf import OmegaConf

    from tipdistill import bad_input

    schema = schema_for(OmegaConf.get_type(cfg, "task"))  # the composed task node's own class
    problem = bad_input.check_keys(cfg, schema, overrides, config_groups())
    if problem is not None:
        raise ConfigError(problem)
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's errors (types, interpolations): one line; anything else is a bug
        line = bad_input.describe(exc, schema, overrides, config_groups())
        if line is None:
            raise
        raise ConfigError(line) from None
    problem = bad_input.non_finite(typed)
    if problem is not None:
        raise ConfigError(problem)
    return typed  # type: ignore[return-value]


def to_plain(cfg: Any) -> dict:
    """Resolved plain dict of a config (for logs and W&B: never hand it a DictConfig)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
