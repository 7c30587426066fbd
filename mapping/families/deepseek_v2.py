"""DeepSeek-V2 (DeepseekV2ForCausalLM): DeepSeek-V3's tensors (MLA with or without q-LoRA, first-k
dense, routed + shared experts; ``deepseek_v3.rules``) with softmax routing, no expert bias and no
MTP layer. DeepSeek-V2-Lite (greedy routing) converts; the 236B models (V2, V2.5, Coder-V2:
``group_limited_greedy``, top-6 in 3 of 8 groups) are refused, see below.

Routing (transformers' ``DeepseekV2TopkRouter`` = DeepSeek's code for ``norm_topk_prob: false``):
softmax over all experts, top-k (``greedy``) or top-k inside the ``topk_group`` best of ``n_group``
groups (``group_limited_greedy``), then times ``routed_scaling_factor`` with no renormalisation.
Megatron-Core: ``moe_router_pre_softmax=True`` (softmax, then top-k) and
``moe_router_topk_scaling_factor``, the same function. Group ranking is where they part: DeepSeek-V2
scores a group by its best expert, Megatron-Core 0.16.1 by the sum of its top
``num_experts_per_tok // topk_group`` (``moe_utils.group_limited_topk``); they agree only when that
quotient is 1 (or there is one group). The published DeepSeek-V2 (top-6 in 3 of 8 groups: 2) does
not, and is refused (``topk_method``) rather than converted into a model that routes differently.

``norm_topk_prob: true`` is refused too: transformers ignores it while DeepSeek's own code then
renormalises and drops ``routed_scaling_factor``, so there is no one model to convert to.
"""
from mapping import config_fields as cf
from mapping.config_fields import checked, irrelevant, must_be, read_fields, spelling, translated
from mapping.families import common as c
from mapping.families import deepseek_v3 as ds
from mapping.family import Family

ARCH = "DeepseekV2ForCausalLM"
V3_ONLY = ("rope_interleave", "num_nextn_predict_layers")  # keys deepseek_v3.write_config adds


def _groups_agree(get) -> bool:
    """group_limited_greedy as DeepSeek-V2 ranks groups (by the best expert) is Megatron-Core's ranking."""
    groups, topk_group, k = get("n_group"), get("topk_group"), get("num_experts_per_tok")
    return (isinstance(groups, int) and isinstance(topk_group, int) and 1 <= topk_group <= groups
            and get("n_routed_experts") % groups == 0 and (groups == 1 or k // topk_group == 1))


def _routing_supported(get) -> str:
    if get("topk_method") != "group_limited_greedy":
        return "greedy or group_limited_greedy (DeepSeek-V2's top-k methods; noaux_tc is DeepSeek-V3's)"
    k, topk_group = get("num_experts_per_tok"), get("topk_group")
    per_group = k // topk_group if isinstance(topk_group, int) and topk_group else "?"
    return (f"greedy, or group_limited_greedy with n_group 1 or num_experts_per_tok // topk_group == 1 "
            f"(DeepSeek-V2 ranks a group by its best expert, Megatron-Core 0.16.1 by the sum of its top "
            f"num_experts_per_tok // topk_group = {k} // {topk_group} = {per_group})")


FIELDS = {
    **cf.BASE, **cf.QUANTIZATION, **cf.identity("deepseek_v2", ARCH, ("deepseek_v2",)),
    **cf.rope_fields(ds.MLA_ROPE),
    "max_position_embeddings": translated(2048),
    "num_key_value_heads": checked(
        c.HEADS, lambda v, get: v == get("num_attention_heads"),
        lambda get: f"num_key_value_heads = num_attention_heads = {get('num_attention_heads')} (MLA)",
        "set num_key_value_heads to num_attention_heads", if_null=c.HEADS),
    "q_lora_rank": translated(1536),  # null: one q_proj (V2-Lite)
    "kv_lora_rank": translated(512),
    "qk_nope_head_dim": translated(128),
    "qk_rope_head_dim": translated(64),
    "v_head_dim": translated(128),
    "moe_intermediate_size": translated(1407),
    "n_routed_experts": translated(64),
    "num_experts": spelling("n_routed_experts"),  # DeepseekV2Config.attribute_map
    "num_experts_per_tok": translated(),
    "n_shared_experts": translated(
        2, ok=lambda v, get: isinstance(v, int) and v >= 1, supported="at least one shared expert (DeepseekV2Moe "
        "always has them)", fix="this model cannot be converted"),
    "first_k_dense_replace": translated(0),
    "routed_scaling_factor": translated(1.0),
    "topk_method": translated(
        "greedy", ok=lambda v, get: v == "greedy" or (v == "group_limited_greedy" and _groups_agree(get)),
        supported=_routing_supported,
        fix="this model cannot be converted exactly"),
    "n_group": translated(None),
    "topk_group": translated(None),
    "norm_topk_prob": checked(
        False, lambda v, get: not v or get("num_experts_per_tok") == 1,
        "norm_topk_prob false (transformers' DeepseekV2 ignores it; DeepSeek's code would renormalise the top-k and "
        "drop routed_scaling_factor)", "the two implementations disagree for this model; it cannot be converted"),
    "scoring_func": must_be("softmax", "DeepSeek-V2 routes with softmax scores only (transformers' DeepseekV2 "
                            "ignores scoring_func); this model is not a DeepSeek-V2"),
    "moe_layer_freq": must_be(1, "DeepSeek-V2's layer pattern here is first_k_dense_replace dense layers, then MoE "
                              "in every layer; this model cannot be converted"),
    "attention_bias": c.no_bias("deepseek_v2", "q_a/kv_a/o_proj biases"),
    "mlp_bias": c.no_bias("deepseek_v2", "MLP biases"),
    "pretraining_tp": must_be(1, "set it to 1: it only chose a sliced matmul in transformers 4 (same weights)"),
    **irrelevant("head_dim", "qk_head_dim",  # transformers 5 derives both from the qk head dims on load
                 "ep_size",  # experts per rank in DeepSeek's inference code; same function
                 "aux_loss_alpha", "seq_aux", "output_router_logits"),  # training-time auxiliary loss only
}


def read_config(cfg: dict):
    return ds.mla_config(read_fields(FIELDS, "deepseek_v2", cfg))


def write_config(m) -> dict:
    """config.json from the MCore side: DeepSeek-V3's without its V3-only keys."""
    cfg = {k: v for k, v in ds.write_config(m).items() if k not in V3_ONLY}
    return {**cfg, "architectures": [ARCH], "model_type": "deepseek_v2"}


FAMILY = Family(name="deepseek_v2", architectures=(ARCH,),
                description="DeepSeek-V2-Lite: MLA with or without q-LoRA, first-k dense, softmax routing times "
                            "`routed_scaling_factor`, shared experts; DeepSeek-V2's `group_limited_greedy` (top-6 in "
                            "3 of 8 groups) is refused: Megatron-Core ranks groups differently",
                published=("deepseek-ai/DeepSeek-V2-Lite",),
                read_config=read_config, rules=ds.rules, write_config=write_config, fields=FIELDS)
