"""What Megatron-LM's ``--load`` reads besides the tensors: ``common.pt`` and the model's arguments.

Megatron-LM's training loop saves, next to the sharded tensors, a ``common.pt`` holding
``args`` (the ``argparse.Namespace`` of the run), ``checkpoint_version`` (3.0),
``iteration`` and ``content_metadata`` (the sharded-state-dict flags the layout was written
under). On ``--load`` it reads ``iteration``, checks ``args.num_layers``, ``hidden_size`` and
``num_attention_heads`` against its own, rebuilds the model from ``args`` under
``--use-checkpoint-args``, and passes ``content_metadata`` back to ``sharded_state_dict``.
An empty ``common.pt`` makes it fall back to its own flags and warn.

``megatron_args`` derives those arguments from a family's ``ModelConfig`` with no per-family
code: Megatron-LM's ``core_transformer_config_from_args`` copies every argument whose name is a
``TransformerConfig`` field, so the translated config's fields are stored under their own names;
only the handful Megatron-LM spells differently (``num_experts``, ``norm_epsilon``, ``swiglu``,
rope and vocab arguments of ``GPTModel``) are renamed. ``flag_lines`` writes the same arguments
as the command-line flags a user passes to ``pretrain_gpt.py``.

Leaves out: optimizer, scheduler and RNG state (a converted checkpoint is a ``release``: Megatron-LM
starts those fresh), tokenizer paths (the user's), batch and sequence settings.
"""
from __future__ import annotations

import argparse
import json

import torch

from mapping.family import MAKE_VOCAB_SIZE_DIVISIBLE_BY, ModelConfig
from mapping.layout import CONTENT_METADATA

CHECKPOINT_VERSION = 3.0
# TransformerConfig field -> Megatron-LM argument name, where they differ.
RENAMED = {"num_moe_experts": "num_experts", "layernorm_epsilon": "norm_epsilon"}
# Fields that are not plain values (functions) or are derived below.
DERIVED = {"activation_func", "gated_linear_unit"}
# GPTModel rope settings (``ModelConfig.rope``) -> Megatron-LM argument, where they differ: a non-MLA
# YaRN's ``yarn_*`` config attributes (Megatron-LM's ``_apply_yarn_config_from_args``).
YARN_RENAMED = {"yarn_rotary_scaling_factor": "rotary_scaling_factor", "yarn_mscale": "mscale",
                "yarn_mscale_all_dim": "mscale_all_dim"}


def megatron_args(m: ModelConfig, dtype: torch.dtype) -> argparse.Namespace:
    """The ``args`` Megatron-LM would have saved for this model at TP=PP=EP=1."""
    t = m.transformer
    args = {RENAMED.get(k, k): v for k, v in t.items() if k not in DERIVED}
    swiglu = bool(t.get("gated_linear_unit")) and t.get("activation_func") is torch.nn.functional.silu
    quick_geglu = bool(t.get("gated_linear_unit")) and getattr(t.get("activation_func"), "__name__", "") == "quick_gelu"
    heads, groups = t["num_attention_heads"], t.get("num_query_groups")
    rope = m.rope or {}
    args.update(
        swiglu=swiglu, quick_geglu=quick_geglu, squared_relu=False,
        group_query_attention=bool(groups) and groups != heads,
        padded_vocab_size=m.padded_vocab_size, make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        max_position_embeddings=m.max_position_embeddings,
        untie_embeddings_and_output_weights=not m.tie_embeddings,
        position_embedding_type=rope.get("position_embedding_type", "rope"), add_position_embedding=False,
        use_rotary_position_embeddings=True,
        rotary_percent=rope.get("rotary_percent", 1.0), rotary_interleaved=False, apply_layernorm_1p=False,
        use_rope_scaling=bool(rope.get("rope_scaling")), rope_scaling_factor=rope.get("rope_scaling_factor", 8.0),
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        ckpt_format="torch_dist", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        consumed_train_samples=0, consumed_valid_samples=0)
    if "rotary_base" in rope:
        args["rotary_base"] = rope["rotary_base"]
    args.update({YARN_RENAMED.get(k, k): v for k, v in rope.items() if k.startswith("yarn_")})
    return argparse.Namespace(**dict(sorted(args.items())))


def common_state(m: ModelConfig, dtype: torch.dtype) -> dict:
    """``common.pt`` of a converted (``release``) checkpoint, as Megatron-LM's save writes it."""
    return {"args": megatron_args(m, dtype), "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
            "content_metadata": dict(CONTENT_METADATA)}


