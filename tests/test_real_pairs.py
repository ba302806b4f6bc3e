"""Real teacher/student presets and real math data, with local stand-ins (no hub access here).

Stand-ins: tiny Qwen2- and Llama-shaped pairs saved in HF format with a real (byte-level BPE)
tokenizer and a Jinja chat template, LM heads padded to different widths in teacher and student,
and small .jsonl/.parquet files in each data set's own schema.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, compose, compose_many
from standins import build_tokenizer, cli, save_model

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("table_*.yaml"))
MATH_TASKS = ["math500", "aime24", "aime25", "gsm8k", "dapo_math"]

# --- stand-in tokenizers and models: tests/standins.py ---------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """style -> (student, teacher) for qwen (Qwen2.5), qwen3, llama and llama31 (no pad token): LM heads padded
    past the tokenizer's ids, student 288 wide and teacher 320, as with Qwen2.5's 151,936 (1.5B) vs 152,064 (14B)."""
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for style in ("qwen", "qwen3", "llama", "llama31"):
        tok = build_tokenizer(style)
        out[style] = (save_model(root / f"org/{style}-student", style, 288, tok, seed=1),
                      save_model(root / f"org/{style}-teacher", style, 320, tok, seed=2))
    return out


# --- data files in each data set's own schema --------------------------------------------------------

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
PROBLEMS = [("What is $1+2$?", "3"), ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}"), ("Solve $2x=-8$.", "-4"),
            ("What is $\\sqrt{12}$ in simplest form?", "2\\sqrt{3}"), ("Solve $x^2<4$.", "(-2,2)"),
            ("A square has area $25\\text{ cm}^2$. Side?", "5\\text{ cm}"), ("What is $10-3$?", "7"), ("What is $2^5$?", "32")]


def rows_for(task: str) -> list[dict]:
    rows = []
    for i, (problem, answer) in enumerate(PROBLEMS):
        if task == "math500":
            rows.append({"problem": problem, "solution": f"Work. So it is $\\boxed{{{answer}}}$.", "answer": answer,
                         "subject": "Algebra", "level": 1 + i % 5, "unique_id": f"test/algebra/{i}.json"})
        elif task == "aime24":
            rows.append({"id": 60 + i, "problem": problem, "solution": "Work.", "answer": str(100 + i),
                         "url": "https://artofproblemsolving.com/wiki", "year": "2024"})
        elif task == "aime25":
            rows.append({"problem": problem, "answer": str(100 + i), "id": str(i)})
        elif task == "gsm8k":
            rows.append({"question": f"Tom has {i + 1},000 apples and eats 2. How many are left?",
                         "answer": f"He has {i + 1}000-2=<<{i + 1}000-2={i + 1}000-2>>. \n#### {i + 1},000"})
        elif task == "dapo_math":
            content = DAPO_PREFIX + problem + DAPO_SUFFIX
            rows.append({"data_source": "math_dapo", "prompt": [{"content": content, "role": "user"}], "ability": "MATH",
                         "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": f"id-{i}"}})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {(task, fmt): (write_jsonl if fmt == "jsonl" else write_parquet)(root / f"{task}.{fmt}", rows_for(task))
            for task in MATH_TASKS for fmt in ("jsonl", "parquet")}


def task_cfg(name: str, path: str, **kw):
    from tipdistill.tasks.math import MathConfig

    return MathConfig(name=name, path=path, **{"eval_size": 3, **kw})


# --- 1. presets -------------------------------------------------------------------------------------

PAPER_PAIRS = {
    "qwen3_8b_to_4b": ("Qwen/Qwen3-4B", "Qwen/Qwen3-8B"),
    "llama33_70b_to_31_8b": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"),
    "qwen25_14b_to_1p5b": ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-14B-Instruct"),
    "qwen3_14b_to_1p7b": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-14B"),
    "qwen3_32b_to_1p7b": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-32B"),
    "qwen25_1p5b_to_0p5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen3_1p7b_to_0p6b": ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"),
}


def test_every_preset_composes_and_validates():
    from tipdistill.config import validate

    assert set(PAPER_PAIRS) <= {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")}
    cfgs = compose_many([[f"model={preset}", "task=math500"] for preset in PAPER_PAIRS])
    for (preset, (student, teacher)), cfg in zip(PAPER_PAIRS.items(), cfgs):
        text = (ROOT / "conf" / "model" / f"{preset}.yaml").read_text()
        assert "tipdistill train model=" + preset in text  # the launch command in the header
        m = validate(cfg).model
        assert (m.name, m.student, m.teacher, m.dtype, m.embedded) == (preset, student, teacher, "bfloat16", None)


def test_student_override_beats_the_preset():
    from tipdistill.config import validate

    m = validate(compose(["model=qwen3_8b_to_4b", "model.student=/ckpt/my-student", "model.dtype=float32"])).model
    assert (m.student, m.teacher, m.dtype) == ("/ckpt/my-student", "Qwen/Qwen3-8B", "float32")


@pytest.mark.integration  # the console script
def test_cli_cfg_job_for_every_preset(tmp_path, capsys, monkeypatch):
    """`tipdistill train model=<preset> --cfg job` for every preset: the console script's entry point in-process
    (one subprocess of the installed script too; the training tests below run it for real)."""
    from tipdistill import cli as tipdistill_cli

    monkeypatch.setenv("TIPDISTILL_COMMAND", "train")  # cli.main sets it; restored after the test

    def cfg_job(args):
        monkeypatch.setattr(sys, "argv", ["tipdistill", "train", *args, "--cfg", "job"])
        tipdistill_cli.main()
        return yaml.safe_load(capsys.readouterr().out)

    for preset in PAPER_PAIRS:
        cfg = cfg_job([f"model={preset}", "model.student=Qwen/Other-Student"])
        assert cfg["model"]["name"] == preset and cfg["model"]["student"] == "Qwen/Other-Student"
        assert cfg["model"]["teacher"] == PAPER_PAIRS[preset][1] and cfg["model"]["embedded"] is None
    out = cli(["train", "model=llama33_70b_to_31_8b", "--cfg", "job"], tmp_path)
    assert out.returncode == 0 and yaml.safe_load(out.stdout)["model"]["teacher"] == "meta-llama/Llama-3.3-70B-Instruct"


# --- 3. vocabulary compatibility ----------------------------------------------------------------------

def test_padded_heads_share_the_student_width(pairs):
    from tipdistill.config import ConfigError
    from tipdistill.models import check_pair

    for style in ("qwen", "llama"):
        student, teacher = pairs[style]
        assert check_pair(student, teacher) == 288  # min(288, 320); the tokenizer's 261 ids fit
        # a student head wider than the teacher's could sample ids the teacher cannot score
        with pytest.raises(ConfigError, match="wider than the teacher's"):
            check_pair(teacher, student)


def test_different_tokenizers_are_one_clear_error(pairs):
    from tipdistill.config import ConfigError
    from tipdistill.models import check_pair

    with pytest.raises(ConfigError, match=r"teacher and student vocabularies differ .*; fix: pick a pair that shares one tokenizer"):
        check_pair(pairs["qwen"][0], pairs["llama"][1])


def test_chat_template_is_the_same_for_teacher_and_student(pairs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill.config import ModelConfig, TrainConfig
    from tipdistill.pipeline import sample_rollouts
    from tipdistill.rollout import generation_config_of, token_rules
    from tipdistill.rollout.hf_engine import HFEngine
    from tipdistill.runtime import LocalRuntime
    from tipdistill.tasks import Problem, encode_prompt

    s_tok, t_tok = (AutoTokenizer.from_pretrained(p) for p in pairs["qwen"])
    ids = encode_prompt(s_tok, "What is 1+2?")
    assert ids == encode_prompt(t_tok, "What is 1+2?")
    assert s_tok.decode(ids) == "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n"
    # model.chat_template_kwargs reaches the template (Qwen3's enable_thinking): through encode_prompt, and
    # through the rollout stage, whose prompts are what the student and the teacher then see.
    no_think = "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert s_tok.decode(encode_prompt(s_tok, "x", {"enable_thinking": False})) == no_think
    cfg = TrainConfig(model=ModelConfig(chat_template_kwargs={"enable_thinking": False}), rollouts_per_prompt=1)
    cfg.rollout.max_completion_length = 2
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(pairs["qwen"][0]), token_rules(s_tok, 1024, generation_config_of(pairs["qwen"][0])))
    _, rollout = sample_rollouts(engine, s_tok, [Problem("x", "")], cfg, seed=0, runtime=LocalRuntime(torch.device("cpu")))
    assert s_tok.decode(rollout.input_ids_B_L[0, : rollout.prompt_len]) == no_think
    l_tok = AutoTokenizer.from_pretrained(pairs["llama"][0])
    assert l_tok.decode(encode_prompt(l_tok, "Hi")) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# --- 2. math tasks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gold, response, ok", [
    ("\\frac{1}{2}", "So the answer is $\\boxed{\\dfrac{1}{2}}$.", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{1/2}", True),
    ("\\dfrac{14}{3}", "\\boxed{\\frac{14}{3}}", True),
    ("5", "The side is \\boxed{5 \\text{ cm}}.", True),
    ("5\\text{ cm}", "\\boxed{5}", True),
    ("-3", "\\boxed{-3}", True),
    ("-3", "\\boxed{3}", False),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", True),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2)}", False),
    ("10\\%", "\\boxed{10}", True),
    ("\\$18.90", "\\boxed{18.90}", True),
    ("1000", "\\boxed{1,000}", True),
    ("\\text{(C)}", "\\boxed{C}", True),
    ("72", "First I got \\boxed{71}, then fixed it: \\boxed{72}", True),   # the last box counts
    ("72", "\\boxed{72} ... wait, \\boxed{73}", False),
    ("72", "The answer is 72.", False),                                 # no \boxed{}: not accepted
    ("72", "so \\boxed{7", False),                                      # cut off by the length limit
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", True),      # nested braces
    # thinking models: the answer is read after </think>; cut off inside thinking = no answer
    ("3", "<think>Let me try: 1+2 = 3, so \\boxed{3}. Wait, let me double-check the", False),
    ("5", "<think>first guess \\boxed{5}. Hmm, actually it is 7.</think> The answer is 7.", False),
    ("7", "<think>first guess \\boxed{5}. Hmm, actually it is 7.</think> The answer is \\boxed{7}.", True),
    ("7", "<think>\n\n</think>\n\nSo \\boxed{7}", True),                 # enable_thinking=false: an empty think block
    ("7", "draft \\boxed{5}</think>So \\boxed{7}", True),                 # the template opened <think> in the prompt
    # small false negatives
    ("3", "so the answer is \\boxed 3.", True),
    ("3", "$\\boxed 3$", True),
    ("1000", "\\boxed{1\\,000}", True),
    ("1000000", "\\boxed{1\\,000\\,000}", True),
    ("3", "\\boxed{3}, and to double-check: \\boxed{3", True),            # an unclosed last box after a closed one
    ("1.5", "\\boxed{1.5}", True),
])
def test_math_verify_checker(gold, response, ok):
    from tipdistill.tasks.math import score_response

    assert score_response(gold, response) == float(ok)


def test_decoded_response_keeps_the_think_markers_and_the_templates_open_think(pairs):
    """Qwen3 marks <think>/</think> non-special, so decoding keeps them; a template that ends the prompt
    inside <think> (DeepSeek-R1 style) gets it put back in front of the response, so a response that never
    closes its thinking scores 0."""
    from transformers import AutoTokenizer

    from tipdistill.tasks import decode_response, encode_prompt
    from tipdistill.tasks.math import score_response

    tok = AutoTokenizer.from_pretrained(pairs["qwen"][0])
    prompt = encode_prompt(tok, "What is 3+4?")
    reply = tok.encode("<think>maybe \\boxed{5}</think>\n\\boxed{7}", add_special_tokens=False) + [tok.eos_token_id]
    assert decode_response(tok, prompt, reply) == "<think>maybe \\boxed{5}</think>\n\\boxed{7}"
    r1_prompt = prompt + tok.encode("<think>\n", add_special_tokens=False)
    still_thinking = tok.encode("so \\boxed{7}, but let me check", add_special_tokens=False)
    assert decode_response(tok, r1_prompt, still_thinking).startswith("<think>so")
    assert score_response("7", decode_response(tok, r1_prompt, still_thinking)) == 0.0
    no_think = encode_prompt(tok, "What is 3+4?", {"enable_thinking": False})  # closed, empty think block in the prompt
    assert decode_response(tok, no_think, tok.encode("\\boxed{7}", add_special_tokens=False)) == "\\boxed{7}"


@pytest.mark.parametrize("task", MATH_TASKS)
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_each_task_reads_its_schema(data, task, fmt):
    from tipdistill.tasks import build_task
    from tipdistill.tasks.math import INSTRUCTION

    t = build_task(task_cfg(task, data[task, fmt]))
    ev = t.eval_problems()
    assert len(ev) == 3
    for p in ev:
        assert p.prompt.endswith("\n\n" + INSTRUCTION) and "\\boxed{}" in p.prompt
        assert "Answer: $Answer" not in p.prompt and "Remember to put" not in p.prompt  # DAPO's wrapper is gone
        assert t.score(p, f"Done: \\boxed{{{p.answer}}}") == 1.0 and t.score(p, "\\boxed{99999}") == 0.0
    golds = {p.answer for p in ev}
    if task == "gsm8k":  # the number after '####', thousands separators dropped
        assert golds <= {f"{i}000" for i in range(1, 9)}
        assert all("####" not in p.meta["solution"] for p in ev)
    elif task.startswith("aime"):
        assert golds <= {str(100 + i) for i in range(8)}
    else:
        assert golds <= {a for _, a in PROBLEMS}


def test_dapo_processed_layout_and_math500_solution(tmp_path, data):
    """open-r1/DAPO-Math-17k-Processed: prompt is a string, solution holds the gold answer."""
    from tipdistill.tasks import build_task

    rows = [{"prompt": r["prompt"][0]["content"], "solution": r["reward_model"]["ground_truth"], "data_source": "math_dapo",
             "source_prompt": r["prompt"], "ability": "MATH", "reward_model": r["reward_model"], "extra_info": r["extra_info"]}
            for r in rows_for("dapo_math")]
    t = build_task(task_cfg("dapo_math", write_parquet(tmp_path / "processed.parquet", rows)))
    assert {p.meta["problem"] for p in t.eval_problems()} <= {p for p, _ in PROBLEMS}
    with pytest.raises(NotImplementedError):
        t.solution(t.eval_problems()[0])
    m = build_task(task_cfg("math500", data["math500", "jsonl"]))
    p = m.eval_problems()[0]
    assert m.score(p, m.solution(p)) == 1.0


def test_seeded_split_is_fixed_nested_and_disjoint(data):
    import random

    from tipdistill.tasks import build_task

    path = data["math500", "jsonl"]
    a, b = build_task(task_cfg("math500", path)), build_task(task_cfg("math500", path))
    assert [p.prompt for p in a.eval_problems()] == [p.prompt for p in b.eval_problems()]
    bigger = build_task(task_cfg("math500", path, eval_size=5))
    assert [p.prompt for p in bigger.eval_problems()][:3] == [p.prompt for p in a.eval_problems()]
    other_seed = build_task(task_cfg("math500", path, eval_seed=8))
    assert [p.prompt for p in other_seed.eval_problems()] != [p.prompt for p in a.eval_problems()]
    held = {p.prompt for p in a.eval_problems()}
    drawn = a.train_problems(random.Random(0), 10)  # 5 in the pool: two epochs
    assert not held & {p.prompt for p in drawn} and len({p.prompt for p in drawn[:5]}) == 5
    assert [p.prompt for p in drawn] == [p.prompt for p in b.train_problems(random.Random(0), 10)]


def test_separate_eval_source_when_the_config_has_one(data):
    """Train on DAPO, evaluate on MATH-500 (the paper's setup)."""
    from tipdistill.errors import ConfigError
    from tipdistill.tasks.math import MathConfig
    from tipdistill.tasks.math import MathTask

    cfg = dict(name="dapo_math", path=data["dapo_math", "parquet"], eval_size=3, eval_seed=7,
               eval_path=data["math500", "jsonl"], eval_name="math500")
    t = MathTask(MathConfig(**cfg))
    assert len(t.eval_problems()) == 3 and all(p.meta["source"] == cfg["eval_path"] for p in t.eval_problems())
    held = {p.meta["problem"] for p in t.eval_problems()}
    assert len(t._train) == 5 and not held & {p.meta["problem"] for p in t._train}  # decontaminated by problem text
    with pytest.raises(ConfigError, match="none of the 8 problems .* is left to train on: 8 are held out"):
        MathTask(MathConfig(**{**cfg, "eval_size": 30}))


@pytest.mark.parametrize("content, message", [
    ('{"problem": "p", "answer": "1"}\n{"problem": "q"}\n', r"line 2 has no field 'answer', which task math500 needs; the row has: problem"),
    ('{"problem": "p", "answer": "1"}\n{"problem": "q", "answer": ""}\n', r"line 2 has no field 'answer'"),
    ('{"problem": "p", "answer": "1"}\n\n{"question": "q", "answer": "2"}\n', r"line 3 has no field 'problem'"),
    ('{"problem": "p", "answer": "1"}\nnot json\n', r"line 2 is not valid JSON"),
])
def test_bad_rows_name_the_field_and_line(tmp_path, content, message):
    from tipdistill.config import ConfigError
    from tipdistill.tasks import build_task

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        build_task(task_cfg("math500", str(path), eval_size=1))


def test_bad_sources_are_clear_errors(tmp_path, data, monkeypatch):
    import datasets
    import huggingface_hub.constants

    from tipdistill.config import ConfigError
    from tipdistill.tasks import build_task

    with pytest.raises(ConfigError, match=r"math500.jsonl: line 1 has no field 'question', which task gsm8k needs; the row has: answer, level"):
        build_task(task_cfg("gsm8k", data["math500", "jsonl"]))
    no_hashes = tmp_path / "gsm.jsonl"
    no_hashes.write_text('{"question": "q", "answer": "42"}\n')
    with pytest.raises(ConfigError, match=r"line 1: field 'answer' has no '####'"):
        build_task(task_cfg("gsm8k", str(no_hashes)))
    no_gold = write_parquet(tmp_path / "dapo.parquet", [{"prompt": "p", "reward_model": {"ground_truth": "1"}}, {"prompt": "q"}])
    with pytest.raises(ConfigError, match=r"row 2 has no field 'reward_model.ground_truth' \(also tried 'solution', 'answer'\)"):
        build_task(task_cfg("dapo_math", no_gold, eval_size=1))
    with pytest.raises(ConfigError, match=r"task.path '/nope/math.jsonl' does not exist"):
        build_task(task_cfg("math500", "/nope/math.jsonl"))
    with pytest.raises(ConfigError, match=r"none of the 8 problems .* fix: lower task.eval_size below 8"):
        build_task(task_cfg("aime24", data["aime24", "jsonl"], eval_size=30))
    # The real hub code path, offline: one line naming the data set and the fix.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"cannot load data set 'HuggingFaceH4/MATH-500', split 'test' through `datasets` .*task.path=<a local"):
        build_task(task_cfg("math500", "HuggingFaceH4/MATH-500"))
    with pytest.raises(ConfigError, match=r"'openai/gsm8k' \(config main\), split 'train'"):
        build_task(task_cfg("gsm8k", None))  # path null: the task's default hub data set


def test_task_yaml_files_compose():
    from tipdistill.config import validate

    from tipdistill.tasks.math import SCHEMAS

    for task, cfg in zip(MATH_TASKS, compose_many([[f"task={task}"] for task in MATH_TASKS])):
        t = validate(cfg).task
        assert t.name == task and t.path is None and SCHEMAS[task].hub_name and t.eval_size > 0  # null: the hub set


# --- 4. the done-when check: the installed CLI on stand-ins --------------------------------------------

RUN = ["steps=2", "prompts_per_step=2", "rollouts_per_prompt=2", "rollout=hf", "rollout.max_completion_length=16",
       "eval.samples=1", "eval.greedy=false", "eval_every=0", "task.eval_size=4", "model.dtype=float32", "device=cpu",
       "scoring.token_dump_every=0"]


@pytest.mark.integration
def test_preset_trains_on_a_math_file(tmp_path, pairs, data):
    student, teacher = pairs["qwen"]
    out = cli(["train", "model=qwen25_14b_to_1p5b", f"model.student={student}", f"model.teacher={teacher}",
               "task=math500", f"task.path={data['math500', 'jsonl']}", "selector=type_aware", "keep=0.5", *RUN], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert cfg["model"]["name"] == "qwen25_14b_to_1p5b" and cfg["model"]["student"] == student and cfg["task"]["name"] == "math500"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert "eval/accuracy" in lines[-1] and "eval/pass@1" in lines[-1]  # mean@k and pass@k
    assert all(m["train/loss"] == m["train/loss"] and 0 < m["train/kept_tokens"] <= m["train/response_tokens"] for m in lines[1:])


@pytest.mark.integration
def test_memory_knobs_run_end_to_end(tmp_path, pairs, data):
    """The GPU user's memory knobs all on at once at the preset's bf16 compute dtype (fp32 master weights
    under bf16 autocast, a bf16 teacher and vLLM), rollouts through vLLM (its sleep mode is a no-op
    without CUDA) on the Qwen2-shaped stand-in: the run finishes with finite losses."""
    student, teacher = pairs["qwen"]
    run = [a for a in RUN if a not in ("rollout=hf", "model.dtype=float32")] + ["rollout=vllm", "rollout.max_num_seqs=16"]
    out = cli(["train", "model=qwen25_1p5b_to_0p5b", f"model.student={student}", f"model.teacher={teacher}",
               "task=math500", f"task.path={data['math500', 'jsonl']}", *run, "gradient_checkpointing=true",
               "teacher_offload=true", "rollout.enable_sleep_mode=true", "rollout.max_model_len=512", "optim.schedule=cosine"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["gradient_checkpointing"] and cfg["teacher_offload"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all(m["train/loss"] == m["train/loss"] and m["train/loss"] >= 0 for m in lines[1:])


@pytest.mark.integration
def test_llama31_tokenizer_without_pad_token_trains_with_rollout_hf(tmp_path, pairs, data):
    """Llama-3.1 has no pad token: HF rollouts of prompts of different lengths pad with the first stop id
    (this crashed before), and responses stop on <|eot_id|>, <|eom_id|> or <|end_of_text|>."""
    student, teacher = pairs["llama31"]
    out = cli(["train", "model=llama33_70b_to_31_8b", f"model.student={student}", f"model.teacher={teacher}",
               "task=math500", f"task.path={data['math500', 'jsonl']}", *RUN, "steps=1", "prompts_per_step=4"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    step1 = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert step1["train/response_tokens"] > 0 and step1["optim/update_moved_frac"] > 0.5


def test_qwen3_presets_take_enable_thinking_without_a_plus():
    """Qwen3 presets run without thinking (as the paper's code base does); one override turns it on."""
    from tipdistill.config import validate

    qwen3 = [p for p in PAPER_PAIRS if p.startswith("qwen3")]
    cfgs = compose_many([[f"model={p}"] for p in qwen3] + [["model=qwen3_8b_to_4b", "model.chat_template_kwargs.enable_thinking=true"]])
    assert [validate(c).model.chat_template_kwargs for c in cfgs] == [{"enable_thinking": False}] * len(qwen3) + [{"enable_thinking": True}]


@pytest.mark.integration
def test_multirun_with_paths_in_overrides(tmp_path, pairs, data):
    """Llama-shaped pair, DAPO parquet, a 2-job sweep: one flat directory per job, no path in its name."""
    student, teacher = pairs["llama"]
    out = cli(["train", "-m", "model=llama33_70b_to_31_8b", f"model.student={student}", f"model.teacher={teacher}",
               "task=dapo_math", f"task.path={data['dapo_math', 'parquet']}", "selector=full,entropy", "keep=0.5",
               *RUN, "steps=1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    for job, selector in zip(jobs, ["full", "entropy"]):
        assert (job / "summary.json").exists() and (job / "metrics.jsonl").exists()
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"selector={selector}" in overrides and f"model.student={student}" in overrides
        # the name holds the sanitised overrides minus model.student/model.teacher/task.path (cut at 200 characters)
        assert job.name.startswith(f"{jobs.index(job)}_device=cpu,") and "model=llama33_70b_to_31_8b" in job.name
        assert "org" not in job.name and "tmp" not in job.name and list(job.iterdir())
    assert sorted((tmp_path / "sweep").rglob("summary.json")) == [j / "summary.json" for j in jobs]  # no nesting


# --- 5. experiments ----------------------------------------------------------------------------------------

def _experiment_override(name: str) -> str:
    has_group = "experiment:" in (ROOT / "conf" / "train.yaml").read_text()
    return f"experiment={name}" if has_group else f"+experiment={name}"


def test_experiments_compose_into_paper_sweeps():
    from omegaconf import open_dict

    from tipdistill.config import validate

    assert {"table_entropy_keep", "table_type_aware_vs_entropy", "table_q3"} <= set(EXPERIMENTS)
    cfgs = compose_many([[_experiment_override(name)] for name in EXPERIMENTS], hydra_config=True)
    sweeps, selectors = {}, set()
    for name, cfg in zip(EXPERIMENTS, cfgs):
        text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and f"tipdistill train experiment={name}" in text
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # the table runs as one sweep even without -m
        sweeps[name] = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
        assert all(0 < float(k) <= 1 for k in sweeps[name].get("keep", [])) and sweeps[name]
        selectors |= set(sweeps[name].get("selector", []))
        with open_dict(cfg):
            del cfg["hydra"]
        typed = validate(cfg)
        assert typed.model.name != "embedded" and typed.task.name == "dapo_math" and typed.rollouts_per_prompt == 16
        assert (typed.task.eval_path, typed.task.eval_name) == ("HuggingFaceH4/MATH-500", "math500")  # the paper's eval set
        assert typed.optim.lr == 1e-6 and typed.eval.samples == 16 and typed.rollout.max_completion_length == 8192
    assert sweeps["table_entropy_keep"] == {"keep": ["1.0", "0.5", "0.2"], "seed": ["0", "1", "2"]}
    assert sweeps["table_q3"]["keep"] == ["0.2", "0.1"]
    assert sorted(sweeps["table_type_aware_vs_entropy"]["selector"]) == ["entropy", "random", "type_aware"]
    # every swept selector is a real option, and a CLI override beats the experiment
    extra = compose_many([[_experiment_override("table_q3"), f"selector={s}"] for s in sorted(selectors)]
                         + [[_experiment_override("table_q3"), "model.student=/ckpt/s"]])
    assert [validate(c).selector.name for c in extra[:-1]] == sorted(selectors)
    q3 = validate(extra[-1])
    assert (q3.selector.name, q3.model.name, q3.model.student) == ("q3", "qwen3_8b_to_4b", "/ckpt/s")


def test_reproduce_table_script_is_the_cli():
    text = (ROOT / "scripts" / "reproduce_table.sh").read_text()
    assert 'exec tipdistill train "experiment=${table}" "$@"' in text
    assert os.access(ROOT / "scripts" / "reproduce_table.sh", os.X_OK)
