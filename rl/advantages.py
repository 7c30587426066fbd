"""Group-relative advantages: each response's reward against the other responses to its prompt.

``group_B[i]`` is the id of the prompt whose response row i is; rows of a group may sit anywhere in
the batch (packing, filtering and async buffers reorder them) and groups may differ in size. A
group of one has no baseline: its advantage is 0. Estimators are chosen by name from ``ADVANTAGES``
(definitions in ``rl.grpo``'s docstring).

Shape legend: B responses, P groups (prompts) among them.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def group_index(group_B: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(inv_B, count_P): each row's group renumbered 0..P-1 (in order of group id) and each group's
    size. `group_B` holds one integer id per row, in any order."""
    if not isinstance(group_B, torch.Tensor):
        raise TypeError(f"group_B={group_B!r}: pass a tensor of group ids, one per response (e.g. "
                        "torch.arange(P).repeat_interleave(G) for P adjacent groups of G), not a group size")
    if (group_B.dim() != 1 or group_B.shape[0] != n or group_B.dtype.is_floating_point
            or group_B.dtype.is_complex or group_B.dtype == torch.bool):
        raise ValueError(f"group_B has shape {tuple(group_B.shape)} and dtype {group_B.dtype}, but there are "
                         f"{n} rewards: pass one integer group id per response (the index of its prompt)")
    _, inv_B, count_P = torch.unique(group_B, return_inverse=True, return_counts=True)
    return inv_B, count_P


def _per_group(x_B: Tensor, inv_B: Tensor, P: int, reduce: str) -> Tensor:
    """x reduced over each group ("sum", "amax", "amin"), as x_P."""
    out_P = torch.zeros(P, dtype=x_B.dtype, device=x_B.device)
    return out_P.scatter_reduce_(0, inv_B, x_B, reduce=reduce, include_self=False)


def _groups(rewards_B: Tensor, group_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(r_B fp32, inv_B, count_P, mean_P, uniform_P); uniform_P is True where all rewards of the group
    are equal, decided exactly (max == min), not by a rounded std."""
    r_B = rewards_B.float()
    if r_B.dim() != 1:
        raise ValueError(f"rewards_B has shape {tuple(rewards_B.shape)}: pass one reward per response (1-D)")
    inv_B, count_P = (t.to(r_B.device) for t in group_index(group_B, r_B.shape[0]))
    P = count_P.shape[0]
    mean_P = _per_group(r_B, inv_B, P, "sum") / count_P
    uniform_P = _per_group(r_B, inv_B, P, "amax") == _per_group(r_B, inv_B, P, "amin")
    return r_B, inv_B, count_P, mean_P, uniform_P


def grpo_advantages(rewards_B: Tensor, group_B: Tensor, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps), std with Bessel's correction
    (DeepSeekMath, Shao et al. 2024). Groups of one or of equal rewards get A = 0."""
    r_B, inv_B, count_P, mean_P, uniform_P = _groups(rewards_B, group_B)
    centred_B = r_B - mean_P[inv_B]
    var_P = _per_group(centred_B.square(), inv_B, count_P.shape[0], "sum") / (count_P - 1).clamp(min=1)
    # A group of equal rewards (a group of one included) has nothing to learn from: exactly 0, also
    # when eps = 0 (not 0/0).
    return torch.where(uniform_P[inv_B], torch.zeros_like(r_B), centred_B / (var_P.sqrt()[inv_B] + eps))


def drgrpo_advantages(rewards_B: Tensor, group_B: Tensor, eps: float = 1e-6) -> Tensor:
    """A_i = r_i - mean_group r, no std division (Dr.GRPO, Liu et al. 2025: the std term
    up-weights too easy and too hard prompts). `eps` is unused, kept for one signature."""
    r_B, inv_B, _, mean_P, uniform_P = _groups(rewards_B, group_B)
    return torch.where(uniform_P[inv_B], torch.zeros_like(r_B), r_B - mean_P[inv_B])


ADVANTAGES = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages}


def compute_advantages(rewards_B: Tensor, group_B: Tensor, name: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Per-response advantages `adv_B` with the estimator registered as `name`; `group_B[i]` is the
    prompt (group) id of response i, in any order (module docstring)."""
    return pick(ADVANTAGES, name, "advantage")(rewards_B, group_B, eps)


def uniform_rows(rewards_B: Tensor, group_B: Tensor) -> Tensor:
    """bool_B: True where the row's group has all rewards equal (exactly: max == min), i.e. no
    learning signal (rl.sampling drops such groups)."""
    _, inv_B, _, _, uniform_P = _groups(rewards_B, group_B)
    return uniform_P[inv_B]


def group_metrics(rewards_B: Tensor, group_B: Tensor) -> dict[str, Tensor]:
    """Per-group facts of a batch: the share of groups whose rewards are all equal (advantage 0, no
    learning signal; DAPO's dynamic sampling would drop them)."""
    return {"reward/uniform_group_frac": _groups(rewards_B, group_B)[4].float().mean()}


def pick(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; choose one of {sorted(registry)}")
    return registry[name]
