"""Seeded fuzzing of command-line overrides through the real Hydra composition and validation.

Every case must end in a valid config or in the one line the CLI prints (ConfigError, exit code 2),
before any model or engine loads. Cases come from bad-input classes (types, ranges, choices, broken
interpolations, unknown and removed keys, group options, override syntax, combinations that are
valid one by one but not together) and from random mixes of valid overrides. The quick tier runs a
sample; the integration tier runs 1,000 cases. `pytest -s` prints the outcome of each class.
"""

from __future__ import annotations

import collections
import math
import random
import sys
import typing
from pathlib import Path

import pytest

from conftest import CONF_DIR, hydra_session, load_config

UNSET_ENV = "TIPDISTILL_FUZZ_UNSET"


class LoadedTooEarly(BaseException):
    """A model or engine started loading while only the config was being checked."""


@pytest.fixture
def no_loading(monkeypatch):
    """Tripwires on every way a model or an engine loads; vLLM must not even be imported."""
    import transformers

    import tipdistill.embedded
    import tipdistill.models
    import tipdistill.rollout.hf_engine

    def tripwire(*args, **kwargs):
        raise LoadedTooEarly("a model or engine loaded during config checks")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(tripwire))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tripwire)
    monkeypatch.setattr(tipdistill.models, "load_model", tripwire)
    monkeypatch.setattr(tipdistill.embedded, "prepare", tripwire)
    monkeypatch.setattr(tipdistill.rollout.hf_engine.HFEngine, "__init__", tripwire)
    vllm_before = "vllm" in sys.modules
    if vllm_before:
        monkeypatch.setattr(sys.modules["vllm"], "LLM", tripwire)
    yield
    assert vllm_before or "vllm" not in sys.modules, "config checks imported vLLM"


# ---------------------------------------------------------------- what the schema offers


def _schema():
    from tipdistill.bad_input import _section, schema_keys
    from tipdistill.config import schema_for
    from tipdistill.tasks import TASKS

    keys = {}  # every task's own fields too: a field of another task than the chosen one is an unknown key
    for name in TASKS:
        keys.update(schema_keys(schema_for(name)))
    leaves = {k: a for k, a in keys.items() if _section(a) is None and typing.get_origin(a) is not dict}
    return keys, leaves


KEYS, LEAVES = _schema()
GROUPS = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in Path(CONF_DIR).iterdir()
          if d.is_dir() and d.name not in ("hydra", "local")}
NUMERIC = [k for k, a in LEAVES.items() if {int, float} & {a, *typing.get_args(a)}]
LISTS = [k for k, a in LEAVES.items() if typing.get_origin(a) is list]
STRINGS = [k for k, a in LEAVES.items() if str in (a, *typing.get_args(a)) and k not in ("output_dir", "resume")]


def _kind(key: str) -> str:
    a = LEAVES[key]
    base = [t for t in (a, *typing.get_args(a)) if t in (bool, int, float, str)]
    return "list" if typing.get_origin(a) is list else (base[0].__name__ if base else "other")


WRONG_TYPE = {
    "float": ["abc", "[1,2]", "{a:1}", "''", "true", "null"],
    "int": ["1.5", "abc", "[1]", "{a:1}", "''", "null", "1e3"],
    "bool": ["maybe", "2", "[true]", "{a:1}", "null", "'yes please'"],
    "str": ["[a,b]", "{a:1}"],
    "list": ["5", "abc", "[a]", "{a:1}", "[1.5]", "[[1]]", "null"],
}
OUT_OF_RANGE = ["0", "-1", "-0.5", "2", "1e9", "1e-400", "nan", "inf", "-inf", "4294967296", "-4294967296", "99999999999999999999"]
BAD_WORDS = ["", "nope", "None", "FULL", "per-batch", "float64", "Float32", "'two words'", "offline_please", "type aware"]
INTERPOLATIONS = ["${nope}", "${oc.env:%s}" % UNSET_ENV, "${broken", "'${broken'", "${oc.nope:x}", "${oc.env:HOME}",
                  "${oc.env:%s,0.5}" % UNSET_ENV, "${oc.select:nope,1}", "${oc.decode:'[1,2]'}", "${.}", "${}", "$${x}"]
