"""Reductions over the real tokens of a padded ``[B, T]`` batch (``mask_BT`` True on real tokens),
shared by the GRPO loss, the rollout-mismatch corrections and the metrics.

Shape legend: B sequences, T response tokens (padded).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def masked_sum(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Sum over unmasked entries; padding never contributes, even if it holds inf or nan."""
    return torch.where(mask_BT.bool(), x_BT, torch.zeros_like(x_BT)).sum()


def masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over unmasked entries (0 when there are none)."""
    return masked_sum(x_BT, mask_BT) / mask_BT.bool().sum().clamp(min=1)


def sequence_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Per-row mean over unmasked entries, x_B (0 for a row without any)."""
    m_BT = mask_BT.bool()
    return torch.where(m_BT, x_BT, torch.zeros_like(x_BT)).sum(-1) / m_BT.sum(-1).clamp(min=1)
