"""[2] Both engines sample exactly the student's distribution and stop on one set of ids.

Stand-ins (tests/standins.py) carry generation_config.json files shaped like the real ones: a repetition
penalty, top_k/top_p/temperature, several EOS ids (Qwen: <|im_end|> and <|endoftext|>; Llama-3.1:
<|eot_id|>, <|eom_id|>, <|end_of_text|>), LM heads padded past the tokenizer (Qwen), and a Llama-3.1
tokenizer with no pad token. Random weights: next-token distributions are broad, so every id, stop ids
and padded rows included, comes up often in a few thousand samples.
"""

from __future__ import annotations

import pytest
import torch

from standins import build_tokenizer, save_model

PROMPTS = ["What is 1+2?", "Simplify 6/8 please, and show your work.", "Hi", "Solve x^2=4 for x > 0."]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """style -> (path, model, tokenizer, rules, prompt ids). Qwen heads padded to 288 rows (the tokenizer has
    261 ids); Llama-3.1's head is exactly the tokenizer's size, as in the real model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tipdistill.rollout import generation_config_of, token_rules
    from tipdistill.tasks import encode_prompt

    root = tmp_path_factory.mktemp("standins")
    out = {}
    for style, width, scale in (("qwen", 288, 3.0), ("qwen3", 288, 3.0), ("llama31", 262, 1.0)):
        path = save_model(root / style, style, width, build_tokenizer(style), seed=1, head_scale=scale, max_positions=256)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        rules = token_rules(tok, 256, generation_config_of(path))
        out[style] = (path, model, tok, rules, [encode_prompt(tok, p) for p in PROMPTS])
    return out


@torch.no_grad()
def argmax_rollout(model, rules, prompt: list[int], max_tokens: int) -> list[int]:
    """The definition of greedy: the student's own argmax over the tokenizer's ids, token by token."""
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(model(torch.tensor([ids])).logits[0, -1, : rules.n_token_ids].argmax())
        out.append(t)
        ids.append(t)
        if t in rules.stop_ids:
            break
    return out


@torch.no_grad()
def first_token_fit(model, rules, prompt: list[int], samples: list[int]) -> float:
    """z-score of a chi-square goodness-of-fit of sampled first tokens against the student's next-token
    distribution over the tokenizer's ids (expected counts below 5 pooled). |z| < 4 unless the sampler
    changed the distribution (temperature, top-k/p, min-p, repetition penalty)."""
    p = model(torch.tensor([prompt])).logits[0, -1, : rules.n_token_ids].float().softmax(-1)
    counts = torch.bincount(torch.tensor(samples), minlength=rules.n_token_ids)[: rules.n_token_ids].float()
    expected = p * len(samples)
    big = expected >= 5
    chi = float((((counts[big] - expected[big]) ** 2) / expected[big]).sum())
    rest = float(expected[~big].sum())
    if rest > 0:
        chi += (float(counts[~big].sum()) - rest) ** 2 / rest
    df = int(big.sum()) + (rest > 0) - 1
    return (chi - df) / (2 * df) ** 0.5


def check_stops(rules, tok, responses, extra_stop: str) -> None:
    """Each response ends at its first stop id (or is cut and flagged truncated), and some end on a stop id
    that only the generation config names."""
    for r in responses:
        assert not any(t in rules.stop_ids for t in r[:-1]), tok.convert_ids_to_tokens(r)  # never runs past a stop id
        assert rules.truncated(r) == (r[-1] not in rules.stop_ids)
    ends = [tok.convert_ids_to_tokens(r[-1]) for r in responses if not rules.truncated(r)]
    assert extra_stop in ends, ends


# --- rollout=hf ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["qwen", "qwen3", "llama31"])
def test_hf_greedy_is_the_students_argmax(standin, style):
    """Greedy is the argmax, not what generation_config.json adds (Qwen2.5's repetition penalty made it
    differ within a few tokens); a Llama-3.1 tokenizer without pad token batches prompts of unequal length."""
    from tipdistill.rollout.hf_engine import HFEngine

    path, model, tok, rules, prompts = standin[style]
    got = HFEngine(model, rules).generate(prompts, 2, temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, seed=0)
    want = [argmax_rollout(model, rules, p, 24) for p in prompts]
    assert got == [w for w in want for _ in range(2)]
    if style == "qwen":  # the stand-in is sensitive: transformers' defaults from the file change greedy output
        with torch.no_grad():
            inherited = model.generate(input_ids=torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=24,
                                       pad_token_id=rules.pad_id)[0, len(prompts[0]) :].tolist()
        assert rules.cut(inherited) != want[0]


@pytest.mark.parametrize("style", ["qwen", "qwen3"])
def test_hf_samples_the_students_distribution_and_never_a_padded_row(standin, style):
    """4096 first tokens at temperature 1 fit the student's softmax (the file's temperature 0.7, top_k 20,
    top_p 0.8 and repetition penalty would not); none is a padded LM-head row (27 of 288 here)."""
    from tipdistill.rollout.hf_engine import HFEngine

    _, model, _, rules, prompts = standin[style]
    out = HFEngine(model, rules).generate(prompts[1:2], 4096, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, seed=7)
    first = [r[0] for r in out]
    assert max(first) < rules.n_token_ids
    assert abs(first_token_fit(model, rules, prompts[1], first)) < 4


@pytest.mark.parametrize("style, extra_stop", [("qwen", "<|endoftext|>"), ("llama31", "<|end_of_text|>")])
def test_hf_stops_on_every_eos_id(standin, style, extra_stop):
    from tipdistill.rollout.hf_engine import HFEngine

    _, model, tok, rules, prompts = standin[style]
    out = HFEngine(model, rules).generate(prompts, 32, temperature=1.0, top_p=1.0, top_k=0, max_tokens=48, seed=3)
    check_stops(rules, tok, out, extra_stop)


def test_hf_response_is_cut_at_the_context_and_counted_truncated(standin):
    from tipdistill.rollout.hf_engine import HFEngine

    _, model, tok, rules, _ = standin["qwen"]
    from tipdistill.tasks import encode_prompt

    long = encode_prompt(tok, "x" * 230)
    room = rules.context - len(long)
    assert 0 < room < 16
    out = HFEngine(model, rules).generate([long], 4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=1)
    assert all(len(r) <= room for r in out) and any(len(r) == room and rules.truncated(r) for r in out)


# --- rollout=vllm (real vLLM, CPU build) --------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_engines(standin):
    """Qwen2 stand-in in float32 (greedy must match HF bit for bit); Llama-3.1 stand-in in bfloat16 (the
    presets' engine dtype, fed by fp32 master weights through the casting sync)."""
    from tipdistill.config import RolloutConfig
    from tipdistill.rollout.vllm_engine import VLLMEngine

    engines = {}
    for style, dtype in (("qwen", "float32"), ("llama31", "bfloat16")):
        path, _, _, rules, _ = standin[style]
        engines[style] = VLLMEngine(path, RolloutConfig(max_num_seqs=128), rules, dtype=dtype, seed=0, device="cpu")
    yield engines
    for e in engines.values():
        e.close()


@pytest.mark.integration
def test_vllm_greedy_equals_the_argmax_and_hf_greedy(standin, vllm_engines):
    from tipdistill.rollout.hf_engine import HFEngine

    _, model, _, rules, prompts = standin["qwen"]
    got = vllm_engines["qwen"].generate(prompts, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, seed=0)
    assert got == [argmax_rollout(model, rules, p, 24) for p in prompts]
    assert got == HFEngine(model, rules).generate(prompts, 1, temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, seed=0)


@pytest.mark.integration
def test_vllm_samples_the_students_distribution_and_never_a_padded_row(standin, vllm_engines):
    _, model, _, rules, prompts = standin["qwen"]
    out = vllm_engines["qwen"].generate(prompts[1:2], 4096, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, seed=7)
    first = [r[0] for r in out]
    assert max(first) < rules.n_token_ids
    assert abs(first_token_fit(model, rules, prompts[1], first)) < 4
    longer = vllm_engines["qwen"].generate(prompts, 16, temperature=1.0, top_p=1.0, top_k=0, max_tokens=48, seed=5)
    assert max(t for r in longer for t in r) < rules.n_token_ids


@pytest.mark.integration
@pytest.mark.parametrize("style, extra_stop", [("qwen", "<|endoftext|>"), ("llama31", "<|end_of_text|>")])
def test_both_engines_stop_on_the_same_ids(standin, vllm_engines, style, extra_stop):
    """vLLM stops on the generation config's EOS ids on its own; the HF engine, the rollout mask and the
    truncation flag use the same `TokenRules.stop_ids`, so both engines end responses on one set."""
    from tipdistill.rollout.hf_engine import HFEngine

    _, model, tok, rules, prompts = standin[style]
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_tokens=48, seed=3)
    for out in (vllm_engines[style].generate(prompts, 32, **kw), HFEngine(model, rules).generate(prompts, 32, **kw)):
        check_stops(rules, tok, out, extra_stop)


