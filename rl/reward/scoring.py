"""Reward functions by name, the single-sample entry `compute_score`, and the batch API.

What it does: a reward function maps (response, ground_truth) -> float. `REWARDS` holds them
by name; the trainer picks one with `get_reward(name)` or scores a batch with
`compute_scores(responses, ground_truths, name=...)`, which returns the scores and how many
samples raised while being scored (those get 0.0 and are logged with their traceback; the
trainer reports the count). `compute_score` is the math reward itself: 1.0 when the last
`\\boxed{}` of the response equals the ground truth after normalisation, else 0.0.
Registered rewards:
  - "math": string equality after normalisation (deterministic; the default);
  - "math_verify": "math", and when that says no, math-verify's symbolic verdict under a hard
    time limit (best effort: no verdict in time means no reward from it).
What it leaves out: format rewards, partial credit, length penalties.
What breaks without it: the trainer would need if-chains over reward names, and one
pathological sample would stop a training step.

Guarantee: `compute_score` and every `compute_scores` element return within ~1 s for any
input and never raise (tests/test_reward.py measures both).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from rl.reward.extract import last_boxed
from rl.reward.normalize import is_equiv
from rl.reward.symbolic import default_checker

RewardFn = Callable[[str, str], float]
log = logging.getLogger(__name__)


def _check_types(response: object, ground_truth: object) -> None:
    if not isinstance(response, str) or not isinstance(ground_truth, str):
        raise TypeError(
            f"reward inputs must be str, got response={type(response).__name__}, "
            f"ground_truth={type(ground_truth).__name__}; decode token ids before scoring"
        )


def math_string_reward(response: str, ground_truth: str) -> float:
    """1.0 if the last box of `response` normalises to the same string as `ground_truth`."""
    _check_types(response, ground_truth)
    pred = last_boxed(response)
    return 1.0 if pred is not None and is_equiv(pred, ground_truth) else 0.0


def math_verify_reward(response: str, ground_truth: str) -> float:
    """`math_string_reward`, with math-verify as a second opinion when strings differ."""
    _check_types(response, ground_truth)
    pred = last_boxed(response)
    if pred is None:
        return 0.0
    if is_equiv(pred, ground_truth):
        return 1.0
    return 1.0 if default_checker().equivalent(pred, ground_truth) else 0.0


REWARDS: dict[str, RewardFn] = {
    "math": math_string_reward,
    "math_verify": math_verify_reward,
}


def get_reward(name: str) -> RewardFn:
    """The reward function registered as `name`."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)} (rl.reward.REWARDS)")
    return REWARDS[name]


def _score_safely(fn: RewardFn, response: str, ground_truth: str, name: str) -> tuple[float, bool]:
    """(score, errored): an exception gives 0.0, is logged with its traceback, and is flagged."""
    try:
        return float(fn(response, ground_truth)), False
    except Exception:
        log.exception("reward %r raised on a sample (scored 0.0); ground_truth=%.80r", name, ground_truth)
        return 0.0, True


def compute_score(response: str, ground_truth: str, *, symbolic: bool = False) -> float:
    """Math reward of one response: 1.0 or 0.0. Never raises (errors are logged, scored 0.0).
    `symbolic=True` adds the math-verify second opinion (reward "math_verify")."""
    name = "math_verify" if symbolic else "math"
    return _score_safely(REWARDS[name], response, ground_truth, name)[0]


def compute_scores(
    responses: Sequence[str], ground_truths: Sequence[str], name: str = "math"
) -> tuple[list[float], int]:
    """Scores of a batch with the reward `name`, and the number of samples that raised."""
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"compute_scores got {len(responses)} responses but {len(ground_truths)} ground truths; "
            "pass one ground truth per response (repeat it for each of the G samples of a prompt)"
        )
    fn = get_reward(name)
    scores, errors = [], 0
    for response, gt in zip(responses, ground_truths):
        score, errored = _score_safely(fn, response, gt, name)
        scores.append(score)
        errors += errored
    return scores, errors
