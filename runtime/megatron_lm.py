"""The GPTModel Megatron-LM's ``pretrain_gpt.py`` builds from its flags: an independent consumer
of converted checkpoints for tests (CPU, local spec). It knows nothing of ``mapping/`` or of what
the converter writes beside the tensors (``common.pt``, content metadata): a converter checked only
by a model built from its own config translation cannot see its own layout bugs.

Mirrored in our own words from Megatron-LM (snapshot d98e8a6, 2026-08-22):
* flags, types, defaults: ``megatron/training/arguments.py`` (``_add_network_size_args``,
  ``_add_moe_args``, ``_add_mla_args``, ``_add_training_args``, ``moe_freq_type``, the flags
  ``ArgumentGroupFactory`` generates from TransformerConfig/TokenizerConfig fields) and the
  model part of ``validate_args``;
* ``core_transformer_config_from_args``, ``_apply_yarn_config_from_args`` (``argument_utils.py``);
* ``gpt_config_from_args`` + ``GPTModelBuilder.build_model`` / ``default_layer_spec`` /
  ``mtp_block_spec`` (``megatron/training/models/gpt.py``, what pretrain_gpt.py runs; same model
  as ``gpt_builders.gpt_builder``); ``calculate_padded_vocab_size`` (``vocab_utils.py``);
* ``load_checkpoint`` (``megatron/training/checkpointing.py``) for a checkpoint without content
  metadata: ``sharded_state_dict(metadata={"dp_cp_group": ...})``.

Departures (no key or shape depends on them): the CPU necessities (README, Platform notes; shims of
``runtime.megatron``, SDPA core attention and a sequence-parallel norm in the local spec,
CPU initialisation, fp32 parameters whatever ``--bf16`` says, dropout 0, ``allgather`` dispatcher
so no shared-expert overlap, fused kernels off); ``--rope-scaling-factor`` reaches GPTModel as
after Megatron-LM PR #6306 (the snapshot drops it, issue #6305); the load is strict both ways
(Megatron-LM's default ``--dist-ckpt-strictness assume_ok_unexpected`` ignores extra tensors).

Left out: Transformer Engine (flags must say ``--transformer-impl local``), tokenizers
(``--vocab-size`` stands in for the tokenizer's size), pipeline schedules (``logits`` needs PP=1),
uneven/virtual pipeline stages, heterogeneous/hybrid/experimental-attention models, activations
other than SwiGLU/GeLU/quick-GeGLU, ``--spec``, ``--yaml-cfg``, ``--use-checkpoint-args``. An unlisted flag
raises, so a typo never silently becomes a default.

Shape legend: B batch, S sequence, Vp padded vocab.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re

import torch

from runtime import megatron as rt


def window_size(text: str) -> tuple[int, ...]:
    """``--window-size``: ``"127,0"`` or ``"(127,0)"`` -> (127, 0), as Megatron-LM's ``tuple_type``."""
    return tuple(int(i) for i in text.strip("()").split(","))


def moe_freq(text: str):
    """``--moe-layer-freq``: an int N (every N-th layer MoE) or a list expression like
    ``[0]*3+[1]*58`` (1 = MoE layer), evaluated after checking it holds only list syntax."""
    if "[" not in text:
        return int(text)
    if re.search(r"[^,\d\[\]()+*]", text):
        raise ValueError(f"--moe-layer-freq {text!r}: only digits , [ ] ( ) + * are allowed")
    return list(eval(text, {"__builtins__": {}}))  # noqa: S307 - checked above, as Megatron-LM does