@pytest.mark.integration
def test_vllm_response_is_cut_at_the_context_and_counted_truncated(standin, vllm_engines):
    from tipdistill.tasks import encode_prompt

    _, _, tok, rules, _ = standin["qwen"]
    long = encode_prompt(tok, "x" * 230)
    out = vllm_engines["qwen"].generate([long], 4, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=1)
    room = rules.context - len(long)
    assert all(len(r) <= room for r in out) and any(len(r) == room and rules.truncated(r) for r in out)


@pytest.mark.integration
def test_bf16_engine_takes_fp32_master_weights_through_the_sync(standin, vllm_engines):
    """The presets: fp32 student, bf16 vLLM. After an update the sync casts each tensor; vLLM's log-probs
    then match the student's own bf16-autocast forward (and did not before the sync)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    path, _, _, rules, prompts = standin["llama31"]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(path)  # fp32, a copy: the fixture's model stays untouched
    engine = vllm_engines["llama31"]
    ids = prompts[1] + [65, 66, 67, 68, 69, 70]

    def vllm_lp():
        out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return torch.tensor([row[t].logprob for row, t in zip(out[0].prompt_logprobs[1:], ids[1:])])

    @torch.no_grad()
    def student_lp():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = student(torch.tensor([ids])).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]

    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert (vllm_lp() - student_lp()).abs().max() > 0.1  # stale until synced
    from tipdistill.runtime import LocalRuntime

    engine.sync_weights(LocalRuntime(torch.device("cpu")).full_weights(student))
    assert (vllm_lp() - student_lp()).abs().max() < 0.05
