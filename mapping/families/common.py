"""Rule and config builders shared by the family files (GQA attention, SwiGLU MLPs, experts).

Each helper returns plain ``Rule`` data; the family files compose them. Names on the MCore side
are the local-spec module names of megatron-core 0.16.1 (``GPTModel.state_dict()`` keys).
"""
from __future__ import annotations

import torch

from mapping.family import ConfigError, ModelConfig, padded_vocab, rope_scaling, rope_theta
from mapping.rules import Rule, Shapes

HF = "model.layers.{L}."
MC = "decoder.layers.{L}."


def embedding_rules(tied: bool) -> list[Rule]:
    rules = [Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", op="vocab", tp="column"),
             Rule("decoder.final_layernorm.weight", "model.norm.weight")]
    if not tied:
        rules.append(Rule("output_layer.weight", "lm_head.weight", op="vocab", tp="column"))
    return rules


def gqa_attention_rules(qkv_bias: bool = False, qk_norm: bool = False) -> list[Rule]:
    a = HF + "self_attn."
    rules = [
        Rule(MC + "input_layernorm.weight", HF + "input_layernorm.weight"),
        Rule(MC + "self_attention.linear_qkv.weight",
             (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), op="qkv", tp="column"),
        Rule(MC + "self_attention.linear_proj.weight", a + "o_proj.weight", tp="row"),
    ]
    if qkv_bias:
        rules.append(Rule(MC + "self_attention.linear_qkv.bias",
                          (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), op="qkv", tp="column"))
    if qk_norm:
        rules += [Rule(MC + "self_attention.q_layernorm.weight", a + "q_norm.weight"),
                  Rule(MC + "self_attention.k_layernorm.weight", a + "k_norm.weight")]
    return rules


def swiglu_rules(mcore_prefix: str, hf_prefix: str, layers=None, expert: bool = False) -> list[Rule]:
    """``{mcore_prefix}linear_fc1/fc2`` <- ``{hf_prefix}gate_proj/up_proj/down_proj``."""
    return [
        Rule(mcore_prefix + "linear_fc1.weight",
             (hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight"),
             op="gate_up", tp="column", expert=expert, layers=layers),
        Rule(mcore_prefix + "linear_fc2.weight", hf_prefix + "down_proj.weight",
             tp="row", expert=expert, layers=layers),
    ]


def dense_mlp_rules(layers=None) -> list[Rule]:
    return [Rule(MC + "pre_mlp_layernorm.weight", HF + "post_attention_layernorm.weight", layers=layers),
            *swiglu_rules(MC + "mlp.", HF + "mlp.", layers=layers)]


def expert_rules(hf_experts: str = "mlp.experts.{E}.", layers=None) -> list[Rule]:
    """Routed experts, one rule row per expert (generated for ``{E}``), EP-partitioned."""
    return swiglu_rules(MC + "mlp.experts.local_experts.{E}.", HF + hf_experts, layers=layers, expert=True)


def hf_dtype(cfg: dict) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")


def gqa_config(family: str, cfg: dict, *, qkv_bias: bool = False, qk_norm: bool = False,
               moe: dict | None = None, moe_layers: tuple = ()) -> ModelConfig:
    """Dense / MoE GQA families (Llama, Qwen2, Qwen3, Qwen3-MoE)."""
    heads = cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    transformer = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, normalization="RMSNorm",
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        **(moe or {}))
    notes = []
    rope = {"rotary_base": rope_theta(cfg)}
    scaling = rope_scaling(cfg)
    if scaling.get("rope_type") == "llama3":
        rope.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        diff = {k: scaling.get(k) for k, v in fixed.items() if k in scaling and float(scaling[k]) != v}
        if diff:
            notes.append(f"llama3 rope scaling {diff} differs from Megatron-Core's fixed {fixed}")
    elif scaling:
        raise ConfigError(f"rope scaling {scaling.get('rope_type')!r} is not supported for {family}; "
                         "supported: none, llama3")
    vocab = cfg["vocab_size"]
    return ModelConfig(
        family=family, transformer=transformer, mla=False, num_layers=cfg["num_hidden_layers"],
        num_experts=(moe or {}).get("num_moe_experts", 0) or 0, moe_layers=tuple(moe_layers),
        vocab_size=vocab, padded_vocab_size=padded_vocab(vocab),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope=rope,
        shapes=Shapes(num_query_groups=groups, heads_per_group=heads // groups, head_dim=head_dim,
                      vocab_size=vocab, padded_vocab_size=padded_vocab(vocab)),
        hf_dtype=hf_dtype(cfg), notes=tuple(notes))


def gqa_hf_config(m: ModelConfig, architecture: str, model_type: str, **extra) -> dict:
    """config.json of a GQA family from its MCore side (the inverse of ``gqa_config``)."""
    t = m.transformer
    cfg = dict(
        architectures=[architecture], model_type=model_type, hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"], num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_query_groups"],
        head_dim=t["kv_channels"], rms_norm_eps=t["layernorm_epsilon"], hidden_act="silu",
        vocab_size=m.vocab_size, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_embeddings, rope_theta=m.rope["rotary_base"], torch_dtype=m.hf_dtype,
        **extra)
    if m.rope.get("rope_scaling"):
        cfg["rope_scaling"] = dict(rope_type="llama3", factor=m.rope["rope_scaling_factor"], low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    return cfg
