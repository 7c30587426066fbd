"""Which sampled groups a training step keeps: DAPO's dynamic sampling (Yu et al. 2025, section 3.2).

A group whose responses all earned the same reward (all solved, or all failed) has advantage 0 for
every response: it adds no policy gradient, only shrinks the batch's effective size (and, with the
token-mean aggregation, dilutes the others' tokens). With `sampling.dynamic` such groups are dropped
and more prompts are sampled, round after round, until the batch holds data.prompts_per_step groups
or `sampling.max_extra_rounds` extra rounds were spent; then the step trains on what there is and
says so (data/groups_short > 0, and a warning). Each round draws a full data.prompts_per_step prompts,
as DAPO's over-sampling does; surplus groups of the last round are not used (data/groups_unused).

    got = collect_groups(draw, groups=P, cfg=cfg.sampling, row_multiple=mini_batches * dp)
    got.prompts, got.samples, got.rewards_B, got.scores_B, got.metrics

`draw(r)` runs round r (0 first) and returns a `Round`; groups are identified by `group_B` (the
prompt index of each response row within its round, rl.batch's convention), never by adjacency.
"Equal" is decided on the rewards that enter the advantage (after overlong shaping), exactly
(max == min, rl.advantages); DAPO's recipe filters on accuracy, which differs only when shaping
makes a group's rewards differ or agree. When the bound is hit the kept groups are cut to the most
whose response rows still split into mini-batches and data-parallel ranks (`row_multiple`); if none
remain the step has nothing to train on (`Collected.prompts` is empty).
Leaves out: sampling itself (the caller's `draw`), asynchronous refill.

Shape legend: B responses (rows), P groups (prompts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rl.advantages import uniform_rows

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingSection:
    dynamic: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal (no learning signal) and sample
    more prompts until the step has data.prompts_per_step groups (rl.sampling)"""
    max_extra_rounds: int = 3
    """dynamic: most extra sampling rounds per step (each draws data.prompts_per_step prompts); when
    spent, the step trains on the groups it has and logs data/groups_short"""

    def __post_init__(self):
        if self.max_extra_rounds < 0:
            raise ValueError(f"sampling.max_extra_rounds={self.max_extra_rounds}: must be >= 0 (0 = filter only)")


@dataclass
class Round:
    """One sampling round: samples[p] are the responses to prompts[p]; rows (prompt by prompt,
    sample by sample) carry rewards_B (the advantage's input) and scores_B (the raw reward)."""
    prompts: list
    samples: list[list]
    rewards_B: Tensor
    scores_B: Tensor
    errors: int = 0

    @property
    def group_B(self) -> Tensor:
        return torch.tensor([p for p, group in enumerate(self.samples) for _ in group], dtype=torch.long)


@dataclass
class Collected:
    prompts: list = field(default_factory=list)
    samples: list[list] = field(default_factory=list)
    rewards_B: Tensor = field(default_factory=lambda: torch.zeros(0))
    scores_B: Tensor = field(default_factory=lambda: torch.zeros(0))
    rounds: list[Round] = field(default_factory=list)
    """every round sampled this step, kept or not (for rollout statistics)"""
    metrics: dict = field(default_factory=dict)


def collect_groups(draw: Callable[[int], Round], groups: int, cfg: SamplingSection,
                   row_multiple: int = 1) -> Collected:
    """The step's groups: all of round 0 without `cfg.dynamic`; else the groups of unequal rewards of
    as many rounds as needed (module docstring)."""
    out, kept, filtered, r = Collected(), [], 0, 0
    while True:
        rnd = draw(r)
        out.rounds.append(rnd)
        group_B = rnd.group_B
        if rnd.rewards_B.shape != group_B.shape or rnd.scores_B.shape != group_B.shape:
            raise ValueError(f"round {r}: {group_B.shape[0]} responses but rewards_B {tuple(rnd.rewards_B.shape)}, "
                             f"scores_B {tuple(rnd.scores_B.shape)}; pass one reward and score per response")
        # Filter on the task score (DAPO: accuracy all 0 or all 1), not the length-shaped reward: with
        # overlong shaping on, an all-wrong group would otherwise survive on length differences alone.
        flat_B = uniform_rows(rnd.scores_B, group_B) if cfg.dynamic else torch.zeros_like(group_B, dtype=torch.bool)
        for p in torch.unique(group_B).tolist():
            rows = (group_B == p).nonzero().squeeze(1)
            if bool(flat_B[rows].all()):
                filtered += 1
            else:
                kept.append((rnd.prompts[p], rnd.samples[p], rnd.rewards_B[rows], rnd.scores_B[rows]))
        if not cfg.dynamic or len(kept) >= groups or r >= cfg.max_extra_rounds:
            break
        r += 1
    n = usable_groups([len(k[1]) for k in kept], groups, row_multiple)
    out.prompts, out.samples = [k[0] for k in kept[:n]], [k[1] for k in kept[:n]]
    out.rewards_B = torch.cat([k[2] for k in kept[:n]]) if n else torch.zeros(0)
    out.scores_B = torch.cat([k[3] for k in kept[:n]]) if n else torch.zeros(0)
    out.metrics = {"data/groups_filtered": filtered, "data/extra_rollout_rounds": r,
                   "data/groups_short": groups - n, "data/groups_unused": len(kept) - n}
    return out


def usable_groups(sizes: list[int], groups: int, row_multiple: int) -> int:
    """How many of the kept groups (of `sizes` responses each) to train on: `groups` when there are
    enough, else the most whose rows are a multiple of `row_multiple` (0 if none is)."""
    if len(sizes) >= groups:
        return groups
    rows = 0
    best = 0
    for i, size in enumerate(sizes, start=1):
        rows += size
        if rows % row_multiple == 0:
            best = i
    return best
