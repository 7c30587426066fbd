"""Megatron-Core on any device: process groups, CPU configuration, and a GPTModel builder.

megatron-core 0.16.1 assumes CUDA (or Transformer Engine) in a handful of places. On a machine
without CUDA this module provides, once per process and before any model is built:

* the upstream-defect patches of ``runtime.patches.megatron_core`` (``setup()`` applies
  ``AT_SETUP``: ``torch.cuda.current_device``/``synchronize`` on CPU, the TE flags that read
  True without TE, the in-process ``torch_dist`` writer); each names the upstream code at fault
  and has a probe that says when it can go;
* CPU configuration through MCore's public options, which is not a patch: an RNG tracker that
  works without CUDA (the inference tracker; dropout must be 0) and the ``allgather`` MoE token
  dispatcher (``alltoall`` creates CUDA streams);
* layer-spec substitutions (``runtime.modules``, features the local spec lacks): a core attention
  on ``scaled_dot_product_attention`` that accepts MLA's ``k_channels``/``v_channels``, and an
  RMSNorm/LayerNorm that supports sequence parallelism (needed for MoE with TP > 1).

On a machine with CUDA and Transformer Engine, ``setup()`` changes nothing and the TE spec is
used as is. What it leaves out: pipeline schedules and virtual pipeline stages (the model is built
for the calling rank's stage; driving the schedule is the trainer's business).

Callers always pass an explicit causal mask (``causal_mask``): MCore's default mask is built
with ``device="cuda"``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Optional

import torch

from runtime import patches


def has_cuda() -> bool:
    return torch.cuda.is_available()


def has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


# --------------------------------------------------------------------------- CPU patches
def setup() -> None:
    """Make megatron.core usable in this process; idempotent; a no-op when CUDA is present."""
    from runtime.megatron_import import import_megatron

    import_megatron()  # before any megatron module: keeps Dynamo/Inductor out of start-up
    if not has_cuda():
        patches.apply(patches.megatron_core.AT_SETUP)


# --------------------------------------------------------------------------- process groups
def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                     cp: int = 1, seed: int = 1234, backend: Optional[str] = None,
                     vpp: Optional[int] = None) -> None:
    """Initialise torch.distributed (from torchrun's env, or a single local process) and MCore's
    parallel state at the given layout (``vpp`` virtual pipeline stages per rank). Idempotent for
    the same layout."""
    setup()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", 1))
        # A lone process gets a private store: writing MASTER_PORT into os.environ would hand the port
        # this process's store listens on to every child it starts (a child worker then fails to bind it).
        store = dist.HashStore() if world == 1 and "MASTER_PORT" not in os.environ else None
        if store is None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(
            backend or ("nccl" if has_cuda() else "gloo"), store=store,
            rank=int(os.environ.get("RANK", 0)), world_size=world,
            timeout=datetime.timedelta(minutes=10))
        if has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    global _LAYOUT
    layout = (world, tp, pp, ep, etp or tp, cp, vpp)
    if not ps.model_parallel_is_initialized() or layout != _LAYOUT:
        # MCore's destroy forgets its groups but leaves them (and each gloo group's threads) alive; a
        # process that re-initialises at the same layout reuses the groups it has instead of piling up
        # thousands of threads (a test session did: load average ~900 on 2 cores)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp, virtual_pipeline_model_parallel_size=vpp)
        _LAYOUT = layout
    elif vpp is not None:
        ps.set_virtual_pipeline_model_parallel_rank(0)
    if has_cuda():
        mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        mrandom.get_cuda_rng_tracker().add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed)
    torch.manual_seed(seed)


_LAYOUT: Optional[tuple] = None  # the layout MCore's parallel state was last built for (init_distributed)


def destroy_distributed() -> None:
    """MCore's parallel state and every process group (the default group's destroy takes the rest)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    global _LAYOUT
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _LAYOUT = None


# --------------------------------------------------------------------------- model builder
def causal_mask(seq_len: int, dev: Optional[torch.device] = None) -> torch.Tensor:
    """MCore's convention: a bool ``[1, 1, S, S]`` mask, True where attention is *blocked*."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=dev), 1)


def layer_spec(config, spec: str = "local", family: Optional[str] = None, vp_stage: Optional[int] = None):
    """The decoder block spec for ``spec`` ("local" or "te") of this rank's pipeline stage (virtual
    stage ``vp_stage``), with the CPU substitutions, then adjusted by ``family``'s ``layer_spec``
    hook when the family declares one (attention sinks, extra norms, ...: see
    ``mapping.family.Family.layer_spec``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if spec not in ("local", "te"):
        raise ValueError(f"--spec must be 'local' or 'te', got {spec!r}")
    if spec == "te" and not has_te():
        raise RuntimeError("--spec te needs Transformer Engine (a CUDA machine); use --spec local")
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=spec == "te",
                                       normalization=config.normalization, vp_stage=vp_stage)
    if spec == "local":
        from runtime.modules import substitute_local_modules

        block = substitute_local_modules(block, config)
        if config.context_parallel_size > 1:  # the local spec has no CP attention: runtime.cp_attention
            from runtime import cp_attention

            block = cp_attention.substitute_cp_attention(block)
            patches.apply(["cp_rope_on_cpu"])  # MCore 0.16.1 slices rope for CP with .cuda()
    if family is not None:
        from mapping.registry import FAMILIES

        hook = FAMILIES[family].layer_spec
        block = named(hook)(block, config) if hook else block
    return block