# Megatron-LM's defaults, by destination; the flag is --dest-with-hyphens unless named otherwise.
VALUED = {  # dest: (type, default); a [type] takes one or more values (nargs='+')
    **{d: (int, None) for d in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
        "max_position_embeddings", "rotary_seq_len_interpolation_factor", "padded_vocab_size",
        "vocab_size", "mtp_num_layers", "q_lora_rank", "num_experts", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size", "moe_router_num_groups", "moe_router_group_topk",
        "yarn_original_max_position_embeddings", "expert_tensor_parallel_size")},
    **{d: (float, None) for d in (
        "moe_router_topk_scaling_factor", "moe_z_loss_coeff", "moe_expert_capacity_factor",
        "yarn_beta_fast", "yarn_beta_slow", "activation_func_clamp_value")},
    "window_size": (window_size, None), "window_attn_skip_freq": (moe_freq, None),
    "softmax_type": (str, "vanilla"), "glu_linear_offset": (float, 0.0),
    "num_query_groups": (int, 1), "rotary_base": (int, 10000), "make_vocab_size_divisible_by": (int, 128),
    "kv_lora_rank": (int, 32), "qk_head_dim": (int, 128), "qk_pos_emb_head_dim": (int, 64),
    "v_head_dim": (int, 128), "moe_router_topk": (int, 2), "moe_layer_freq": (moe_freq, 1),
    "rotary_percent": (float, 1.0), "rope_scaling_factor": (float, 8.0),
    "layernorm_epsilon": (float, 1e-5), "hidden_dropout": (float, 0.1),
    "attention_dropout": (float, 0.1), "rotary_scaling_factor": (float, 1.0),
    "mscale": (float, 1.0), "mscale_all_dim": (float, 0.0), "moe_router_bias_update_rate": (float, 1e-3),
    "position_embedding_type": (str, "learned_absolute"), "rope_type": (str, None),
    "normalization": (str, "LayerNorm"), "transformer_impl": (str, "transformer_engine"),
    "moe_router_score_function": (str, "softmax"), "moe_router_dtype": (str, None),
    "moe_token_dispatcher_type": (str, "allgather"), "moe_token_drop_policy": (str, "probs"),
    "moe_router_load_balancing_type": ([str], "aux_loss"), "moe_aux_loss_coeff": ([float], 0.0),
}
SWITCH_ON = (  # store_true, default False
    "group_query_attention", "use_rotary_position_embeddings", "rotary_interleaved",
    "use_rope_scaling", "swiglu", "quick_geglu", "untie_embeddings_and_output_weights",
    "layernorm_zero_centered_gamma", "add_qkv_bias", "qk_layernorm", "qk_l2_norm", "bf16", "fp16",
    "sequence_parallel", "multi_latent_attention", "moe_shared_expert_gate",
    "moe_shared_expert_overlap", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
    "moe_grouped_gemm", "no_persist_layer_norm", "attention_softmax_in_fp32")
SWITCH_OFF = (  # store_false, default True; spelled --no-<dest> unless named otherwise
    "add_position_embedding", "add_bias_linear", "masked_softmax_fusion", "bias_gelu_fusion",
    "bias_swiglu_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")
FLAG_NAMES = {  # dest: flag, where the flag is not --dest / --no-dest
    "layernorm_epsilon": "--norm-epsilon", "layernorm_zero_centered_gamma": "--apply-layernorm-1p",
    "add_bias_linear": "--disable-bias-linear", "add_position_embedding": "--no-position-embedding",
    "apply_rope_fusion": "--no-rope-fusion"}


def _flag(dest: str, prefix: str = "--") -> str:
    return FLAG_NAMES.get(dest, prefix + dest.replace("_", "-"))


# flag: (dest, type | "true" | "false", default)
MODEL_FLAGS = {**{_flag(d): (d, t, v) for d, (t, v) in VALUED.items()},
               **{_flag(d): (d, "true", False) for d in SWITCH_ON},
               **{_flag(d, "--no-"): (d, "false", True) for d in SWITCH_OFF},
               # a tri-state: None lets YarnRotaryEmbedding's default (True) apply
               "--yarn-correction-range-round-to-int": ("yarn_correction_range_round_to_int", "true", None),
               "--no-yarn-correction-range-round-to-int": ("yarn_correction_range_round_to_int", "false", None)}
# Accepted and ignored: they change training, data or saving, never the model built here.
OTHER_FLAGS = {
    "--save-interval", "--micro-batch-size", "--global-batch-size", "--seq-length",
    "--tokenizer-type", "--tokenizer-model", "--use-mcore-models", "--recompute-activations",
    "--moe-layer-recompute", "--trust-remote-code", "--attention-backend", "--use-flash-attn",
}


def flag_pairs(text: str) -> list[tuple[str, list[str]]]:
    """``[(flag, values)]`` in order; ``#`` comment lines and shell ``\\`` continuations dropped."""
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
    pairs: list[tuple[str, list[str]]] = []
    for tok in " ".join(lines).split():
        if tok == "\\":
            continue
        if tok.startswith("--"):
            pairs.append((tok, []))
        elif not pairs:
            raise ValueError(f"flags text: {tok!r} comes before any --flag")
        else:
            pairs[-1][1].append(tok)
    return pairs


def parse_flags(text: str) -> argparse.Namespace:
    """Megatron-LM's args for these flags: its defaults, the flags, then its ``validate_args``."""
    a = {dest: default for dest, _, default in MODEL_FLAGS.values()}
    for flag, values in flag_pairs(text):
        if flag in OTHER_FLAGS:
            continue
        if flag not in MODEL_FLAGS:
            raise ValueError(f"unknown flag {flag}: add it to VALUED/SWITCH_ON/SWITCH_OFF (with its "
                             "arguments.py type and default) if it changes the model, else to OTHER_FLAGS")
        dest, kind, _ = MODEL_FLAGS[flag]
        if kind in ("true", "false"):
            if values:
                raise ValueError(f"{flag} takes no value, got {values}")
            a[dest] = kind == "true"
        elif isinstance(kind, list):
            if not values:
                raise ValueError(f"{flag} needs at least one value")
            a[dest] = [kind[0](v) for v in values]
        elif len(values) != 1:
            raise ValueError(f"{flag} takes one value, got {values}")
        else:
            a[dest] = kind(values[0])
    args = argparse.Namespace(**a)
    _validate(args)
    return args


