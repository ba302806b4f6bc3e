"""Held-out accuracy through the rollout engine: sampled (mean over k samples, temperature 1.0,
the paper's mean@k), pass@k, and greedy, plus the share of sampled responses cut off before a stop
token (a thinking model cut off mid-thought scores 0, and shows here). Seeds are passed per call, so
evaluation never touches the training random stream. With several processes each takes its share of
the problems (seeded by global index, so with vLLM the samples are those of one process) and the
counts are summed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tipdistill.tasks import Problem, decode_response, encode_prompt

if TYPE_CHECKING:  # annotations only: runtime -> models -> embedded (prepare) -> evaluate
    from tipdistill.runtime import Runtime


def evaluate(engine, task, tokenizer, problems: list[Problem], *, samples: int, greedy: bool, max_tokens: int, seed: int,
             chat_template_kwargs: dict | None = None, runtime: Runtime | None = None) -> dict:
    """`runtime`: the processes that share the problems (None: this process alone, as in `prepare`)."""
    share = runtime.share(len(problems)) if runtime else slice(0, len(problems))
    total = runtime.sum if runtime else (lambda x: x)
    problems = problems[share]
    prompt_ids = [encode_prompt(tokenizer, p.prompt, chat_template_kwargs) for p in problems]

    truncated = []

    def scores(n: int, temperature: float) -> list[list[float]]:
        out = engine.generate(prompt_ids, n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=seed,
                              first=share.start * n)
        truncated.extend(engine.rules.truncated(r) for r in out)
        flat = [task.score(problems[i // n], decode_response(tokenizer, prompt_ids[i // n], r)) for i, r in enumerate(out)]
        return [flat[i * n : (i + 1) * n] for i in range(len(problems))]

    sampled = scores(samples, 1.0)
    n_problems = total(len(problems))
    m = {
        "eval/truncated_frac": total(sum(truncated)) / total(len(truncated)),
        "eval/accuracy": total(sum(s == 1.0 for row in sampled for s in row)) / (n_problems * samples),
        f"eval/pass@{samples}": total(sum(any(s == 1.0 for s in row) for row in sampled)) / n_problems,
        "eval/score": total(float(sum(s for row in sampled for s in row))) / (n_problems * samples),
    }
    if greedy:
        g = scores(1, 0.0)
        m["eval/accuracy_greedy"] = total(sum(row[0] == 1.0 for row in g)) / n_problems
        m["eval/score_greedy"] = total(float(sum(row[0] for row in g))) / n_problems
    return m
