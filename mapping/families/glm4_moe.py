"""GLM-4.5 / GLM-4.5-Air (Glm4MoeForCausalLM): GQA attention with q/k/v biases, an optional per-head
q/k RMSNorm and rope on part of each head; first-k dense layers, then MoE layers with DeepSeek-V3's
router (sigmoid scores, fp32 ``e_score_correction_bias``) and shared experts; one MTP layer.

Rope (transformers' ``Glm4MoeRotaryEmbedding`` / ``apply_rotary_pos_emb``): the first
``int(head_dim * partial_rotary_factor)`` channels of each q/k head rotate, NeoX layout (halves, not
interleaved pairs), frequencies ``theta^(-2i/rot_dim)``; the rest pass through. Megatron-Core's
``GPTModel(rotary_percent=f)`` builds the same frequencies over the same leading channels and rotates
them by halves (``rotary_interleaved`` off): the same function, no weight permutation. The factor
is read where transformers reads it (``rope_parameters.partial_rotary_factor``, else the top-level
key, default 0.5); the two spellings must agree.

Routing (transformers' ``Glm4MoeTopkRouter``): sigmoid scores, the bias added for the choice only,
``topk_group`` of ``n_group`` groups ranked by the sum of their top-2 biased scores, top-k, weights
the unbiased scores, renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``. Megatron-Core
0.16.1 (``moe_router_score_function="sigmoid"`` + ``moe_router_enable_expert_bias``) is the same
function when it ranks groups alike (one group, or ``num_experts_per_tok // topk_group == 2``) and
renormalises alike (it does exactly when it picks more than one expert); other values are refused.

Tensors: DeepSeek-V3's MoE names (``mlp.gate``, ``mlp.gate.e_score_correction_bias``,
``mlp.experts.E``, ``mlp.shared_experts``), Qwen-style attention (``q/k/v_proj`` with biases, no
``o_proj`` bias, ``q_norm``/``k_norm``). transformers does not build the MTP layer (it ignores
``model.layers.{N}.*``), but the published checkpoints store it the DeepSeek way, at index
``num_hidden_layers`` with its own ``embed_tokens`` and ``shared_head.head`` copies (vLLM PR
#27597), so ``deepseek_v3``'s MTP rules apply around a GLM decoder layer; ``hf2mcore --mtp auto``
converts copies saved by transformers (MTP declared, none stored) without it.
"""
import dataclasses
from typing import Mapping

from mapping import config_fields as cf
from mapping.config_fields import irrelevant, read_fields, spelling, translated
from mapping.families import common as c
from mapping.families import deepseek_v3 as ds
from mapping.family import ConfigError, Family
from mapping.layout import moe_layer_freq

ARCH = "Glm4MoeForCausalLM"
NESTED_ROPE = ("rope_parameters", "rope_scaling")  # where transformers 5 / older files keep rope keys
# plain rope only; a nested partial_rotary_factor is accepted here and read by _rotary_factor
_ROPE = cf.rope_meaning({"default": {"partial_rotary_factor": 0.5}})


def _rope(get) -> dict:
    """rope_theta / rope_scaling / rope_parameters without the rotary factor (its own field)."""
    meaning = dict(_ROPE(get))
    meaning.pop("partial_rotary_factor")
    return meaning


def _rotary_factor(get) -> float:
    """The factor transformers' Glm4Moe rotates by: the nested one, else the top-level key, else 0.5."""
    top = get.cfg.get("partial_rotary_factor")
    nested = [(k, d["partial_rotary_factor"]) for k in NESTED_ROPE
              if isinstance(d := get.cfg.get(k), Mapping) and d.get("partial_rotary_factor") is not None]
    if nested and top is not None and float(top) != float(nested[0][1]):
        raise ConfigError(f"config.json partial_rotary_factor={cf.show(top)} and {nested[0][0]}.partial_rotary_factor="
                          f"{cf.show(nested[0][1])} disagree (transformers rotates by the second); keep one of them")
    return float(nested[0][1] if nested else 0.5 if top is None else top)


def _rotary_ok(f, get) -> bool:
    rot = get("head_dim") * f
    return 0 < f <= 1 and rot == int(rot) and int(rot) % 2 == 0


