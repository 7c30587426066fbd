"""Rollout-mismatch corrections: how far to trust tokens the rollout engine sampled with
probabilities that differ from the trainer's (``tis``, ``masked_is_token``, ``masked_is_seq``;
definitions in ``rl.grpo``'s docstring). The mismatch metrics logged whatever the choice are
``rl.grpo.mismatch_metrics``.

Shape legend: B sequences, T response tokens (padded; ``mask_BT`` True on real tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rl.advantages import pick
from rl.masked import masked_mean, sequence_mean

Tensor = torch.Tensor


def _rollout_log_ratio(old_logp_BT: Tensor, rollout_logp_BT: Tensor, clamp: float) -> Tensor:
    return (old_logp_BT - rollout_logp_BT).detach().clamp(-clamp, clamp)


def truncated_is_weights(old_logp_BT: Tensor, rollout_logp_BT: Tensor, cap: float,
                         log_ratio_clamp: float = 20.0) -> Tensor:
    """min(pi_trainer / pi_rollout, cap) per token, detached (it reweights, never trains)."""
    return torch.exp(_rollout_log_ratio(old_logp_BT, rollout_logp_BT, log_ratio_clamp)).clamp(max=cap)


def masked_is_weights(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, low: float, high: float,
                      per_sequence: bool, log_ratio_clamp: float = 20.0) -> tuple[Tensor, Tensor]:
    """(w_BT, keep_BT): the trainer/rollout ratio r where low <= r <= high, else 0 (IcePop). r is per
    token, or per sequence (the geometric mean over its response tokens, on all of them). The band is
    tested on log r, so an out-of-range ratio never overflows; padding gets weight 0 and keep False."""
    m_BT = mask_BT.bool()
    lr_BT = _rollout_log_ratio(old_logp_BT, rollout_logp_BT, log_ratio_clamp)
    if per_sequence:
        lr_BT = sequence_mean(lr_BT, m_BT).unsqueeze(-1).expand_as(lr_BT)
    keep_BT = m_BT & (lr_BT >= math.log(low)) & (lr_BT <= math.log(high))
    return torch.where(keep_BT, torch.exp(lr_BT), torch.zeros_like(lr_BT)), keep_BT


def _tis(cfg, old_logp_BT, rollout_logp_BT, mask_BT):
    w_BT = truncated_is_weights(old_logp_BT, rollout_logp_BT, cfg.tis_cap, cfg.log_ratio_clamp)
    w_BT = torch.where(mask_BT.bool(), w_BT, torch.zeros_like(w_BT))
    return w_BT, {"tis/weight_mean": masked_mean(w_BT, mask_BT),
                  "tis/truncated_frac": masked_mean((w_BT >= cfg.tis_cap).float(), mask_BT)}


def _masked_is(per_sequence: bool):
    def correct(cfg, old_logp_BT, rollout_logp_BT, mask_BT):
        w_BT, keep_BT = masked_is_weights(old_logp_BT, rollout_logp_BT, mask_BT, cfg.is_band_low,
                                          cfg.is_band_high, per_sequence, cfg.log_ratio_clamp)
        return w_BT, {"mismatch/masked_frac": masked_mean((~keep_BT).float(), mask_BT),
                      "mismatch/is_weight_mean": masked_mean(w_BT, mask_BT)}
    return correct


@dataclass(frozen=True)
class Correction:
    fn: Callable | None
    """(cfg, old_logp_BT, rollout_logp_BT, mask_BT) -> (w_BT, metrics); None: no correction"""
    level: str | None
    """what one weight covers: "token", "sequence", or None"""


CORRECTIONS = {
    "none": Correction(None, None),
    "tis": Correction(_tis, "token"),
    "masked_is_token": Correction(_masked_is(per_sequence=False), "token"),
    "masked_is_seq": Correction(_masked_is(per_sequence=True), "sequence"),
}


def correction_weights(cfg, old_logp_BT: Tensor, rollout_logp_BT: Tensor | None,
                       mask_BT: Tensor) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The detached weights ``cfg.correction`` (a ``rl.grpo.LossConfig``) puts on the per-token policy-gradient loss (None: none)
    and its metrics; the trainer also calls this on a whole batch to log them once per step."""
    fn = pick(CORRECTIONS, cfg.correction, "correction").fn
    if fn is None:
        return None, {}
    if rollout_logp_BT is None:
        raise ValueError(f"LossConfig.correction={cfg.correction!r} needs rollout_logp_BT (the rollout engine's "
                         "log-probs); pass it or set correction='none'")
    return fn(cfg, old_logp_BT, rollout_logp_BT, mask_BT)