SYNTAX = ["keep", "=1", "keep=1=2", "keep=0.5,0.2", "keep=range(1,3)", "keep=choice(0.1,0.2)", "keep==1", "keep=[",
          "keep={", 'keep="abc', "+", "~", "keep= 0.5", "++", "+=1", "~=x", "keep=0.5 seed=1", "selector=full,q3",
          "glob(*)", "keep=interval(0,1)", "keep=shuffle(1,2)", ".keep=0.5", "keep.=0.5", "keep..x=1", "hydra=1"]
# Each valid alone, wrong together (or a key that the rest of the config leaves without meaning).
CONFLICTS = [
    ["rollout.max_model_len=64", "rollout.max_completion_length=64"],
    ["rollout.max_model_len=32", "rollout.max_completion_length=100"],
    ["model=qwen3_8b_to_4b", "model.embedded.seed=1"],
    ["model=qwen3_8b_to_4b", "model.embedded.student.layers=2"],
    ["model.embedded=null"],
    ["model.embedded=null", "model.student=/s"],
    ["task=arithmetic", "task.path=/data/train.jsonl"],
    ["task=planning", "task.eval_path=/data/eval.jsonl"],
    ["task=arithmetic", "task.eval_name=math500"],
    ["task=math500", "task.name=arithmetic"],
    ["task=planning", "task.digits=[40]"],
    ["model.embedded.student.hidden=96", "model.embedded.student.heads=4"],
    ["model.embedded.teacher.heads=4", "model.embedded.teacher.kv_heads=3"],
    ["optim.schedule=cosine", "optim.min_lr_ratio=1.5"],
    ["loss=jsd", "loss.beta=1.5"],
    ["selector=type_aware", "keep=0"],
    ["experiment=table_q3", "keep=2"],
    ["model=qwen3_8b_to_4b", "model.student=null"],
    ["rollout=hf", "rollout.engine=sglang"],
    ["model.student_dtype=bfloat16"],
    ["model.student_dtype=bfloat16", "optim=adamw_kahan"],
    ["optim=adamw_kahan"],
]
VALID = {  # small pools of values each valid on its own, mixed at random
    "keep": ["0.1", "0.2", "0.5", "1.0", "1"], "seed": ["0", "1", "7", "123456"], "steps": ["1", "5", "200"],
    "eval_every": ["0", "1", "50"], "prompts_per_step": ["1", "4", "32"], "rollouts_per_prompt": ["1", "2", "16"],
    "micro_batch_size": ["1", "8", "64"], "checkpoint_every": ["0", "10"], "device": ["auto", "cpu", "cuda"],
    "rollout.max_completion_length": ["8", "64", "512"], "rollout.max_model_len": ["null", "128", "4096"],
    "rollout.temperature": ["0.7", "1.0"], "rollout.top_p": ["0.9", "1.0"], "rollout.top_k": ["0", "20"],
    "selector.granularity": ["per_sequence", "per_batch"], "loss.beta": ["0", "0.5", "1"],
    "optim.lr": ["1e-6", "3e-4"], "optim.schedule": ["constant", "cosine"], "optim.warmup_steps": ["0", "10", "1000"],
    "optim.min_lr_ratio": ["0", "0.1"], "scoring.chunk_size": ["1", "64", "512"], "loss.chunk_size": ["1", "512"],
    "eval.samples": ["1", "16"], "model.dtype": ["float32", "bfloat16"], "logger.mode": ["null", "offline", "disabled"],
    "task.digits": ["[2]", "[2,3,4]", "[1,5]"], "gradient_checkpointing": ["true", "false"], "teacher_offload": ["true", "false"],
}