def _count(v, get) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _groups_ok(topk_group, get) -> bool:
    """Megatron-Core ranks groups as transformers' Glm4Moe does (sum of the top-2 biased scores)."""
    groups, experts, k = get("n_group"), get("n_routed_experts"), get("num_experts_per_tok")
    if not (_count(groups, get) and _count(topk_group, get) and topk_group <= groups and experts % groups == 0):
        return False
    per_group = experts // groups
    return (groups == 1 or (per_group >= 2 and k // topk_group == 2)) and k <= topk_group * per_group


def _groups_supported(get) -> str:
    k, topk_group = get("num_experts_per_tok"), get("topk_group")
    quotient = k // topk_group if _count(topk_group, get) else "?"
    return (f"n_group 1, or n_group dividing n_routed_experts with num_experts_per_tok // topk_group == 2 "
            f"(transformers' Glm4Moe ranks a group by the sum of its top-2 scores, Megatron-Core 0.16.1 by the sum "
            f"of its top num_experts_per_tok // topk_group = {k} // {topk_group} = {quotient}; n_group="
            f"{get('n_group')}, n_routed_experts={get('n_routed_experts')})")


FIELDS = {
    **c.gqa_fields("glm4_moe", ARCH, "glm4_moe", kv_heads=8, head_dim=c.HEAD_DIM, max_positions=131072),
    **{name: translated(meaning=_rope) for name in ("rope_theta", "rope_scaling", "rope_parameters")},
    "partial_rotary_factor": translated(
        meaning=_rotary_factor, ok=_rotary_ok,
        supported=lambda get: f"a factor in (0, 1] rotating an even number of the head's {get('head_dim')} channels",
        fix="Megatron-Core's rotary_percent rotates int(head_dim * factor) channels in pairs; this model cannot "
            "be converted"),
    "rms_norm_eps": translated(1e-5),  # Glm4MoeConfig's default (the shared one is 1e-6)
    "attention_bias": translated(False, ok=lambda v, get: isinstance(v, bool), supported="true or false (q/k/v "
                                 "biases; o_proj never has one)", fix="set a boolean"),
    "use_qk_norm": translated(False, ok=lambda v, get: isinstance(v, bool), supported="true or false",
                              fix="set a boolean"),
    "n_routed_experts": translated(128, ok=_count, supported="at least one routed expert",
                                   fix="this model cannot be converted"),
    "num_local_experts": spelling("n_routed_experts"),  # Glm4MoeConfig.attribute_map
    "num_experts_per_tok": translated(
        8, ok=lambda v, get: _count(v, get) and v <= get("n_routed_experts"),
        supported=lambda get: f"1..n_routed_experts={get('n_routed_experts')} experts per token",
        fix="fix num_experts_per_tok"),
    "moe_intermediate_size": translated(1408),
    "n_shared_experts": translated(
        1, ok=_count, supported="at least one shared expert (Glm4MoeMoE always builds moe_intermediate_size * "
        "n_shared_experts)", fix="this model cannot be converted"),
    "first_k_dense_replace": translated(
        1, ok=lambda v, get: isinstance(v, int) and 0 <= v < get("num_hidden_layers"),
        supported=lambda get: f"0..num_hidden_layers-1 = {get('num_hidden_layers') - 1} dense layers before the "
                              "MoE layers", fix="a stack without MoE layers is not a Glm4Moe model"),
    "n_group": translated(1),
    "topk_group": translated(1, ok=_groups_ok, supported=_groups_supported,
                             fix="Megatron-Core would route differently; this model cannot be converted exactly"),
    "routed_scaling_factor": translated(1.0),
    "norm_topk_prob": cf.checked(
        True, lambda v, get: bool(v) == (get("num_experts_per_tok") > 1),
        lambda get: f"norm_topk_prob {'true' if get('num_experts_per_tok') > 1 else 'false'} with "
                    f"num_experts_per_tok={get('num_experts_per_tok')} (Megatron-Core renormalises the sigmoid "
                    "top-k exactly when it picks more than one expert)",
        "Megatron-Core cannot express this renormalisation; this model cannot be converted"),
    "num_nextn_predict_layers": translated(1, if_null=0),  # Glm4MoeConfig's num_mtp_layers default
    "num_mtp_layers": spelling("num_nextn_predict_layers"),
    **irrelevant("output_router_logits"),  # training-time auxiliary loss only
}


def read_config(cfg: dict):
    get = read_fields(FIELDS, "glm4_moe", cfg)
    n, k_dense, ffn = get("num_hidden_layers"), get("first_k_dense_replace"), get("moe_intermediate_size")
    moe_layers = tuple(range(k_dense, n))
    moe = dict(num_moe_experts=get("n_routed_experts"), moe_router_topk=get("num_experts_per_tok"),
               moe_ffn_hidden_size=ffn, moe_shared_expert_intermediate_size=get("n_shared_experts") * ffn,
               moe_layer_freq=moe_layer_freq(moe_layers, n),
               moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
               moe_router_num_groups=get("n_group"), moe_router_group_topk=get("topk_group"),
               moe_router_topk_scaling_factor=get("routed_scaling_factor"),
               moe_router_pre_softmax=True,  # no-op for sigmoid (as in the published Megatron-LM flags)
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
               moe_grouped_gemm=False, mtp_num_layers=get("num_nextn_predict_layers") or None)
    m = c.gqa_config(get, qkv_bias=get("attention_bias"), qk_norm=get("use_qk_norm"), moe=moe,
                     moe_layers=moe_layers)
    return dataclasses.replace(m, rope={**m.rope, "rotary_percent": get("partial_rotary_factor")})


def rules(m):
    t = m.transformer
    dense = tuple(L for L in range(m.num_layers) if L not in m.moe_layers)
    attention = c.gqa_attention_rules(qkv_bias=t["add_qkv_bias"], qk_norm=t["qk_layernorm"])
    layers = [*attention, *c.dense_mlp_rules(layers=dense), *ds.moe_rules(m.moe_layers, shared=True)]
    mtp_layer = [*attention, *ds.moe_rules(None, shared=True)]  # an MoE layer, like the last one
    return ds.rules_with_mtp(m, layers, lambda i: ds.mtp_layer_rules(m, i, mtp_layer))


def write_config(m) -> dict:
    t = m.transformer
    k_dense = min(m.moe_layers, default=m.num_layers)
    if m.moe_layers != tuple(range(k_dense, m.num_layers)) or k_dense == m.num_layers:
        raise ConfigError(f"MoE layers {list(m.moe_layers)} are not 'first k dense, then MoE'; "
                          "Glm4Moe's config.json cannot express them")
    if (t["moe_router_score_function"], t["moe_router_enable_expert_bias"]) != ("sigmoid", True):
        raise ConfigError(f"router {t['moe_router_score_function']} with expert bias "
                          f"{t['moe_router_enable_expert_bias']}: Glm4Moe routes with sigmoid scores and an "
                          "expert bias; its config.json cannot express this router")
    ffn = t["moe_ffn_hidden_size"]
    return c.gqa_hf_config(
        m, ARCH, "glm4_moe", attention_bias=t["add_qkv_bias"], use_qk_norm=t["qk_layernorm"],
        partial_rotary_factor=m.rope.get("rotary_percent", 1.0), n_routed_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"], moe_intermediate_size=ffn,
        n_shared_experts=t["moe_shared_expert_intermediate_size"] // ffn, first_k_dense_replace=k_dense,
        n_group=t["moe_router_num_groups"] or 1, topk_group=t["moe_router_group_topk"] or 1,
        routed_scaling_factor=t["moe_router_topk_scaling_factor"] or 1.0, norm_topk_prob=t["moe_router_topk"] > 1,
        num_nextn_predict_layers=t["mtp_num_layers"] or 0)


FAMILY = Family(name="glm4_moe", architectures=(ARCH,),
                description="GLM-4.5 / GLM-4.5-Air: partial rotary (`partial_rotary_factor` = MCore "
                            "`rotary_percent`), QKV bias, optional QK norm, first-k dense, sigmoid routing + expert "
                            "bias, shared expert, MTP layer",
                published=("zai-org/GLM-4.5", "zai-org/GLM-4.5-Air"),
                read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS)