def _validate(a: argparse.Namespace) -> None:
    """The model-building part of Megatron-LM's ``validate_args``."""
    for dest in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if getattr(a, dest) is None:
            raise ValueError(f"--{dest.replace('_', '-')} is required (Megatron-LM validate_args)")
    if a.ffn_hidden_size is None:  # SwiGLU: 2/3 of 4h, rounded down to a multiple of 64
        a.ffn_hidden_size = int(4 * a.hidden_size * 2 / 3 / 64) * 64 if a.swiglu else 4 * a.hidden_size
    if a.kv_channels is None:
        if a.hidden_size % a.num_attention_heads:
            raise ValueError("--kv-channels is needed: hidden size is not a multiple of the heads")
        a.kv_channels = a.hidden_size // a.num_attention_heads
    a.params_dtype = torch.bfloat16 if a.bf16 else torch.half if a.fp16 else torch.float
    if a.add_bias_linear:
        a.add_qkv_bias = True
    else:
        a.bias_gelu_fusion = False
    if a.use_rotary_position_embeddings:
        a.position_embedding_type = "rope"
    if a.position_embedding_type != "rope":
        a.apply_rope_fusion = False
        if not a.add_position_embedding:
            raise ValueError("--no-position-embedding is deprecated: use --position-embedding-type")
    if a.num_experts == 0:
        a.num_experts = None
    if a.num_experts is not None and a.moe_ffn_hidden_size is None:
        a.moe_ffn_hidden_size = a.ffn_hidden_size
    for dest in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if isinstance(getattr(a, dest), list) and len(getattr(a, dest)) == 1:
            setattr(a, dest, getattr(a, dest)[0])
    if a.multi_latent_attention and a.group_query_attention:
        raise ValueError("--group-query-attention and --multi-latent-attention exclude each other")


# --------------------------------------------------------------------------- config, model, load
CPU_OVERRIDES = dict(  # README Platform notes: what MCore 0.16.1 needs on CPU; no key or shape depends on it
    use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
    bf16=False, fp16=False, hidden_dropout=0.0, attention_dropout=0.0,
    moe_token_dispatcher_type="allgather", moe_shared_expert_overlap=False,
    gradient_accumulation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
    bias_activation_fusion=False, bias_dropout_fusion=False, persist_layer_norm=False)