def _conflict(rng: random.Random) -> list[str]:
    """Overrides each valid alone that do not fit together, from a few families with random values."""
    family = rng.randrange(6)
    if family == 0:
        limit = rng.choice([16, 32, 64, 128])
        return [f"rollout.max_model_len={limit}", f"rollout.max_completion_length={limit + rng.choice([-8, 0, 8, 100])}"]
    if family == 1:
        leaf = rng.choice([k for k in LEAVES if k.startswith("model.embedded.")])
        value = rng.choice(VALID.get(leaf.rsplit(".", 1)[-1], ["1"]))
        return [f"model={rng.choice([g for g in GROUPS['model'] if not g.startswith('embedded')])}", f"{leaf}={value}"]
    if family == 2:
        data = rng.choice(["task.path=/data/train.jsonl", "task.split=test", "task.eval_path=/data/eval.jsonl", "task.eval_name=math500"])
        return [f"task={rng.choice(['arithmetic', 'planning'])}", data]
    if family == 3:
        net = rng.choice(["teacher", "student"])
        return [f"model.embedded.{net}.hidden={rng.choice([64, 96, 128, 192])}", f"model.embedded.{net}.heads={rng.choice([1, 2, 3, 4, 5])}",
                f"model.embedded.{net}.kv_heads={rng.choice([1, 2, 3])}"]
    if family == 4:
        return [f"{rng.choice(['+', ''])}{rng.choice(list(GROUPS))}={rng.choice(['nope', 'null'])}", rng.choice(rng.choice(CONFLICTS))]
    return list(rng.choice(CONFLICTS))


def _typo(key: str, rng: random.Random) -> str:
    parts = key.split(".")
    leaf = parts[-1]
    how = rng.randrange(5)
    if how == 0 and len(leaf) > 2:  # drop a letter
        i = rng.randrange(len(leaf))
        leaf = leaf[:i] + leaf[i + 1:]
    elif how == 1 and len(leaf) > 2:  # swap two letters
        i = rng.randrange(len(leaf) - 1)
        leaf = leaf[:i] + leaf[i + 1] + leaf[i] + leaf[i + 2:]
    elif how == 2:  # a right name in the wrong section
        return f"{rng.choice(['selector', 'loss', 'optim', 'rollout', 'task', 'eval'])}.{leaf}"
    elif how == 3:
        leaf += rng.choice(["s", "_", "2", "x"])
    else:
        return rng.choice(["unknown_key", "lr", "learning_rate", "max_tokens", "batch_size", "model.name2", "temperature"])
    return ".".join(parts[:-1] + [leaf])


