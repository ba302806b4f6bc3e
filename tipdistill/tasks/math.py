"""[1] Real math tasks: MATH-500, AIME 2024/2025, GSM8K and DAPO-Math-17k, checked with math-verify.

Data comes from `task.path`: a local `.jsonl` or `.parquet` file, or a hub data set name loaded
through `datasets` (a local directory also goes through `datasets.load_dataset`). Each task name
knows its data set's field names, so a file in the hub's own schema works as is.

Prompt: the problem, then an instruction to put the final answer in \\boxed{}; the chat template
is applied later by `encode_prompt`, identically for teacher and student.
Score: 1.0 when the last closed \\boxed{...} of the answer verifies against the gold answer
(`math_verify.verify`: numeric, symbolic, interval and set equivalence), else 0.0. The answer of a
thinking model is the text after its last `</think>`; a response cut off inside its thinking scores 0
(it also counts as truncated: it did not end on a stop token). A response with no \\boxed{} scores 0
even if the right number appears in the text. How this relates to the paper's scoring: see README.

Train/eval split:
- one source (a local file, or a hub data set with a single split): a seeded split. The rows are
  shuffled with `task.eval_seed`; the first `task.eval_size` become the fixed held-out set and the
  rest is the training pool. Growing eval_size only adds problems (the held-out sets are nested).
- a hub data set with separate train and test splits (GSM8K): train on `train`, evaluate on a
  seeded `eval_size` sample of `test`.
- training never sees a held-out problem (rows are also matched by problem text).
- a separate held-out source (`task.eval_path`, read with the schema `task.eval_name`): the paper's
  setup, training on DAPO-Math-17k and evaluating on MATH-500 or AIME; training drops any
  problem whose text is in the held-out set.
"""

from __future__ import annotations

import functools
import json
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tipdistill.errors import ConfigError
from tipdistill.tasks import THINK_CLOSE, THINK_OPEN, Problem, TaskConfig

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def render_prompt(problem: str) -> str:
    """The user message: the problem, a blank line, the \\boxed{} instruction (DeepSeek-R1/Qwen-Math wording)."""
    return f"{problem}\n\n{INSTRUCTION}"

# DAPO-Math-17k wraps every problem in its own "Answer: $Answer" instruction; strip it so that all
# tasks share one instruction (\boxed{}) and one checker.
_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?where \$Answer is the answer to the problem\.\s*", re.S)
_DAPO_SUFFIX = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$", re.S)


@dataclass(frozen=True)
class Schema:
    """How one task's rows look. Field lists hold accepted names, canonical first; dotted names
    reach into nested records (`reward_model.ground_truth`)."""

    problem: tuple[str, ...]
    answer: tuple[str, ...]
    solution: tuple[str, ...] = ()
    answer_after: Optional[str] = None  # GSM8K: the gold is the text after '####'
    hub_name: str = ""
    hub_config: Optional[str] = None
    hub_split: str = "train"
    hub_eval_split: Optional[str] = None  # None: seeded split of hub_split
    strip_dapo_wrapper: bool = False


