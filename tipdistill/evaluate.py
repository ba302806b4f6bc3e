"""Held-out accuracy through the rollout engine: sampled (mean over k samples, temperature 1.0,
the paper's mean@k), pass@k, and greedy, plus the share of sampled responses cut off before a stop
token (a thinking model cut off mid-thought scores 0, and shows here). Seeds are passed per call, so
evaluation never touches the training random stream."""

from __future__ import annotations

from tipdistill.tasks import Problem, decode_response, encode_prompt


def evaluate(engine, task, tokenizer, problems: list[Problem], *, samples: int, greedy: bool, max_tokens: int, seed: int,
             chat_template_kwargs: dict | None = None) -> dict:
    prompt_ids = [encode_prompt(tokenizer, p.prompt, chat_template_kwargs) for p in problems]

    truncated = []

    def scores(n: int, temperature: float) -> list[list[float]]:
        out = engine.generate(prompt_ids, n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed)
        truncated.extend(engine.rules.truncated(r) for r in out)
        flat = [task.score(problems[i // n], decode_response(tokenizer, prompt_ids[i // n], r)) for i, r in enumerate(out)]
        return [flat[i * n : (i + 1) * n] for i in range(len(problems))]

    sampled = scores(samples, 1.0)
    m = {
        "eval/truncated_frac": sum(truncated) / len(truncated),
        "eval/accuracy": sum(s == 1.0 for row in sampled for s in row) / (len(problems) * samples),
        f"eval/pass@{samples}": sum(any(s == 1.0 for s in row) for row in sampled) / len(problems),
        "eval/score": sum(s for row in sampled for s in row) / (len(problems) * samples),
    }
    if greedy:
        g = scores(1, 0.0)
        m["eval/accuracy_greedy"] = sum(row[0] == 1.0 for row in g) / len(problems)
        m["eval/score_greedy"] = sum(row[0] for row in g) / len(problems)
    return m
