"""Qwen3-MoE: Qwen3 attention (q/k norm) with softmax top-k routed experts, no shared expert.

Layer L is MoE unless listed in ``mlp_only_layers`` or ``(L + 1) % decoder_sparse_step != 0``.
Routing: HF takes softmax over all experts, top-k, then renormalises when ``norm_topk_prob``
(transformers' default: false); MCore's top-k-then-softmax (``moe_router_pre_softmax=False``) is the
same function, and ``pre_softmax=True`` reproduces the un-normalised variant. Published configs say
``num_experts``, transformers 5 writes ``num_local_experts``: both are read and must agree.
"""
from mapping.config_fields import irrelevant, read_fields, spelling, translated
from mapping.families import common as c
from mapping.family import Family
from mapping.layout import moe_layer_freq
from mapping.rules import Rule

FIELDS = {
    **c.gqa_fields("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", kv_heads=4, head_dim=c.HEAD_DIM,
                   max_positions=32768),
    **c.sliding_fields(per_layer=False),
    "attention_bias": c.no_bias("qwen3_moe", "q/k/v/o_proj biases"),
    "num_experts": translated(),
    "num_local_experts": spelling("num_experts"),
    "num_experts_per_tok": translated(),
    "moe_intermediate_size": translated(),
    "decoder_sparse_step": translated(1),
    "mlp_only_layers": translated([], if_null=[]),
    "norm_topk_prob": translated(False),
    **irrelevant("output_router_logits", "router_aux_loss_coef"),  # training-time auxiliary loss only
}


def read_config(cfg: dict):
    get = read_fields(FIELDS, "qwen3_moe", cfg)
    n_layers = get("num_hidden_layers")
    step = get("decoder_sparse_step") or 1
    dense = set(get("mlp_only_layers"))
    moe_layers = tuple(L for L in range(n_layers) if L not in dense and (L + 1) % step == 0)
    moe = dict(num_moe_experts=get("num_experts"), moe_router_topk=get("num_experts_per_tok"),
               moe_ffn_hidden_size=get("moe_intermediate_size"),
               moe_layer_freq=moe_layer_freq(moe_layers, n_layers),
               moe_router_score_function="softmax",
               moe_router_pre_softmax=not get("norm_topk_prob"),
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
               moe_router_dtype="fp32", moe_grouped_gemm=False)
    return c.gqa_config(get, qk_norm=True, moe=moe, moe_layers=moe_layers)


def rules(m):
    moe = m.moe_layers
    dense = tuple(L for L in range(m.num_layers) if L not in moe)
    return [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qk_norm=True),
            *c.dense_mlp_rules(layers=dense),
            Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight", layers=moe),
            Rule(c.MC + "mlp.router.weight", c.HF + "mlp.gate.weight", layers=moe),
            *c.expert_rules(layers=moe)]


def write_config(m) -> dict:
    t = m.transformer
    return c.gqa_hf_config(m, "Qwen3MoeForCausalLM", "qwen3_moe", attention_bias=False,
                           num_experts=t["num_moe_experts"], num_experts_per_tok=t["moe_router_topk"],
                           moe_intermediate_size=t["moe_ffn_hidden_size"], decoder_sparse_step=1,
                           mlp_only_layers=[L for L in range(m.num_layers) if L not in m.moe_layers],
                           norm_topk_prob=not t["moe_router_pre_softmax"], **c.sliding_off(m, per_layer=False))


FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",),
                description="Qwen3-MoE: q/k norm, softmax top-k experts, `mlp_only_layers`, `decoder_sparse_step`", published=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"),
                read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS)
