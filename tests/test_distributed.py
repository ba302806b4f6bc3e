"""Several processes in one job (torchrun, FSDP2 over gloo, vLLM's CPU build): 2 ranks compute the update
one process computes, every rank's rollout engine takes the trained weights, and a killed 2-rank run
resumes to the same metrics.

Each test starts `torch.distributed.run --standalone` (a free port per job, so parallel jobs on one machine
do not collide) with one thread per process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import TINY_PAIR

pytestmark = pytest.mark.integration  # several processes, FSDP2, vLLM engines

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "distributed_worker.py")


def torchrun(args: list[str], cwd: Path, **popen):
    """`torchrun --standalone --nproc_per_node 2 <args>` as a subprocess (Popen kwargs pass through)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(proc, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-4000:]
    return out + err


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- parity: the update step --------------------------------------------------------------------------------


def test_two_ranks_compute_the_update_of_one_process(tmp_path):
    """One fixed batch (4 prompts x 2 rollouts, split 2 + 2 prompts with different padding per rank) through
    update_step: FSDP2 over 2 ranks vs one process. Same keep masks (the whole batch's entropy clip, min-max
    and per_batch ranking), same loss and gradient norm, same updated weights; the tied embedding/head pair
    stays one tensor (the embedding's and every loss chunk's gradients meet in it)."""
    import distributed_worker as w
    from tipdistill.runtime import LocalRuntime

    student, teacher = w.save_pair(tmp_path)
    finished(torchrun([WORKER, "parity", student, teacher, str(tmp_path / "two.pt")], tmp_path))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    one = w.run_cases(LocalRuntime(torch.device("cpu")), student, teacher)
    for case in w.CASES:
        (mask1, m1, w1), (mask2, m2, w2) = one[case], two[case]
        assert torch.equal(mask1, mask2), case
        assert 0 < m2["train/kept_tokens"] == m1["train/kept_tokens"] == int(mask1.sum())
        for key in ("train/loss", "optim/grad_norm", "score/entropy_mean", "score/rkl_mean", "select/keep_frac"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5), (case, key)
        assert set(w1) == set(w2)
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], atol=1e-6, rtol=1e-5, msg=f"{case} {name}")
        assert torch.equal(w2["lm_head.weight"], w2["model.embed_tokens.weight"]), case
    # the three cases train on different tokens, so they are three different checks
    assert len({int(one[c][0].sum()) for c in w.CASES}) == 3


# --- end to end: train, then every rank's engine holds the trained weights --------------------------------------


def test_two_rank_train_leaves_every_rank_engine_with_the_trained_weights(tmp_path, tiny_pair):
    """A 2-rank `tipdistill train` (vLLM on each rank, weights synced after every step): at the end each rank's
    vLLM greedy decoding equals HF greedy decoding of the gathered final weights, and differs from the
    initial student's, so a rank whose engine missed the syncs would fail. One run directory for both ranks."""
    import distributed_worker as w
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill.rollout import generation_config_of, token_rules
    from tipdistill.rollout.hf_engine import hf_generate

    student_dir = tiny_pair[0]
    run = ["steps=3", "eval_every=0", "prompts_per_step=4", "rollouts_per_prompt=2", "eval.samples=1", "optim.lr=1e-2",
           "optim.warmup_steps=0", "logger.table_every=0"]
    finished(torchrun([WORKER, "train", str(tmp_path), *TINY_PAIR, *run], tmp_path))

    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("metrics.jsonl")]  # one directory, both ranks
    assert [m["step"] for m in metrics(run_dir)] == [0, 1, 2, 3]  # written once (rank 0)
    assert len(list((tmp_path / "outputs").rglob(".hydra"))) == 1

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    rules = token_rules(tokenizer, 128, generation_config_of(student_dir))

    def hf_greedy(path, prompts):
        model = AutoModelForCausalLM.from_pretrained(path)
        return hf_generate(model, rules, prompts, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=w.GREEDY_TOKENS)

    ranks = [json.loads((tmp_path / f"greedy_rank{r}.json").read_text()) for r in (0, 1)]
    prompts = ranks[0]["prompts"]
    trained = hf_greedy(run_dir / "checkpoints" / "final", prompts)
    assert trained != hf_greedy(student_dir, prompts), "training did not change greedy outputs: the check below has no power"
    for r, seen in enumerate(ranks):
        assert seen["greedy"] == trained, f"rank {r}'s vLLM engine does not hold the trained weights"


# --- kill -9 and resume -----------------------------------------------------------------------------------------


FAST = [*TINY_PAIR, "steps=5", "eval_every=2", "prompts_per_step=4", "rollouts_per_prompt=2", "eval.samples=1", "rollout=hf",
        "checkpoint_every=1", "selector=type_aware", "keep=0.5"]


def test_killed_two_rank_run_resumes_to_the_same_metrics(tmp_path, tiny_pair):
    """`torchrun -m tipdistill train`: SIGKILL to the whole job (launcher and both ranks) after the step-2
    checkpoint, resume with the same world size: every step logged once, the same losses, kept counts and
    accuracies as an uninterrupted 2-rank run. Resuming with another world size is one clear line."""
    ref = torchrun(["-m", "tipdistill", "train", *FAST, "hydra.run.dir=ref"], tmp_path)
    finished(ref)

    killed = tmp_path / "killed"
    proc = torchrun(["-m", "tipdistill", "train", *FAST, "hydra.run.dir=killed"], tmp_path)
    try:
        t0 = time.time()
        while not (killed / "checkpoints" / "step_000002").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.05)
    finally:
        # the launcher and both ranks at once (torchrun starts each rank in its own session), no clean-up
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in job:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(job, timeout=30)
        proc.communicate()
    assert max(m["step"] for m in metrics(killed)) < 5, "the run finished before it was killed"

    one = subprocess.run([str(Path(sys.executable).with_name("tipdistill")), "train", *FAST, f"resume={killed}",
                          "hydra.run.dir=one"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 2 and "written by a job of 2 ranks" in one.stderr, one.stderr[-2000:]

    finished(torchrun(["-m", "tipdistill", "train", *FAST, f"resume={killed}", "hydra.run.dir=resume_job"], tmp_path))
    a, b = metrics(tmp_path / "ref"), metrics(killed)
    assert [m["step"] for m in b] == list(range(6))  # every step exactly once
    for x, y in zip(a, b):
        for key in ("train/loss", "train/kept_tokens", "optim/grad_norm", "eval/accuracy", "eval/accuracy_greedy"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sb["eval/accuracy_end"] == sa["eval/accuracy_end"] and sb["eval/score_end"] == sa["eval/score_end"]