def padded_vocab_size(args: argparse.Namespace, tp: int = 1) -> int:
    """``--padded-vocab-size`` as given, else the tokenizer's size (``--vocab-size``) rounded up
    to a multiple of ``--make-vocab-size-divisible-by`` x TP, as Megatron-LM pads it."""
    if args.padded_vocab_size is not None:
        return args.padded_vocab_size
    if args.vocab_size is None:
        raise ValueError("give --padded-vocab-size (config.json's vocab_size) or --vocab-size "
                         "(the tokenizer's size, padded the Megatron-LM way)")
    multiple = args.make_vocab_size_divisible_by * tp
    return -(-args.vocab_size // multiple) * multiple


def transformer_config(args: argparse.Namespace, tp: int = 1, ep: int = 1, pp: int = 1,
                       overrides: dict | None = None):
    """What ``core_transformer_config_from_args`` builds from ``args``, at this layout, on CPU;
    ``overrides``: config fields no flag can set (e.g. MLA yarn ``beta_fast``), set the way
    Megatron-Bridge's model providers set them."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    a = vars(args)
    kw = {f.name: a[f.name] for f in dataclasses.fields(cls) if f.name in a}
    kw.update(num_moe_experts=args.num_experts, persist_layer_norm=not args.no_persist_layer_norm,
              pipeline_dtype=args.params_dtype,
              num_query_groups=args.num_query_groups if args.group_query_attention else None)
    if args.swiglu:
        kw.update(activation_func=F.silu, gated_linear_unit=True,
                  bias_activation_fusion=args.bias_swiglu_fusion)
    else:
        kw["bias_activation_fusion"] = args.bias_gelu_fusion
    if args.quick_geglu:
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        if args.swiglu:
            raise ValueError("--swiglu and --quick-geglu exclude each other (Megatron-LM asserts it)")
        kw.update(activation_func=quick_gelu, gated_linear_unit=True)
    if args.rope_type is None:
        kw.pop("rope_type", None)  # the config class default: "yarn" for MLA
    elif not (args.multi_latent_attention or args.rope_type == "rope"):
        raise ValueError(f"--rope-type {args.rope_type}: only MLA takes a rope type other than rope")
    # validate_args turns sequence parallelism off at TP=1; MCore requires it for MoE with TP > 1
    kw.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              expert_model_parallel_size=ep,
              sequence_parallel=tp > 1 and (args.sequence_parallel or args.num_experts is not None))
    kw.update(CPU_OVERRIDES)
    kw.update(overrides or {})
    config = cls(**kw)
    if args.position_embedding_type == "yarn" and not args.multi_latent_attention:
        yarn = dict(  # GPTModel reads these off the config for non-MLA YaRN; None: YaRN's default
            rotary_scaling_factor=(args.rotary_scaling_factor, 1.0), mscale=(args.mscale, 1.0),
            original_max_position_embeddings=(args.yarn_original_max_position_embeddings, 4096),
            beta_fast=(args.yarn_beta_fast, 32.0), beta_slow=(args.yarn_beta_slow, 1.0),
            mscale_all_dim=(args.mscale_all_dim, 0.0),
            correction_range_round_to_int=(args.yarn_correction_range_round_to_int, True))
        for name, (value, default) in yarn.items():
            if not hasattr(config, "yarn_" + name):
                setattr(config, "yarn_" + name, default if value is None else value)
    return config


def _local_layer_spec(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(
        config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
        config.multi_latent_attention, normalization=config.normalization,
        use_kitchen=config.use_kitchen, use_kitchen_attention=config.use_kitchen_attention,
        kitchen_attention_backend=config.kitchen_attention_backend)


def build_model(args: argparse.Namespace, tp: int = 1, ep: int = 1, pp: int = 1, overrides: dict | None = None):
    """This rank's GPTModel as pretrain_gpt.py builds it for ``--transformer-impl local``
    (initialises the process groups for tp/ep/pp); ``overrides`` as in ``transformer_config``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from runtime.modules import substitute_local_modules

    if args.transformer_impl != "local":
        raise ValueError(f"--transformer-impl {args.transformer_impl}: only the local spec is built "
                         "here (no Transformer Engine on CPU); add --transformer-impl local")
    rt.setup()
    rt.init_distributed(tp=tp, ep=ep, pp=pp, etp=args.expert_tensor_parallel_size)
    config = transformer_config(args, tp=tp, ep=ep, pp=pp, overrides=overrides)
    if config.num_moe_experts:
        layer_spec = specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=config.normalization,
            qk_l2_norm=config.qk_l2_norm)
    else:
        layer_spec = _local_layer_spec(config)
    mtp_spec = None
    if config.mtp_num_layers is not None:  # MTP layers repeat the last decoder layer's spec
        if getattr(layer_spec, "layer_specs", None) == []:
            last = _local_layer_spec(config)
        else:
            last = specs.get_gpt_decoder_layer_specs(
                config, use_transformer_engine=False, normalization=config.normalization,
                qk_l2_norm=config.qk_l2_norm)[-1]
        mtp_spec = specs.get_gpt_mtp_block_spec(config, last, use_transformer_engine=False)
        mtp_spec = mtp_spec and substitute_local_modules(mtp_spec, config)
    return GPTModel(
        config=config, transformer_layer_spec=substitute_local_modules(layer_spec, config),
        mtp_block_spec=mtp_spec, vocab_size=padded_vocab_size(args, tp),
        max_sequence_length=args.max_position_embeddings, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def load(model, ckpt_dir) -> None:
    """Load a ``torch_dist`` directory into ``model``; a missing or unexpected key raises."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    request = {"model": model.sharded_state_dict(metadata=metadata)}  # generate_state_dict's nesting
    state = dist_checkpointing.load(request, str(ckpt_dir), strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(state["model"], strict=True)
    model.eval()


@contextlib.contextmanager
def main_model_only(model):
    """GPTModel runs its MTP layers whenever it has them, and then needs labels."""
    saved = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        yield
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved


def logits(model, ids_BS: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, S, Vp]`` of the main model, gathered over TP (PP=1 only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if not (ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()):
        raise NotImplementedError("logits() runs PP=1 only: no pipeline schedule here")
    B, S = ids_BS.shape
    pos_BS = torch.arange(S)[None].expand(B, -1)
    with torch.no_grad(), main_model_only(model):
        out_BSV = model(ids_BS, pos_BS, rt.causal_mask(S))
        return gather_from_tensor_model_parallel_region(out_BSV).float()
