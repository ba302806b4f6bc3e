"""Real vLLM (CPU build), in-process: sampling through the engine interface and in-place weight sync.

Stale weights after a sync are a known failure of peer tools: the sync test compares vLLM's
log-probs with the updated HF student and must fail if the sync is skipped.
"""

import pytest
import torch

pytestmark = pytest.mark.integration  # a real vLLM engine (about a minute to start on CPU)

from tipdistill.config import NetConfig, RolloutConfig
from tipdistill.embedded import build_model, build_tokenizer
from tipdistill.runtime import LocalRuntime


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tipdistill.rollout import generation_config_of, token_rules
    from tipdistill.rollout.vllm_engine import VLLMEngine

    path = tmp_path_factory.mktemp("vllm_model")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(NetConfig(layers=1, hidden=32, intermediate=64, heads=1, kv_heads=1), tok, 128)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    rules = token_rules(tok, 128, generation_config_of(str(path)))
    engine = VLLMEngine(str(path), RolloutConfig(), rules, dtype="float32", seed=0, device="cpu")
    yield engine, model, tok
    engine.close()


def vllm_logprobs(engine, ids: list[int]) -> torch.Tensor:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    rows = out[0].prompt_logprobs[1:]
    return torch.tensor([row[t].logprob for row, t in zip(rows, ids[1:])])


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_generate_samples_differ_and_reproduce(setup):
    engine, _, tok = setup
    prompts = [tok.encode("Q:12+34=?A:", add_special_tokens=False)] * 2
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, max_tokens=12)
    a = engine.generate(prompts, 3, seed=5, **kw)
    b = engine.generate(prompts, 3, seed=5, **kw)
    assert len(a) == 6 and a == b  # seeded: same call, same samples
    assert len({tuple(r) for r in a}) > 1  # the n samples of one prompt are not copies
    assert all(0 < len(r) <= 12 for r in a)


def test_weight_sync_makes_vllm_match_the_updated_student(setup):
    engine, model, tok = setup
    ids = tok.encode("Q:876+530=?A:6+0=6;7+3=10;8+5+1=14;ANSWER 1406", add_special_tokens=False)
    before = vllm_logprobs(engine, ids)
    assert torch.allclose(before, hf_logprobs(model, ids), atol=1e-4)

    # an "optimizer step": change every weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    updated = hf_logprobs(model, ids)
    assert (vllm_logprobs(engine, ids) - updated).abs().max() > 1e-2  # stale until synced

    engine.sync_weights(LocalRuntime(torch.device("cpu")).full_weights(model))
    after = vllm_logprobs(engine, ids)
    assert torch.allclose(after, updated, atol=1e-4), (after - updated).abs().max()


def test_many_long_prompts_do_not_chunk_the_prefill(setup):
    """More prompt tokens than one scheduler step holds: a chunked prefill would rewind the seeded
    CPU sampler and crash ("CPU Generator does not use offset"); the engine must queue instead."""
    engine, _, tok = setup
    prompt = tok.encode("Q:" + "+".join(["123"] * 24) + "=?A:", add_special_tokens=False)
    assert len(prompt) > 90
    prompts = [prompt] * 100  # > 9000 prompt tokens
    out = engine.generate(prompts, 1, seed=3, temperature=1.0, top_p=1.0, top_k=0, max_tokens=4)
    assert len(out) == 100 and all(0 < len(r) <= 4 for r in out)
