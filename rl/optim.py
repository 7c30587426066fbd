"""The optimizer side of the trainer: gradient reduction across ranks, global grad norm and
clipping, AdamW (with fp32 master weights for bf16 models) and the learning-rate schedule.

Gradients. Every rank's loss is normalised by global counts (tokens of the whole global batch), so
the global gradient is a SUM of the ranks' gradients:
  - ordinary parameters: summed over the data-parallel x context-parallel group;
  - expert parameters (MCore marks them `allreduce = False`): over the expert-data-parallel group;
  - parameters tagged `sequence_parallel` (norms, router with MoE + TP): also summed over TP,
    since each TP rank saw only its slice of the sequence; so are the q/k layer norms
    (`mark_tp_summed`), which each TP rank applies to its own heads only.
Grad norm: squares of this rank's gradients, skipping tensor-parallel duplicates, summed over the
model-parallel group (dense) and the expert model-parallel group (experts), as Megatron does.
Schedules: `SCHEDULES` maps a name to f(step, warmup, total, min_ratio) -> lr multiplier.

Leaves out: Megatron's distributed optimizer (optimizer state sharded over data parallel) and
overlapped gradient reduction: fine for RL at the scales this repository tests; on large GPU runs
the optimizer state is replicated over data parallel. Without it, ranks would step on their own
partial gradients and drift apart.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


# ------------------------------------------------------------------------------ schedules
def _constant(step: int, warmup: int, total: int, min_ratio: float) -> float:
    return 1.0


def _linear(step: int, warmup: int, total: int, min_ratio: float) -> float:
    frac = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - min_ratio) * frac


def _cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    frac = min(1.0, max(0, step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_at(step: int, *, lr: float, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then `schedule`."""
    if schedule not in SCHEDULES:
        raise KeyError(f"optim.schedule={schedule!r}: choose one of {sorted(SCHEDULES)}")
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr * SCHEDULES[schedule](step, warmup, total, min_ratio)


# ------------------------------------------------------------------------------ gradients
def _sum_over(tensors: list[torch.Tensor], group) -> None:
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, r in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


def reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum gradients over the ranks that share each parameter (module docstring)."""
    from megatron.core import parallel_state as ps

    params = [p for p in params if p.grad is not None]
    dense = [p.grad for p in params if getattr(p, "allreduce", True)]
    expert = [p.grad for p in params if not getattr(p, "allreduce", True)]
    _sum_over(dense, ps.get_data_parallel_group(with_context_parallel=True))
    _sum_over(expert, ps.get_expert_data_parallel_group())
    _sum_over([p.grad for p in params if getattr(p, "sequence_parallel", False) or getattr(p, TP_SUMMED, False)],
              ps.get_tensor_model_parallel_group())


TP_SUMMED = "tp_summed_grad"


def mark_tp_summed(model) -> int:
    """Tag the parameters whose gradient must be summed over TP although they are replicated: the
    q/k layer norms, which each TP rank applies to its own heads only (Megatron-Core's
    finalize_model_grads sums them by name when ``qk_layernorm``). Untagged, the replicas drift
    apart after the first step. Returns the number tagged."""
    if not getattr(model.config, "qk_layernorm", False):
        return 0
    tagged = 0
    for name, p in model.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            setattr(p, TP_SUMMED, True)
            tagged += 1
    return tagged


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the (reduced) gradients, each parameter element counted once."""
    from megatron.core import parallel_state as ps

    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    for p in params:
        if p.grad is None:
            continue
        is_expert = not getattr(p, "allreduce", True)
        duplicate = not getattr(p, "tensor_model_parallel", False) and (etp_rank if is_expert else tp_rank) != 0
        if duplicate:
            continue
        sq = p.grad.detach().double().square().sum().cpu()
        if is_expert:
            expert_sq += sq
        else:
            dense_sq += sq
    for t, group in ((dense_sq, ps.get_model_parallel_group()),
                     (expert_sq, ps.get_expert_tensor_model_pipeline_parallel_group())):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return math.sqrt(float(dense_sq + expert_sq))


# ------------------------------------------------------------------------------ AdamW
class AdamW:
    """torch AdamW over fp32 parameters: the model's own when they are fp32, else fp32 master
    copies (gradients are cast up before the step, results copied back down after it)."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, betas, eps: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                       for p in self.params]
        decay = [m for p, m in zip(self.params, self.master) if p.dim() > 1]
        no_decay = [m for p, m in zip(self.params, self.master) if p.dim() <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=tuple(betas), eps=eps)
        self.steps = 0

    def ordered(self) -> list[torch.nn.Parameter]:
        """Model parameters in optimizer order (decay group first), for the checkpoint mapping."""
        return [p for p in self.params if p.dim() > 1] + [p for p in self.params if p.dim() <= 1]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for m in self.master:
            m.grad = None

    def step(self, lr: float, clip: float) -> tuple[float, float]:
        """Reduce, clip and apply the gradients; returns (grad norm before clipping, lr)."""
        reduce_grads(self.params)
        norm = grad_norm(self.params)
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm} at optimizer step {self.steps}: "
                                     "lower optim.lr or check the data for empty responses")
        scale = clip / (norm + 1e-6) if clip > 0 and norm > clip else 1.0
        for p, m in zip(self.params, self.master):
            if p.grad is None:
                continue
            g = p.grad.float() if m is not p else p.grad
            if scale != 1.0:
                g.mul_(scale)
            m.grad = g
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        self.steps += 1
        return norm, lr

    def init_state(self) -> None:
        """Create zero moments (so a checkpoint can be loaded into them before the first step)."""
        for group in self.opt.param_groups:
            for m in group["params"]:
                if m not in self.opt.state or not self.opt.state[m]:
                    self.opt.state[m] = {"step": torch.zeros((), dtype=torch.float32),
                                         "exp_avg": torch.zeros_like(m), "exp_avg_sq": torch.zeros_like(m)}
