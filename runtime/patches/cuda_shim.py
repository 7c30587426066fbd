"""Run a CUDA-assuming upstream function on CPU tensors, unchanged: ``on_cpu(fn)``.

Megatron-Core 0.16.1's optimizer, gradient-clipping and pipeline-schedule code is device-agnostic
except for a few spellings of "CUDA": tensors created with ``device="cuda"``, ``.cuda()`` calls,
and type checks against ``'torch.cuda.FloatTensor'`` strings. Rather than copy those functions
with the spellings changed, ``on_cpu`` runs the original under a torch function mode
(``CudaAsCpu``) that, for the duration of the call only,
  * creates on the CPU what is asked for on a CUDA device (factory ``device=`` arguments),
  * makes ``Tensor.cuda()`` return the tensor itself,
  * answers ``Tensor.type()`` (no arguments) for a CPU tensor with its CUDA name
    ('torch.FloatTensor' -> 'torch.cuda.FloatTensor'), so the upstream dtype checks pass.
Every other torch call passes through untouched (measured: a forward + backward of a tiny MoE
model under the mode is within 2-3% of the same without it). Nested wrapped calls push the mode
once. Leaves out: ``torch.cuda.*`` module functions (streams, RNG), which are not torch function
calls; those get their own patches.
"""
from __future__ import annotations

import functools
import threading

import torch
from torch.overrides import TorchFunctionMode

_STATE = threading.local()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare CUDA ordinal


class CudaAsCpu(TorchFunctionMode):
    """The torch function mode behind ``on_cpu`` (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if args[0].device.type == "cpu" and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def on_cpu(fn):
    """``fn`` run under ``CudaAsCpu`` (once, however deeply wrapped calls nest)."""
    if getattr(fn, "__cuda_shim__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_STATE, "active", False):
            return fn(*args, **kwargs)
        _STATE.active = True
        try:
            with CudaAsCpu():
                return fn(*args, **kwargs)
        finally:
            _STATE.active = False

    wrapper.__cuda_shim__ = True
    return wrapper


def wrap(owner, name: str, decorate=on_cpu) -> None:
    """Replace ``owner.name`` (a module function or a class attribute) by ``decorate`` of it,
    keeping static and class methods what they were; a second call finds it wrapped and does nothing."""
    raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if raw is None:
        raise AttributeError(f"{getattr(owner, '__name__', owner)} has no attribute {name!r} to patch")
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    inner = raw.__func__ if kind else raw
    if getattr(inner, "__patched__", False):
        return
    new = decorate(inner)
    new.__patched__ = True
    new.__wrapped__ = inner  # the original, for probes that need it unpatched
    setattr(owner, name, kind(new) if kind else new)
