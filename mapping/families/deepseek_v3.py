"""DeepSeek-V3 / R1: MLA attention, first-k dense layers, then MoE with sigmoid routing,
an fp32 expert-score correction bias (``noaux_tc``), group-limited routing and shared experts.

``q_lora_rank: null`` (Moonlight) swaps the q down/up pair for a single ``q_proj``: see
``moonlight.py``. HF's interleaved rope layout needs no weight permutation (MCore's MLA rope
de-interleaves internally). Multi-token-prediction layers are stored by DeepSeek at layer index
``num_hidden_layers + i`` (a full MLA + MoE decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, and copies of the embedding and head); MCore holds them as ``mtp.layers.i``
and shares the embedding and output layer with the main model.
"""
import torch

from mapping.families import common as c
from mapping.family import ConfigError, Family, ModelConfig, padded_vocab, rope_scaling, rope_theta
from mapping.layout import moe_layer_freq
from mapping.rules import Rule, Shapes

A = c.HF + "self_attn."
S = c.MC + "self_attention."


def _routing_note(cfg: dict) -> tuple[str, ...]:
    groups, topk_group, k = cfg.get("n_group") or 1, cfg.get("topk_group") or 1, cfg["num_experts_per_tok"]
    if groups > 1 and k // topk_group != 2:
        return (f"group-limited routing differs: Megatron-Core scores a group by its top "
                f"{k // topk_group} experts, DeepSeek by its top 2 (num_experts_per_tok={k}, "
                f"topk_group={topk_group}); the converted model routes differently",)
    return ()


def read_config(cfg: dict) -> ModelConfig:
    n_layers, k_dense = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace", 0)
    moe_layers = tuple(range(k_dense, n_layers))
    rope = {"rope_type": "rope"}
    scaling = rope_scaling(cfg)
    if scaling.get("rope_type") == "yarn":
        rope = dict(rope_type="yarn", rotary_scaling_factor=float(scaling["factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                    beta_fast=float(scaling.get("beta_fast", 32)), beta_slow=float(scaling.get("beta_slow", 1)),
                    mscale=float(scaling.get("mscale", 1.0)), mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)))
    elif scaling:
        raise ConfigError(f"rope scaling {scaling.get('rope_type')!r} unsupported for DeepSeek-V3 (none or yarn)")
    transformer = dict(
        num_layers=n_layers, hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=cfg["num_attention_heads"], q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"], qk_head_dim=cfg["qk_nope_head_dim"],
        qk_pos_emb_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
        qk_layernorm=True, multi_latent_attention=True, rotary_base=rope_theta(cfg), **rope,
        normalization="RMSNorm", layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=cfg["n_routed_experts"], moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=(cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"] or None,
        moe_layer_freq=moe_layer_freq(moe_layers, n_layers),
        moe_router_score_function=cfg.get("scoring_func", "sigmoid"),
        moe_router_enable_expert_bias=cfg.get("topk_method") == "noaux_tc",
        moe_router_num_groups=cfg.get("n_group"), moe_router_group_topk=cfg.get("topk_group"),
        moe_router_topk_scaling_factor=cfg.get("routed_scaling_factor"), moe_router_pre_softmax=True,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_grouped_gemm=False, mtp_num_layers=cfg.get("num_nextn_predict_layers") or None)
    vocab = cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        family="deepseek_v3", transformer=transformer, mla=True, num_layers=n_layers,
        num_experts=cfg["n_routed_experts"], moe_layers=moe_layers, vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope={},
        shapes=Shapes(num_query_groups=heads, heads_per_group=1, head_dim=cfg["v_head_dim"],
                      vocab_size=vocab, padded_vocab_size=padded_vocab(vocab)),
        hf_dtype=c.hf_dtype(cfg), notes=_routing_note(cfg))


def write_config(m: ModelConfig) -> dict:
    """config.json from the MCore side (the inverse of ``read_config``)."""
    t = m.transformer
    k_dense = min(m.moe_layers, default=m.num_layers)
    if m.moe_layers != tuple(range(k_dense, m.num_layers)):
        raise ConfigError(f"MoE layers {list(m.moe_layers)} are not 'first k dense, then MoE'; "
                         "DeepSeek-V3's config.json cannot express them")
    shared = t["moe_shared_expert_intermediate_size"] or 0
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"], num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_attention_heads"],
        q_lora_rank=t["q_lora_rank"], kv_lora_rank=t["kv_lora_rank"], qk_nope_head_dim=t["qk_head_dim"],
        qk_rope_head_dim=t["qk_pos_emb_head_dim"], v_head_dim=t["v_head_dim"],
        rms_norm_eps=t["layernorm_epsilon"], hidden_act="silu", attention_bias=False,
        rope_theta=t["rotary_base"], n_routed_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"], moe_intermediate_size=t["moe_ffn_hidden_size"],
        n_shared_experts=shared // t["moe_ffn_hidden_size"], first_k_dense_replace=k_dense, moe_layer_freq=1,
        scoring_func=t["moe_router_score_function"],
        topk_method="noaux_tc" if t["moe_router_enable_expert_bias"] else "greedy",
        n_group=t["moe_router_num_groups"], topk_group=t["moe_router_group_topk"],
        routed_scaling_factor=t["moe_router_topk_scaling_factor"], norm_topk_prob=True,
        num_nextn_predict_layers=t["mtp_num_layers"] or 0, vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_embeddings,
        torch_dtype=m.hf_dtype)
    if t["rope_type"] == "yarn":
        cfg["rope_scaling"] = dict(
            type="yarn", factor=t["rotary_scaling_factor"], beta_fast=t["beta_fast"], beta_slow=t["beta_slow"],
            original_max_position_embeddings=t["original_max_position_embeddings"], mscale=t["mscale"],
            mscale_all_dim=t["mscale_all_dim"])
    return cfg


