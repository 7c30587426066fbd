"""Import megatron.core without paying for ``torch.compile`` at import time.

megatron-core 0.16.1 sets ``megatron.core.jit.jit_fuser = torch.compile`` and decorates ~40
fusion functions with it while ``import megatron.core`` runs. The first ``torch.compile`` call
imports TorchDynamo and Inductor: measured here, ``import megatron.core`` takes ~2.7 s, of which
~1.7 s is that import, and a converter never calls a fused function (it only builds a
meta-device model to learn the checkpoint layout).

``import_megatron()`` imports megatron.core while ``torch.compile`` is replaced by
``deferred_compile``, which returns a plain wrapper that calls the real ``torch.compile`` on the
function's first call and the compiled function from then on. Since ``torch.compile`` itself
only compiles at the first call, behaviour is the same; only the Dynamo/Inductor import moves
to the first use of a fused function (never, in a conversion). ``jit_fuser`` keeps the wrapper,
so modules megatron imports later get it too. Modules (``nn.Module`` arguments) go to the real
``torch.compile`` unchanged. If megatron.core is already imported this does nothing. The cyclic
garbage collector is paused during the import (it re-scans every new object repeatedly: ~0.15 s).

Without it every conversion pays ~1.7 s of start-up for code it never runs.
"""
from __future__ import annotations

import functools
import gc
import sys

import torch

_REAL_COMPILE = torch.compile


def deferred_compile(model=None, **kwargs):
    """``torch.compile`` with the compile (and the Dynamo import) deferred to the first call."""
    if model is None:  # used as @torch.compile(mode=...)
        return lambda fn: deferred_compile(fn, **kwargs)
    if isinstance(model, torch.nn.Module) or not callable(model):
        return _REAL_COMPILE(model, **kwargs)
    compiled = None

    @functools.wraps(model)
    def call(*args, **kw):
        nonlocal compiled
        if compiled is None:
            compiled = _REAL_COMPILE(model, **kwargs)
        return compiled(*args, **kw)

    return call


def import_megatron() -> None:
    """``import megatron.core`` with ``torch.compile`` deferred (see the module docstring)."""
    if "megatron.core" in sys.modules:
        return
    was_enabled = gc.isenabled()
    gc.disable()  # the import allocates ~10^5 objects: each cyclic collection rescans them all
    torch.compile = deferred_compile
    try:
        import megatron.core  # noqa: F401
        import megatron.core.jit  # noqa: F401  (binds jit_fuser while the deferral is in place)
    finally:
        torch.compile = _REAL_COMPILE
        if was_enabled:
            gc.enable()