SCHEMAS: dict[str, Schema] = {
    # HuggingFaceH4/MATH-500 (split test): problem, solution, answer, subject, level, unique_id
    "math500": Schema(problem=("problem",), answer=("answer",), solution=("solution",),
                      hub_name="HuggingFaceH4/MATH-500", hub_split="test"),
    # HuggingFaceH4/aime_2024 (split train): id, problem, solution, answer, url, year.
    # Mirrors such as Maxwell-Jia/AIME_2024 capitalise the fields (Problem, Solution, Answer).
    "aime24": Schema(problem=("problem", "Problem", "question"), answer=("answer", "Answer"),
                     solution=("solution", "Solution"), hub_name="HuggingFaceH4/aime_2024"),
    # math-ai/aime25 (split test): problem, answer, id; opencompass/AIME2025 uses question/answer.
    "aime25": Schema(problem=("problem", "Problem", "question"), answer=("answer", "Answer"),
                     solution=("solution", "Solution"), hub_name="math-ai/aime25", hub_split="test"),
    # openai/gsm8k (config main, splits train/test): question, answer = worked solution + '#### <number>'
    "gsm8k": Schema(problem=("question",), answer=("answer",), answer_after="####",
                    hub_name="openai/gsm8k", hub_config="main", hub_split="train", hub_eval_split="test"),
    # open-r1/DAPO-Math-17k-Processed (configs all/en/cn, split train): prompt (str), solution (the gold answer),
    # data_source, source_prompt, ability, reward_model {ground_truth, style}, extra_info.
    # BytedTsinghua-SIA/DAPO-Math-17k: prompt = [{role, content}], reward_model.ground_truth.
    "dapo_math": Schema(problem=("prompt",), answer=("reward_model.ground_truth", "solution", "answer"),
                        hub_name="open-r1/DAPO-Math-17k-Processed", hub_config="en", strip_dapo_wrapper=True),
}


# --- reading rows -------------------------------------------------------------------------------

def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists() or path.endswith((".jsonl", ".parquet", ".json"))


def read_rows(path: str, *, hub_config: Optional[str] = None, split: str = "train") -> list[tuple[str, dict]]:
    """[(where, row)] from a local .jsonl/.parquet file or a hub data set; `where` names the row
    in error messages ("line 3" of a jsonl file, "row 3" otherwise, both 1-based)."""
    if _looks_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"task.path '{path}' does not exist; fix: set task.path=<a .jsonl or .parquet file, or a hub data set name>")
        if p.suffix == ".jsonl":
            return _read_jsonl(p)
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"row {i + 1}", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
        if not p.is_dir():
            raise ConfigError(f"task.path '{path}' is neither .jsonl nor .parquet; "
                              "fix: convert it, or point task.path at a data set directory or hub name")
    return _read_hub(path, hub_config, split)


def _read_jsonl(p: Path) -> list[tuple[str, dict]]:
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}: line {i} is not valid JSON ({exc.msg}); fix: one JSON object per line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{p}: line {i} is not a JSON object; fix: one JSON object per line")
            rows.append((f"line {i}", row))
    return rows