def case(cls: str, rng: random.Random) -> list[str]:
    """One fuzz case of a class: a list of overrides."""
    if cls == "type":
        key = rng.choice(list(LEAVES))
        return [f"{key}={rng.choice(WRONG_TYPE.get(_kind(key), ['[1]']))}"]
    if cls == "range":
        return [f"{rng.choice(NUMERIC)}={rng.choice(OUT_OF_RANGE)}"]
    if cls == "choice":
        return [f"{rng.choice(STRINGS)}={rng.choice(BAD_WORDS)}"]
    if cls == "list_shape":
        items = [rng.choice(["0", "1", "-1", "0.9", "0.999", "1.0", "2", "100", "1e-9", "-0.5"]) for _ in range(rng.randint(0, 4))]
        return [f"{rng.choice(LISTS)}=[{','.join(items)}]"]
    if cls == "interpolation":
        key = rng.choice(list(LEAVES))
        value = rng.choice(INTERPOLATIONS + [f"${{{rng.choice(list(LEAVES))}}}", f"${{{key}}}"])
        return [f"{key}={value}"]
    if cls == "unknown_key":
        key = _typo(rng.choice(list(KEYS)), rng)
        return [f"{rng.choice(['+', '++', ''])}{key}={rng.choice(['1', '0.2', 'abc', 'true'])}"]
    if cls == "removed_key":
        key = rng.choice([*KEYS, *GROUPS, "experiment", "model.chat_template_kwargs.enable_thinking"])
        return [f"~{key}"]
    if cls == "group":
        group = rng.choice(list(GROUPS))
        option = rng.choice(GROUPS[group] + ["nope", ""])
        form = rng.randrange(5)
        if form == 0:
            return [f"+{group}={option}"]
        if form == 1:
            return [f"{group}=[{','.join(rng.sample(GROUPS[group], min(2, len(GROUPS[group]))))}]"]
        if form == 2:
            return [f"{group}=null"]
        return [f"{group}={option}"]
    if cls == "syntax":
        if rng.random() < 0.3:
            return [rng.choice(SYNTAX)]
        text = f"{rng.choice(['', '+', '~', '++'])}{rng.choice(list(LEAVES))}={rng.choice(['0.5', 'abc', '[1,2]', 'true'])}"
        for _ in range(rng.randint(1, 3)):  # splice in characters the override grammar gives a meaning to
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(list("=[]{}$,'\"(): @/\\*")) + text[i:]
        return [text]
    if cls == "combination":
        return _conflict(rng)
    if cls == "valid_mix":
        keys = rng.sample(list(VALID), rng.randint(1, 4))
        mix = [f"{k}={rng.choice(VALID[k])}" for k in keys]
        if rng.random() < 0.5:
            group = rng.choice(["selector", "loss", "rollout", "task", "logger", "model"])
            mix.insert(0, f"{group}={rng.choice(GROUPS[group])}")
        return mix
    raise ValueError(cls)


CLASSES = ["type", "range", "choice", "list_shape", "interpolation", "unknown_key", "removed_key", "group", "syntax",
           "combination", "valid_mix"]


def cases(n: int, seed: int = 17) -> list[tuple[str, list[str]]]:
    """n distinct cases, the classes in turn; a class whose pool is used up makes room for the rest."""
    rng = random.Random(seed)
    out, seen, stale = [], set(), collections.Counter()
    while len(out) < n:
        cls = CLASSES[len(out) % len(CLASSES)] if stale[CLASSES[len(out) % len(CLASSES)]] < 50 else "valid_mix"
        overrides = case(cls, rng)
        if tuple(overrides) in seen:
            stale[cls] += 1
            continue
        seen.add(tuple(overrides))
        out.append((cls, overrides))
    return out


# ---------------------------------------------------------------- what a valid config must satisfy


def _typed_value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# What a run needs of a config that passed, written down independently of the checks in config.py:
# each rule is something that otherwise fails after the models load, or silently does the wrong thing.
RULES = [
    ("every float finite", lambda c: all(math.isfinite(v) for v in _floats(c))),
    ("seed in vLLM's range [0, 2**32)", lambda c: 0 <= c.seed < 2**32),
    ("fractions within [0, 1]", lambda c: all(0 <= v <= 1 for v in (
        c.keep, c.rollout.top_p, c.selector.entropy_clip_quantile, c.optim.min_lr_ratio, c.loss.beta,
        c.scoring.entropy_threshold, c.selector.rkl_clip_quantile or 1,
        *[(n.stop_accuracy or 1) for n in ((c.model.embedded.teacher, c.model.embedded.student) if c.model.embedded else ())]))),
    ("no negative counts, sizes, rates or thresholds", lambda c: all(v >= 0 for k, v in _numbers(c) if not k.endswith("seed"))),
    ("grad_clip, lr, eps, kv cache, batch sizes > 0", lambda c: min(c.optim.grad_clip, c.optim.lr, c.optim.eps, c.rollout.kv_cache_gib,
                                                               c.rollout.max_num_seqs, c.scoring.token_dump_sequences) > 0),
    ("AdamW's two betas in [0, 1)", lambda c: len(c.optim.betas) == 2 and all(0 <= b < 1 for b in c.optim.betas)),
    ("task.digits non-empty", lambda c: len(getattr(c.task, "digits", [2])) > 0),
    ("a W&B mode wandb.init takes", lambda c: c.logger.mode in (None, "online", "offline", "disabled", "shared", "dryrun", "run")),
    ("no data source for a generated task", lambda c: c.task.name not in ("arithmetic", "planning")
        or all(getattr(c.task, k, None) is None for k in ("path", "split", "eval_path", "eval_name"))),
]