def named(ref):
    """A family hook: the object itself, or the one a ``"module:attribute"`` name points to."""
    if not isinstance(ref, str):
        return ref
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def rope_kwargs(config, rope: Optional[dict]) -> dict:
    """GPTModel's rope keyword arguments from a family's ``ModelConfig.rope``; its ``yarn_*``
    entries go onto ``config`` instead: GPTModel reads a non-MLA YaRN's settings off the config
    (attributes, not TransformerConfig fields), as Megatron-LM's _apply_yarn_config_from_args sets them."""
    rope = dict(rope or {})
    for name in [k for k in rope if k.startswith("yarn_")]:
        setattr(config, name, rope.pop(name))
    return {"position_embedding_type": "rope", **rope}


def build_gpt_model(config, *, vocab_size: int, max_sequence_length: int, spec: str = "local",
                    rope: Optional[dict] = None, tie_embeddings: bool = False,
                    meta: bool = False, family: Optional[str] = None, vp_stage: Optional[int] = None):
    """Build this rank's ``GPTModel`` (its PP stage; with virtual pipeline stages, chunk
    ``vp_stage``) in the current parallel state.

    ``rope`` holds GPTModel's rope keyword arguments (``rotary_base``, ``rope_scaling``,
    ``position_embedding_type``, ...); its ``yarn_*`` entries are set on ``config`` instead.
    ``meta=True`` allocates nothing: useful to learn ``sharded_state_dict()`` keys and shapes.
    ``family``: apply that family's ``layer_spec`` hook (``layer_spec``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    setup()
    if not has_cuda() and config.num_moe_experts and config.moe_token_dispatcher_type != "allgather":
        config = dataclasses.replace(config, moe_token_dispatcher_type="allgather")
    if meta and config.perform_initialization:
        # Initialising meta tensors computes nothing, but torch's meta normal_ imports Dynamo (~0.4 s).
        config = dataclasses.replace(config, perform_initialization=False)
    block = layer_spec(config, spec, family, vp_stage)
    kwargs = dict(config=config, transformer_layer_spec=block, vocab_size=vocab_size,
                  max_sequence_length=max_sequence_length,
                  pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                  post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                  share_embeddings_and_output_weights=tie_embeddings, vp_stage=vp_stage, **rope_kwargs(config, rope))
    if config.mtp_num_layers:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        kwargs["mtp_block_spec"] = get_gpt_mtp_block_spec(config, block, use_transformer_engine=spec == "te")
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = GPTModel(**kwargs)
    return model


def sharded_state_dict(model) -> dict:
    """``model.sharded_state_dict()`` under the metadata Megatron-LM's training loop passes
    (``mapping.layout.CONTENT_METADATA``): the checkpoint layout its ``--load`` asks for. Every
    save and load in this project goes through here, so all agree with that consumer."""
    from mapping.layout import CONTENT_METADATA

    return model.sharded_state_dict(metadata=dict(CONTENT_METADATA))


def load_checkpoint(model, ckpt_dir, sharded: Optional[dict] = None) -> dict:
    """The model's state dict from a ``torch_dist`` directory, read the way Megatron-LM's
    ``--load`` reads it: the sharded state dict (default ``sharded_state_dict(model)``) under
    ``"model"``, because ``dist_checkpointing.load`` merges ``common.pt`` (``args``,
    ``iteration``, ...) into the top level of what it returns."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load({"model": sharded or sharded_state_dict(model)}, str(ckpt_dir))["model"]


# --------------------------------------------------------------------------- from a family config
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def transformer_config(m, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                       cp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
    """MCore ``TransformerConfig`` for a ``mapping.family.ModelConfig`` at a parallel layout
    (the family's ``config_class`` when it declares one).

    MoE with TP > 1 requires sequence parallelism in MCore; it is switched on here."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mapping.registry import FAMILIES

    kw = dict(m.transformer)
    kw.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
              context_parallel_size=cp, params_dtype=dtype, bf16=dtype == torch.bfloat16,
              fp16=dtype == torch.float16, use_cpu_initialization=not has_cuda(),
              sequence_parallel=tp > 1 and m.num_experts > 0)
    if pp > 1:
        kw.setdefault("pipeline_dtype", dtype)
    kw.update(overrides)
    family = FAMILIES.get(m.family)
    if family is not None and family.config_class is not None:
        return named(family.config_class)(**kw)
    return (MLATransformerConfig if m.mla else TransformerConfig)(**kw)


def build_from(m, *, spec: str = "local", dtype: torch.dtype = torch.float32, meta: bool = False,
               tp: int = 1, pp: int = 1, ep: int = 1, **overrides):
    """This rank's GPTModel for a family ``ModelConfig`` (parallel state must match tp/pp/ep)."""
    cfg = transformer_config(m, tp=tp, pp=pp, ep=ep, dtype=dtype, **overrides)
    return build_gpt_model(cfg, spec=spec, meta=meta, family=m.family, **m.gpt_model_kwargs())


def init_local() -> None:
    """A private world of one process (for meta-model planning under MPI / torchrun launchers
    whose ranks must not form one torch.distributed group)."""
    import torch.distributed as dist

    setup()
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import parallel_state as ps

    global _LAYOUT
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
        _LAYOUT = (dist.get_world_size(), 1, 1, 1, 1, 1, None)
        if not has_cuda():
            from megatron.core.tensor_parallel import random as mrandom

            mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
            mrandom.get_cuda_rng_tracker().add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, 0)
