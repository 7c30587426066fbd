"""Responses cut at the length limit (DAPO, Yu et al. 2025, section 3.4): a truncated response was
never finished, so its reward (usually 0: no final answer) says more about the limit than about the
reasoning; trained on as is, it teaches "shorter" as noise. Two remedies, chosen by `reward.overlong`:

  filter  overlong filtering: responses that finished with reason "length" are masked out of the loss
          (every token: policy gradient, KL and entropy, and the token counts that normalise them).
          Their rewards still enter their group's advantage baseline, as in DAPO.
  shape   soft overlong punishment, added to the reward before advantages (and before dynamic
          sampling looks for groups of equal rewards). With L_max = rollout.max_tokens, L_cache =
          reward.overlong_buffer and factor = reward.overlong_penalty, a response of |y| tokens gets
              R_length(y) = min(0, -(|y| - (L_max - L_cache)) / L_cache * factor)
          i.e. 0 up to L_max - L_cache tokens, then falling linearly to -factor at L_max (DAPO's
          eq. 13, which also gives -1 beyond L_max: the engine never samples past it). DAPO trains
          with L_max = 20480, L_cache = 4096, factor 1; verl's recipe writes it the same way.
  none    neither (default).
Metrics: response/overlong_frac, the share of the trained batch's responses that were truncated
(whatever the choice; with `filter`, exactly the share masked), and with `shape`
reward/overlong_penalty_mean, the mean penalty over them.
Leaves out: truncation for other reasons (max_model_len reached first also finishes with "length":
`filter` masks those too; `shape` only looks at the length).

Shape legend: B responses, T response positions (padded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor
MODES = ("none", "filter", "shape")


@dataclass(frozen=True)
class RewardSection:
    overlong: str = "none"
    """responses cut at rollout.max_tokens: "none", "filter" (masked out of the loss) or "shape"
    (DAPO's soft overlong punishment added to the reward); see rl.overlong"""
    overlong_buffer: Optional[int] = None
    """shape: L_cache, the last tokens before rollout.max_tokens over which the penalty grows from 0
    to overlong_penalty; None = a fifth of rollout.max_tokens (DAPO: 4096 of 20480)"""
    overlong_penalty: float = 1.0
    """shape: the penalty at rollout.max_tokens (DAPO's factor: 1.0)"""

    def __post_init__(self):
        if self.overlong not in MODES:
            raise ValueError(f"reward.overlong={self.overlong!r}: choose one of {', '.join(MODES)}")
        if self.overlong_buffer is not None and self.overlong_buffer < 1:
            raise ValueError(f"reward.overlong_buffer={self.overlong_buffer}: must be >= 1 token (or null for "
                             "a fifth of rollout.max_tokens)")
        if self.overlong_penalty < 0:
            raise ValueError(f"reward.overlong_penalty={self.overlong_penalty}: must be >= 0 (it is subtracted)")

    def buffer(self, max_tokens: int) -> int:
        """L_cache for responses of at most `max_tokens` tokens."""
        return self.overlong_buffer if self.overlong_buffer is not None else max(1, max_tokens // 5)


def overlong_penalty(lengths_B: Tensor, max_tokens: int, buffer: int, factor: float) -> Tensor:
    """DAPO's soft overlong punishment per response (module docstring): <= 0, float32."""
    exceed_B = lengths_B.float() - (max_tokens - buffer)
    return torch.clamp(-exceed_B / buffer * factor, max=0.0)


def shape_rewards(cfg: RewardSection, rewards_B: Tensor, lengths_B: Tensor, max_tokens: int) -> Tensor:
    """The rewards that enter advantages: plus the overlong penalty with `shape`, else unchanged."""
    if cfg.overlong != "shape":
        return rewards_B
    return rewards_B + overlong_penalty(lengths_B, max_tokens, cfg.buffer(max_tokens), cfg.overlong_penalty)


def loss_mask(cfg: RewardSection, mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """The loss mask: with `filter`, rows of truncated responses are all False; else unchanged."""
    if cfg.overlong != "filter":
        return mask_BT
    return mask_BT & ~truncated_B.bool()[:, None]


def truncated(samples: list[list]) -> Tensor:
    """bool_B: which responses (prompt by prompt, sample by sample) finished with reason "length"."""
    return torch.tensor([s.finish_reason == "length" for group in samples for s in group], dtype=torch.bool)
