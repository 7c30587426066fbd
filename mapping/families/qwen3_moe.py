"""Qwen3-MoE: Qwen3 attention (q/k norm) with softmax top-k routed experts, no shared expert.

Layer L is MoE unless listed in ``mlp_only_layers`` or ``(L + 1) % decoder_sparse_step != 0``.
Routing: HF takes softmax over all experts, top-k, then renormalises when ``norm_topk_prob``;
MCore's top-k-then-softmax (``moe_router_pre_softmax=False``) is the same function, and
``pre_softmax=True`` reproduces the un-normalised variant.
"""
from mapping.families import common as c
from mapping.family import Family
from mapping.layout import moe_layer_freq
from mapping.rules import Rule


def read_config(cfg: dict):
    n_layers = cfg["num_hidden_layers"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # published vs transformers 5
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    moe_layers = tuple(L for L in range(n_layers) if L not in dense and (L + 1) % step == 0)
    moe = dict(num_moe_experts=experts, moe_router_topk=cfg["num_experts_per_tok"],
               moe_ffn_hidden_size=cfg["moe_intermediate_size"],
               moe_layer_freq=moe_layer_freq(moe_layers, n_layers),
               moe_router_score_function="softmax",
               moe_router_pre_softmax=not cfg.get("norm_topk_prob", True),
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
               moe_router_dtype="fp32", moe_grouped_gemm=False)
    return c.gqa_config("qwen3_moe", cfg, qk_norm=True, moe=moe, moe_layers=moe_layers)


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
                           norm_topk_prob=not t["moe_router_pre_softmax"])


FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",),
                description="Qwen3-MoE (q/k norm, softmax top-k experts)",
                read_config=read_config, rules=rules, write_config=write_config)