def _numbers(cfg, prefix=""):
    from dataclasses import fields, is_dataclass

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + f.name, value


def _floats(cfg):
    return [v for _, v in _numbers(cfg) if isinstance(v, float)]


def _check_valid(cfg, overrides: list[str]) -> None:
    """A config that passed must be one a run can use (RULES), and every plain `key=value` override
    must have landed in it: an accepted key that went nowhere is a silent drop."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for rule, holds in RULES:
        assert holds(cfg), f"{overrides} accepted, but breaks: {rule}"
    last = {}
    for parsed in OverridesParser.create().parse_overrides(overrides):
        if parsed.key_or_group in LEAVES and not parsed.is_delete():
            last[parsed.key_or_group] = parsed.value()
    for key, value in last.items():
        if isinstance(value, str) and "${" in value:
            continue
        got = _typed_value(cfg, key)
        if isinstance(got, bool) or (isinstance(got, list) and _kind(key) == "list" and got and isinstance(got[0], str)):
            value = bool(value) if isinstance(got, bool) else [str(v) for v in value]  # OmegaConf's conversions
        assert got == value or (isinstance(value, (int, float)) and got == pytest.approx(value)), (key, value, got)


def _names_the_input(message: str, overrides: list[str]) -> bool:
    """A clear line says what it is about: some key, group or override of this case appears in it."""
    words = set()
    for ov in overrides:
        key = ov.lstrip("+~").split("=", 1)[0]
        words |= {ov, key, key.rsplit(".", 1)[-1], key.split(".", 1)[0]}
    return any(w and w in message for w in words)


@pytest.mark.parametrize("n", [pytest.param(33, id="sample"), pytest.param(1000, id="1000", marks=pytest.mark.integration)])
def test_fuzzed_overrides_end_in_a_valid_config_or_one_clear_line(n, no_loading, monkeypatch):
    from tipdistill.config import ConfigError

    monkeypatch.delenv(UNSET_ENV, raising=False)
    outcomes = collections.defaultdict(collections.Counter)
    examples = collections.defaultdict(dict)
    with hydra_session():  # one Hydra initialisation; every case still composes and validates from scratch
        for cls, overrides in cases(n):
            try:
                cfg = load_config(overrides)
            except ConfigError as exc:
                message = str(exc)
                assert message and "\n" not in message and "Traceback" not in message, (overrides, message)
                assert len(message) < 600, (overrides, message)
                assert _names_the_input(message, overrides), (overrides, message)
                outcomes[cls]["error"] += 1
                examples[cls].setdefault(message.split(";")[0][:60], (" ".join(overrides), message))
            except LoadedTooEarly:
                raise
            except Exception as exc:  # anything else would reach the user as a traceback
                pytest.fail(f"{overrides}: unhandled {type(exc).__name__}: {exc}")
            else:
                _check_valid(cfg, overrides)
                outcomes[cls]["valid"] += 1
    print(f"\nfuzzed overrides, {n} cases (class: outcomes; one example per kind of message)")
    for cls in CLASSES:
        print(f"{cls}: {dict(outcomes[cls])}")
        for overrides, message in examples[cls].values():
            print(f"    {overrides!r:60} -> {message}")
    assert set(outcomes) == set(CLASSES)  # every class was tried
    assert sum(c["valid"] for c in outcomes.values()) and sum(c["error"] for c in outcomes.values())
