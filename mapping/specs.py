"""Target namings: Megatron-Core's local spec (the rules' own names) and the Transformer Engine
spec, whose fused ``LayerNormLinear`` modules own the norm that precedes them.

Read off megatron-core 0.16.1's ``get_gpt_layer_with_transformer_engine_spec``:

* GQA attention: ``input_layernorm`` is fused into ``linear_qkv`` -> ``linear_qkv.layer_norm_weight``.
* MLA: ``input_layernorm`` stays a separate ``TENorm``; ``q_layernorm`` / ``kv_layernorm`` are fused
  into ``linear_q_up_proj`` / ``linear_kv_up_proj`` (``.layer_norm_weight``).
* dense MLP layers: ``pre_mlp_layernorm`` is fused into ``mlp.linear_fc1``; MoE layers keep a
  separate ``pre_mlp_layernorm`` (a ``TENorm``).

Everything else keeps its name. These are parameter names (the trainer's weight sync and the
planner use them); the checkpoint keys of the TE spec follow from them in
``convert/te_layout.py``.
"""
from __future__ import annotations

import re

from mapping.family import ModelConfig

SPECS = ("local", "te")
_LAYER = re.compile(r"^((?:decoder\.layers\.(\d+)|mtp\.layers\.\d+\.transformer_layer)\.)(.*)$")


def te_name(local: str, m: ModelConfig) -> str:
    """The TE-spec parameter name of a local-spec parameter name."""
    match = _LAYER.match(local)
    if not match:
        return local
    prefix, layer, rest = match.group(1), match.group(2), match.group(3)
    moe_layer = layer is None or int(layer) in m.moe_layers  # MTP layers are MoE layers
    if not m.mla and rest == "input_layernorm.weight":
        return prefix + "self_attention.linear_qkv.layer_norm_weight"
    if m.mla and rest == "self_attention.q_layernorm.weight":
        return prefix + "self_attention.linear_q_up_proj.layer_norm_weight"
    if m.mla and rest == "self_attention.kv_layernorm.weight":
        return prefix + "self_attention.linear_kv_up_proj.layer_norm_weight"
    if rest == "pre_mlp_layernorm.weight" and not moe_layer:
        return prefix + "mlp.linear_fc1.layer_norm_weight"
    return local


def target_name(local: str, m: ModelConfig, spec: str) -> str:
    if spec not in SPECS:
        raise ValueError(f"spec must be one of {SPECS}, got {spec!r}")
    return local if spec == "local" else te_name(local, m)