def _read_hub(name: str, hub_config: Optional[str], split: str) -> list[tuple[str, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, hub_config, split=split)
    except Exception as exc:  # offline, unknown name, missing split: one line with the fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"'{name}'" + (f" (config {hub_config})" if hub_config else "") + f", split '{split}'"
        raise ConfigError(
            f"cannot load data set {where} through `datasets` ({first}); fix: download it where the hub is reachable "
            f"(or warm the HF cache) and set task.path=<a local .jsonl or .parquet file>") from None
    return [(f"row {i + 1}", r) for i, r in enumerate(ds)]


def _get(row: dict, dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _text(value: Any) -> Optional[str]:
    """A field as text: chat-style lists give their last user message; numbers become strings."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        users = [m for m in value if m.get("role", "user") == "user"]
        value = (users or list(value))[-1].get("content")
    if value is None or isinstance(value, float) and value != value:  # None or NaN (parquet nulls)
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _field(row: dict, names: tuple[str, ...], where: str, source: str, task: str, required: bool = True) -> Optional[str]:
    for name in names:
        text = _text(_get(row, name))
        if text is not None:
            return text
    if not required:
        return None
    also = f" (also tried {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""
    keys = ", ".join(sorted(row)) if isinstance(row, dict) else "-"
    raise ConfigError(f"{source}: {where} has no field '{names[0]}'{also}, which task {task} needs; "
                      f"the row has: {keys}. Fix: convert the file to the {task} schema or pick the task that matches it")


def to_problems(rows: list[tuple[str, dict]], schema: Schema, source: str, task: str) -> list[Problem]:
    out = []
    for where, row in rows:
        problem = _field(row, schema.problem, where, source, task)
        answer = _field(row, schema.answer, where, source, task)
        solution = _field(row, schema.solution, where, source, task, required=False) if schema.solution else None
        if schema.answer_after:
            if schema.answer_after not in answer:
                raise ConfigError(f"{source}: {where}: field '{schema.answer[0]}' has no '{schema.answer_after}' "
                                  f"before the final answer, which task {task} needs; fix: use the original {task} answers")
            solution, answer = (s.strip() for s in answer.rsplit(schema.answer_after, 1))
            answer = answer.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer) else answer
        if schema.strip_dapo_wrapper:
            problem = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", problem)).strip()
        out.append(Problem(prompt=render_prompt(problem), answer=answer,
                           meta={"source": source, "where": where, "problem": problem, "solution": solution}))
    return out


# --- checking answers ---------------------------------------------------------------------------

def answer_text(response: str) -> Optional[str]:
    """The part of a response that gives the answer: the text after the last `</think>`. None when a
    think block was opened and never closed: a response cut off while thinking has not answered, and
    a \\boxed{} inside thinking is a draft, not the answer."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    return None if THINK_OPEN in response else response


_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last closed \\boxed{...} (or \\fbox{...}, or `\\boxed 3`) with balanced braces; an
    unclosed box (cut by the length limit) is skipped in favour of an earlier closed one. None if none."""
    for m in reversed(list(_BOX.finditer(text))):
        rest = text[m.end():]
        if rest.startswith("{"):
            depth = 0
            for j, ch in enumerate(rest):
                depth += (ch == "{") - (ch == "}")
                if depth == 0:
                    return rest[1:j].strip()
        elif rest[:1].isspace():  # `\boxed 3`: the next word, up to the closing $ of the math
            word = re.match(r"\s+([^\s$]+)", rest)
            if word:
                return word.group(1).rstrip(".,;")
    return None


# Thousands separators math-verify reads as products (1\,000 -> 1*0): \, \! \; \: "\ " ~ {,} between digit groups.
_DIGIT_GROUP_SEP = re.compile(r"(?<=\d)(?:\\[,!;: ]|~|\{,\})(?=\d{3}(?!\d))")


def _timeout() -> Optional[int]:
    # math-verify bounds parse/verify time with signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(latex: str):
    from math_verify import parse

    return parse(f"${_DIGIT_GROUP_SEP.sub('', latex)}$", parsing_timeout=_timeout())


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str):
    return _parse(gold)  # each gold answer is checked against many samples: parse it once


def _normalise(s: str) -> str:
    return re.sub(r"\\text\{([^}]*)\}|\\mathrm\{([^}]*)\}", lambda m: m.group(1) or m.group(2) or "", s).replace(" ", "").lower()


def answers_match(gold: str, predicted: str) -> bool:
    """Whether `predicted` (a boxed answer's content) is equivalent to `gold`, per math-verify;
    exact text match (spaces, case and \\text{} ignored) when the gold does not parse."""
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return _normalise(gold) == _normalise(predicted)
    pred_parsed = _parse(predicted)
    if not pred_parsed:
        return False
    try:
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))
    except Exception:  # sympy corner cases; a checker must not crash training
        return False


def score_response(gold: str, response: str) -> float:
    """1.0 when the last closed \\boxed{} after the thinking verifies against `gold`; a response still
    thinking when it was cut off scores 0."""
    text = answer_text(response)
    boxed = None if text is None else last_boxed(text)
    return float(boxed is not None and answers_match(gold, boxed))


# --- the task -----------------------------------------------------------------------------------

@dataclass
class MathConfig(TaskConfig):
    """`task=math500|aime24|aime25|gsm8k|dapo_math`: where the problems come from (see the module doc)."""

    name: str = "math500"
    path: Optional[str] = None  # a local jsonl/parquet file or a hub data set name (default: the task's hub set)
    split: Optional[str] = None  # hub split to read (default per task: MATH-500 test, GSM8K train, ...)
    eval_path: Optional[str] = None  # a separate held-out source, e.g. MATH-500 while training on dapo_math
    eval_name: Optional[str] = None  # schema of eval_path: math500|aime24|aime25|gsm8k|dapo_math (default: name)


class MathTask:
    """One registered name per data set (math500, aime24, aime25, gsm8k, dapo_math); see the module doc."""

    config = MathConfig

    def __init__(self, cfg: MathConfig):
        self.name = cfg.name
        if cfg.name not in SCHEMAS:
            raise ConfigError(f"no math schema for task '{cfg.name}'; valid: {', '.join(sorted(SCHEMAS))}")
        self.schema = SCHEMAS[cfg.name]
        path = cfg.path or self.schema.hub_name
        split, eval_path, eval_name = cfg.split, cfg.eval_path, cfg.eval_name or cfg.name
        is_hub = not _looks_local(path)
        pool = self._load(path, cfg.name, split or self.schema.hub_split)
        rng = random.Random(cfg.eval_seed)
        if eval_path or (is_hub and self.schema.hub_eval_split and not split):
            if eval_path:
                if eval_name not in SCHEMAS:
                    raise ConfigError(f"unknown eval task '{eval_name}'; valid: {', '.join(sorted(SCHEMAS))} "
                                      "(set task.eval_name=<one of them>)")
                eval_schema = SCHEMAS[eval_name]
                held = self._load(eval_path, eval_name, eval_schema.hub_eval_split or eval_schema.hub_split)
            else:
                held = self._load(path, cfg.name, self.schema.hub_eval_split)
            order = list(range(len(held)))
            rng.shuffle(order)
            self._eval = [held[i] for i in order[: cfg.eval_size]]
            texts = {p.meta["problem"] for p in self._eval}
            self._train = [p for p in pool if p.meta["problem"] not in texts]
        else:  # one source serves both: seeded split
            order = list(range(len(pool)))
            rng.shuffle(order)
            held_rows = set(order[: cfg.eval_size])
            self._eval = [pool[i] for i in order[: cfg.eval_size]]
            texts = {p.meta["problem"] for p in self._eval}
            self._train = [p for i, p in enumerate(pool) if i not in held_rows and p.meta["problem"] not in texts]
        if not self._train:
            raise ConfigError(
                f"task {cfg.name}: none of the {len(pool)} problems of '{path}' is left to train on: {len(self._eval)} are held out "
                f"(task.eval_size={cfg.eval_size}) and training never sees a held-out problem; "
                f"fix: lower task.eval_size below {len(pool)}, or train on another task")
        self._order: list[int] = []
        self._cursor = 0

    @staticmethod
    def _load(path: str, name: str, split: str) -> list[Problem]:
        schema = SCHEMAS[name]
        rows = read_rows(path, hub_config=None if _looks_local(path) else schema.hub_config, split=split)
        problems = to_problems(rows, schema, path, name)
        if not problems:
            raise ConfigError(f"task.path '{path}' holds no rows; fix: point task.path at a non-empty file")
        return problems

    def train_problems(self, rng: random.Random, n: int) -> list[Problem]:
        """n problems from the training pool: epochs of a shuffle drawn from `rng` (no repeats within an epoch)."""
        out = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = list(range(len(self._train)))
                rng.shuffle(self._order)
                self._cursor = 0
            out.append(self._train[self._order[self._cursor]])
            self._cursor += 1
        return out

    def eval_problems(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, response: str) -> float:
        return score_response(problem.answer, response)

    def solution(self, problem: Problem) -> str:
        """The data set's worked solution when it has one (MATH-500, AIME, GSM8K), ending in \\boxed{answer}."""
        sol = problem.meta.get("solution")
        if not sol:
            raise NotImplementedError(f"task {self.name} has no reference solutions (only embedded tasks pre-train)")
        return sol if last_boxed(sol) is not None else f"{sol}\n\n\\boxed{{{problem.answer}}}"