def mla_rules(q_lora: bool) -> list[Rule]:
    q = ([Rule(S + "linear_q_down_proj.weight", A + "q_a_proj.weight", tp="column"),
          Rule(S + "q_layernorm.weight", A + "q_a_layernorm.weight"),
          Rule(S + "linear_q_up_proj.weight", A + "q_b_proj.weight", tp="column")]
         if q_lora else [Rule(S + "linear_q_proj.weight", A + "q_proj.weight", tp="column")])
    return [Rule(c.MC + "input_layernorm.weight", c.HF + "input_layernorm.weight"), *q,
            Rule(S + "linear_kv_down_proj.weight", A + "kv_a_proj_with_mqa.weight", tp="column"),
            Rule(S + "kv_layernorm.weight", A + "kv_a_layernorm.weight"),
            Rule(S + "linear_kv_up_proj.weight", A + "kv_b_proj.weight", tp="column"),
            Rule(S + "linear_proj.weight", A + "o_proj.weight", tp="row")]


def moe_rules(moe: tuple[int, ...], shared: bool) -> list[Rule]:
    rules = [Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight", layers=moe),
             Rule(c.MC + "mlp.router.weight", c.HF + "mlp.gate.weight", layers=moe),
             Rule(c.MC + "mlp.router.expert_bias", c.HF + "mlp.gate.e_score_correction_bias",
                  layers=moe, hf_dtype=torch.float32),
             *c.expert_rules(layers=moe)]
    if shared:
        rules += c.swiglu_rules(c.MC + "mlp.shared_experts.", c.HF + "mlp.shared_experts.", layers=moe)
    return rules


def layer_rules(m: ModelConfig) -> list[Rule]:
    dense = tuple(L for L in range(m.num_layers) if L not in m.moe_layers)
    return [*mla_rules(m.transformer["q_lora_rank"] is not None), *c.dense_mlp_rules(layers=dense),
            *moe_rules(m.moe_layers, bool(m.transformer["moe_shared_expert_intermediate_size"]))]


def mtp_rules(m: ModelConfig, i: int) -> list[Rule]:
    """MTP layer ``i``: an MLA + MoE decoder layer under ``mtp.layers.i.transformer_layer``."""
    hf, mc = f"model.layers.{m.num_layers + i}.", f"mtp.layers.{i}."
    layer = [*mla_rules(m.transformer["q_lora_rank"] is not None),
             *moe_rules(None, bool(m.transformer["moe_shared_expert_intermediate_size"]))]
    moved = [r.renamed(mcore=r.mcore.replace(c.MC, mc + "transformer_layer."),
                       hf=tuple(h.replace(c.HF, hf) for h in r.hf)) for r in layer]
    return [*moved,
            Rule(mc + "enorm.weight", hf + "enorm.weight"), Rule(mc + "hnorm.weight", hf + "hnorm.weight"),
            Rule(mc + "eh_proj.weight", hf + "eh_proj.weight", tp="column"),
            Rule(mc + "final_layernorm.weight", hf + "shared_head.norm.weight")]


def rules(m: ModelConfig) -> list[Rule]:
    mtp = m.transformer.get("mtp_num_layers") or 0
    if not mtp:
        return [*c.embedding_rules(m.tie_embeddings), *layer_rules(m)]
    if mtp != 1:
        raise ConfigError(f"num_nextn_predict_layers={mtp}: only one MTP layer (as published) is mapped")
    last = f"model.layers.{m.num_layers}."
    return [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight", last + "embed_tokens.weight"),
                 op="vocab_shared", tp="column"),
            Rule("decoder.final_layernorm.weight", "model.norm.weight"),
            Rule("output_layer.weight", ("lm_head.weight", last + "shared_head.head.weight"),
                 op="vocab_shared", tp="column"),
            *layer_rules(m), *mtp_rules(m, 0)]


FAMILY = Family(name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",),
                description="DeepSeek-V3/R1 (MLA, MoE, expert bias, FP8 input)",
                read_config=read_config, rules=rules, write_config=write_config,
                matches=lambda cfg: cfg.get("q_lora_rank") is not None)
