"""The Transformer Engine naming, held to an explicit table read off megatron-core 0.16.1's
TE layer spec (``get_gpt_layer_with_transformer_engine_spec``): TE cannot be installed here,
so the names a TE-spec GPTModel has are kept in this test, not derived from our own code."""
import json

from mapping.entries import expand
from mapping.registry import family_for
from mapping.specs import target_name
from tools.make_tiny import cached_tiny

# Every parameter name of layer 0 (dense) and layer 1 (MoE) of a TE-spec model, by family.
TE_LAYER_NAMES = {
    "qwen2": {0: [
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]},
    "qwen3_moe": {0: [
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
        "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
        "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.router.weight",
        *[f"mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(8) for i in (1, 2)]]},
    "deepseek_v3": {
        0: ["input_layernorm.weight", "self_attention.linear_q_down_proj.weight",
            "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.linear_q_up_proj.weight",
            "self_attention.linear_kv_down_proj.weight",
            "self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.linear_kv_up_proj.weight",
            "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight",
            "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"],
        1: ["input_layernorm.weight", "self_attention.linear_q_down_proj.weight",
            "self_attention.linear_q_up_proj.layer_norm_weight", "self_attention.linear_q_up_proj.weight",
            "self_attention.linear_kv_down_proj.weight",
            "self_attention.linear_kv_up_proj.layer_norm_weight", "self_attention.linear_kv_up_proj.weight",
            "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight", "mlp.router.weight",
            "mlp.router.expert_bias", "mlp.shared_experts.linear_fc1.weight",
            "mlp.shared_experts.linear_fc2.weight",
            *[f"mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(8) for i in (1, 2)]]},
}


def te_names(family):
    cfg = json.loads((cached_tiny(family) / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    return {target_name(e.mcore, m, "te") for e in expand(family_for(cfg).rules(m), m)}


def test_te_names_match_the_te_spec_table():
    for family, layers in TE_LAYER_NAMES.items():
        names = te_names(family)
        for layer, expected in layers.items():
            prefix = f"decoder.layers.{layer}."
            got = sorted(n[len(prefix):] for n in names if n.startswith(prefix))
            assert got == sorted(expected), family
        assert {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"} <= names


def test_local_names_unchanged():
    cfg = json.loads((cached_tiny("qwen2") / "config.json").read_text())
    m = family_for(cfg).read_config(cfg)
    entries = expand(family_for(cfg).rules(m), m)
    assert all(target_name(e.mcore, m, "local") == e.mcore for e in entries)
