"""Qwen2-MoE (Qwen2MoeForCausalLM; Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 attention (q/k/v
biases) with softmax top-k routed experts plus one shared expert behind its own sigmoid gate.

The MoE block is ``experts(x) + sigmoid(x @ shared_expert_gate^T) * shared_expert(x)``: Megatron-Core's
``SharedExpertMLP`` with ``moe_shared_expert_gate=True`` computes the same (its ``gate_weight`` [1, H]
is ``shared_expert_gate.weight``). Layer L is MoE unless listed in ``mlp_only_layers`` or
``(L + 1) % decoder_sparse_step != 0`` (dense layers use ``intermediate_size``). Routing as in
Qwen3-MoE: softmax over all experts, top-k, renormalised only with ``norm_topk_prob`` (false in both
published models: ``moe_router_pre_softmax=True``). ``qkv_bias`` is transformers 5's name for the
always-on biases; published configs do not carry it (true). A sliding window is refused unless no
layer uses it; transformers 5's default pattern for this class slides layers 0, 2, 4... below
``max_window_layers`` when ``use_sliding_window`` is set.
"""
from mapping.config_fields import checked, irrelevant, read_fields, translated
from mapping.families import common as c
from mapping.family import Family
from mapping.layout import moe_layer_freq
from mapping.rules import Rule

ARCH = "Qwen2MoeForCausalLM"
MLP = c.HF + "mlp."


def _window_layers(get) -> list[int]:
    """Layers Qwen2MoeConfig gives a sliding window (``layer_types``, else its default pattern)."""
    n, on = get("num_hidden_layers"), get("use_sliding_window")
    types = get("layer_types") or ["sliding_attention" if on and (i + 1) % 2 and i < (get("max_window_layers") or 0)
                                   else "full_attention" for i in range(n)]
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _full_attention(window, get) -> bool:
    window = window if get("use_sliding_window") else 0  # Qwen2MoeConfig zeroes an unused window
    return not _window_layers(get) or window is None or window >= get("max_position_embeddings")


def _count(v, get) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


FIELDS = {
    **c.gqa_fields("qwen2_moe", ARCH, "qwen2_moe", kv_heads=16, head_dim=c.HEAD_DIM, max_positions=32768),
    **c.sliding_fields(per_layer=True),
    "sliding_window": checked(
        4096, _full_attention,
        lambda get: f"full attention only, but layers {_window_layers(get)} of {get('num_hidden_layers')} get a window "
                    f"shorter than max_position_embeddings={get('max_position_embeddings')}",
        "Megatron-Core's attention here has no sliding window: convert only a model trained with full "
        "attention (then set use_sliding_window false and drop layer_types)"),
    "qkv_bias": translated(True, ok=lambda v, get: isinstance(v, bool), supported="true or false",
                           fix="set a boolean"),
    "num_experts": translated(60, ok=_count, supported="at least one expert",
                              fix="a Qwen2-MoE config without experts is a dense Qwen2: convert it as qwen2 (Qwen2ForCausalLM)"),
    "num_experts_per_tok": translated(4),
    "moe_intermediate_size": translated(1408),
    "shared_expert_intermediate_size": translated(
        5632, ok=_count, supported="a shared expert of at least one channel (Qwen2MoeSparseMoeBlock always has one)",
        fix="this model cannot be converted"),
    "decoder_sparse_step": translated(1, ok=_count, supported="a step of at least 1", fix="set decoder_sparse_step"),
    "mlp_only_layers": translated([], if_null=[]),
    "norm_topk_prob": translated(False),
    **irrelevant("output_router_logits", "router_aux_loss_coef"),  # training-time auxiliary loss only
}


def read_config(cfg: dict):
    get = read_fields(FIELDS, "qwen2_moe", cfg)
    n_layers, step, dense = get("num_hidden_layers"), get("decoder_sparse_step"), set(get("mlp_only_layers"))
    moe_layers = tuple(L for L in range(n_layers) if L not in dense and (L + 1) % step == 0)
    moe = dict(num_moe_experts=get("num_experts"), moe_router_topk=get("num_experts_per_tok"),
               moe_ffn_hidden_size=get("moe_intermediate_size"),
               moe_shared_expert_intermediate_size=get("shared_expert_intermediate_size"),
               moe_shared_expert_gate=True, moe_layer_freq=moe_layer_freq(moe_layers, n_layers),
               moe_router_score_function="softmax", moe_router_pre_softmax=not get("norm_topk_prob"),
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
               moe_grouped_gemm=False)
    return c.gqa_config(get, qkv_bias=get("qkv_bias"), moe=moe, moe_layers=moe_layers)


def rules(m):
    moe = m.moe_layers
    dense = tuple(L for L in range(m.num_layers) if L not in moe)
    return [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qkv_bias=m.transformer["add_qkv_bias"]),
            *c.dense_mlp_rules(layers=dense),
            Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight", layers=moe),
            Rule(c.MC + "mlp.router.weight", MLP + "gate.weight", layers=moe),
            *c.expert_rules(layers=moe),
            *c.swiglu_rules(c.MC + "mlp.shared_experts.", MLP + "shared_expert.", layers=moe),
            Rule(c.MC + "mlp.shared_experts.gate_weight", MLP + "shared_expert_gate.weight", layers=moe)]


def write_config(m) -> dict:
    t = m.transformer
    return c.gqa_hf_config(m, ARCH, "qwen2_moe", qkv_bias=t["add_qkv_bias"], num_experts=t["num_moe_experts"],
                           num_experts_per_tok=t["moe_router_topk"], moe_intermediate_size=t["moe_ffn_hidden_size"],
                           shared_expert_intermediate_size=t["moe_shared_expert_intermediate_size"],
                           decoder_sparse_step=1,
                           mlp_only_layers=[L for L in range(m.num_layers) if L not in m.moe_layers],
                           norm_topk_prob=not t["moe_router_pre_softmax"], **c.sliding_off(m, per_layer=True))


FAMILY = Family(name="qwen2_moe", architectures=(ARCH,),
                description="Qwen1.5-MoE / Qwen2-MoE: QKV bias, softmax top-k experts, a shared expert with a "
                            "sigmoid gate, `mlp_only_layers`, `decoder_sparse_step`",
                published=("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"),
                read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS)