# MLATransformerConfig fields Megatron-LM has no flag for (its --yarn-* flags are for non-MLA
# models), with MCore's defaults: a model that needs other values is built from a config, not flags.
MLA_YARN_FIXED = {"beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}


def _num(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def flag_lines(args: argparse.Namespace) -> list[str]:
    """``pretrain_gpt.py`` model flags for these arguments (architecture and sizes only), plus
    ``#`` lines for what flags cannot say."""
    a = vars(args)
    lines = [f"--{k.replace('_', '-')} {_num(a[k])}" for k in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
        "max_position_embeddings", "padded_vocab_size", "normalization", "norm_epsilon") if a.get(k) is not None]
    if a.get("group_query_attention"):
        lines += ["--group-query-attention", f"--num-query-groups {a['num_query_groups']}"]
    lines += [f"--{k.replace('_', '-')}" for k in ("swiglu", "quick_geglu", "qk_layernorm", "add_qkv_bias",
                                                   "untie_embeddings_and_output_weights",
                                                   "multi_latent_attention") if a.get(k)]
    if not a.get("add_bias_linear"):
        lines.append("--disable-bias-linear")
    lines += [f"--position-embedding-type {a.get('position_embedding_type', 'rope')}",
              f"--rotary-base {_num(a['rotary_base'])}"] if "rotary_base" in a else []
    lines += _yarn_and_attention_lines(a)
    if a.get("rotary_percent", 1.0) != 1.0:  # rope on the leading channels of each head only (GLM-4.5)
        lines.append(f"--rotary-percent {_num(a['rotary_percent'])}")
    if a.get("use_rope_scaling"):
        lines += ["--use-rope-scaling", f"--rope-scaling-factor {_num(a['rope_scaling_factor'])}"]
    for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
              "rotary_scaling_factor", "mscale", "mscale_all_dim", "num_experts", "moe_ffn_hidden_size",
              "moe_router_topk", "moe_router_score_function", "moe_router_num_groups", "moe_router_group_topk",
              "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size", "moe_router_dtype",
              "mtp_num_layers"):
        if a.get(k) is not None and (a.get("multi_latent_attention") or k not in _MLA_ONLY):
            lines.append(f"--{k.replace('_', '-')} {_num(a[k])}")
    if a.get("num_experts"):
        freq = a.get("moe_layer_freq", 1)
        lines.append(f"--moe-layer-freq {freq if isinstance(freq, int) else _freq_expr(freq)}")
        lines += [f"--{k.replace('_', '-')}" for k in ("moe_router_pre_softmax", "moe_router_enable_expert_bias",
                                                       "moe_shared_expert_gate") if a.get(k)]
    if a.get("multi_latent_attention") and a.get("rope_type") == "yarn":
        fixed = {k: a[k] for k, v in MLA_YARN_FIXED.items() if k in a and a[k] != v}
        if fixed:
            lines += [f"# MLA yarn {', '.join(fixed)}: no Megatron-LM flag sets them (MCore's defaults "
                      f"differ, so the rope would); set them on the MLATransformerConfig as Megatron-Bridge does:",
                      OVERRIDES_PREFIX + json.dumps(fixed)]
    return lines


def _yarn_and_attention_lines(a: dict) -> list[str]:
    """Non-MLA YaRN, the GLU offset and clamp, attention sinks and a sliding window (gpt-oss)."""
    lines = []
    if a.get("position_embedding_type") == "yarn" and not a.get("multi_latent_attention"):
        lines += [f"--{k.replace('_', '-')} {_num(a[k])}" for k in (
            "rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
            "mscale", "mscale_all_dim") if a.get(k) is not None]
        if a.get("yarn_correction_range_round_to_int") is False:
            lines.append("--no-yarn-correction-range-round-to-int")
    if a.get("glu_linear_offset"):
        lines.append(f"--glu-linear-offset {_num(a['glu_linear_offset'])}")
    if a.get("activation_func_clamp_value") is not None:
        lines.append(f"--activation-func-clamp-value {_num(a['activation_func_clamp_value'])}")
    if a.get("softmax_type", "vanilla") != "vanilla":
        lines.append(f"--softmax-type {a['softmax_type']}")
    if a.get("window_size"):
        lines.append(f"--window-size {','.join(str(w) for w in a['window_size'])}")
        freq = a.get("window_attn_skip_freq")
        if freq is not None:
            lines.append(f"--window-attn-skip-freq {freq if isinstance(freq, int) else _freq_expr(freq)}")
    if a.get("num_experts") and a.get("add_bias_linear"):
        lines.append("# experts with biases: Megatron-Core needs --expert-tensor-parallel-size 1 whenever "
                     "--tensor-model-parallel-size > 1")
    return lines


OVERRIDES_PREFIX = "# config-overrides: "


def config_overrides(text: str) -> dict:
    """The ``# config-overrides: {...}`` line of a flags file (``{}`` when there is none)."""
    rows = [ln[len(OVERRIDES_PREFIX):] for ln in text.splitlines() if ln.startswith(OVERRIDES_PREFIX)]
    return json.loads(rows[0]) if rows else {}


_MLA_ONLY = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
             "rotary_scaling_factor", "mscale", "mscale_all_dim"}


def _freq_expr(freq: list) -> str:
    """``[0]*3+[1]*58`` for a per-layer list (Megatron-LM evaluates the expression)."""
    runs: list[list[int]] = []
    for x in freq:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    return "+".join(f"[{x}]*{n}" for x, n in runs)
