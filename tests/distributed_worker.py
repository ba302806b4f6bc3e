"""One rank of the 2-process checks in tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py parity <student dir> <teacher dir> <out.pt>
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py train <greedy out dir> <tipdistill train overrides>

parity: each rank loads the saved tiny pair through `DistributedRuntime.load_model` (rank 0 reads, FSDP2
shards, weights broadcast), builds its contiguous share of one fixed batch of rollouts and runs
`update_step` once per case; rank 0 saves the whole batch's keep mask, the metrics and the gathered
updated weights. `run_cases` with a `LocalRuntime` is the one-process reference (the test runs it in-process).

train: the real CLI (`tipdistill train ...`), with one observation added: when the run closes its
vLLM engine, each rank first decodes fixed prompts greedily with that engine and writes the ids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tipdistill.config import LossConfig, OptimConfig, SelectorConfig, TrainConfig  # noqa: E402
from tipdistill.rollout import TokenRules, make_rollout  # noqa: E402
from tipdistill.teacher import Teacher  # noqa: E402
from tipdistill.update import Heads, update_step  # noqa: E402

V = 48
PROMPT_LENS = (4, 6, 3, 5)  # 2 prompts per rank; each rank's share is padded to its own widths
RESPONSE_LENS = (7, 3, 5, 7, 1, 6, 4, 2)  # G = 2 rollouts per prompt
CASES = {  # name -> (selector, keep, granularity, micro_batch_size)
    "full": ("full", 1.0, "per_sequence", 64),
    "type_aware_per_sequence": ("type_aware", 0.5, "per_sequence", 64),
    "type_aware_per_batch": ("type_aware", 0.3, "per_batch", 1),  # one sequence per micro-batch: accumulation too
}


def save_pair(out: Path) -> tuple[str, str]:
    """A tied student and a tied teacher (tiny Qwen2, random weights) in HF format."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    paths = []
    for name, seed, layers in (("student", 0, 2), ("teacher", 1, 1)):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
        Qwen2ForCausalLM(cfg).save_pretrained(out / name)
        paths.append(str(out / name))
    return paths[0], paths[1]


def config(case: str) -> TrainConfig:
    selector, keep, granularity, micro = CASES[case]
    return TrainConfig(selector=SelectorConfig(name=selector, granularity=granularity), keep=keep, micro_batch_size=micro,
                       optim=OptimConfig(lr=1.0, warmup_steps=0), loss=LossConfig(chunk_size=4), device="cpu")


def share_of_batch(runtime):
    """This process's contiguous share of the fixed batch (the whole batch with one process)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in PROMPT_LENS]
    responses = [torch.randint(3, V, (n,), generator=g).tolist() for n in RESPONSE_LENS]
    G = len(RESPONSE_LENS) // len(PROMPT_LENS)
    share = runtime.share(len(prompts))
    rules = TokenRules(stop_ids=(1,), pad_id=0, n_token_ids=V, context=max(PROMPT_LENS) + max(RESPONSE_LENS) + 1)
    return make_rollout(prompts[share], responses[share.start * G : share.stop * G], G, rules)


def run_cases(runtime, student_dir: str, teacher_dir: str) -> dict:
    """{case: (keep mask of the whole batch, metrics, updated weights)}; the same call on every rank."""
    out = {}
    for case in CASES:
        cfg = config(case)
        student = runtime.load_model(student_dir, "float32", trainable=True)
        teacher_model = runtime.load_model(teacher_dir, "float32", trainable=False)
        teacher = Teacher(teacher_model, runtime)
        # Plain SGD: the weights move by exactly -lr * (clipped) gradient, so comparing weights compares gradients.
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        rollout = share_of_batch(runtime)
        t_hidden = teacher.hidden_states(rollout, cfg.micro_batch_size)
        heads = Heads(runtime.lm_head(student), teacher.head)
        result = update_step(student, heads, rollout, t_hidden, optimizer, scheduler, cfg=cfg, step=1, runtime=runtime)
        weights = {name: t.detach().clone() for name, t in runtime.full_weights(student)}
        out[case] = (result.keep_mask_B_T.cpu(), result.metrics, weights)
    return out


GREEDY_PROMPTS = ["Q:12+34=?A:", "Q:905+87=?A:", "Q:4444+5555=?A:", "Q:7+8=?A:", "Q:123+456=?A:", "Q:60+61=?A:"]
GREEDY_TOKENS = 24


def parity(student_dir: str, teacher_dir: str, out: str) -> None:
    from tipdistill.distributed import DistributedRuntime, finish, start

    start()
    runtime = DistributedRuntime.from_config(config("full"))
    results = run_cases(runtime, student_dir, teacher_dir)
    if runtime.is_main:
        torch.save(results, out)
    finish()


def train_observing_engines(out_dir: str, args: list[str]) -> None:
    """`tipdistill train <args>`, recording each rank's vLLM greedy decoding of GREEDY_PROMPTS at the end."""
    import json
    import os

    from transformers import AutoTokenizer

    from tipdistill import cli
    from tipdistill.rollout.vllm_engine import VLLMEngine

    close = VLLMEngine.close

    def observed_close(self) -> None:
        tokenizer = AutoTokenizer.from_pretrained(self.llm.llm_engine.model_config.tokenizer)
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p in GREEDY_PROMPTS]
        greedy = self.generate(prompts, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=GREEDY_TOKENS, seed=0)
        Path(out_dir, f"greedy_rank{os.environ['RANK']}.json").write_text(json.dumps({"prompts": prompts, "greedy": greedy}))
        close(self)

    VLLMEngine.close = observed_close
    sys.argv = ["tipdistill", "train", *args]
    cli.main()


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "parity":
        parity(*args)
    else:
        train_observing_engines(args[0], args[1:])


if __name__ == "__main__":
    main()
