"""Rule and config builders shared by the family files (GQA attention, SwiGLU MLPs, experts), and
the config.json fields the GQA families share (Llama, Qwen2, Qwen3, Qwen3-MoE).

Each helper returns plain ``Rule`` / ``Field`` data; the family files compose them. Names on the
MCore side are the local-spec module names of megatron-core 0.16.1 (``GPTModel.state_dict()`` keys).
"""
from __future__ import annotations

import torch

from mapping import config_fields as cf
from mapping.config_fields import (REQUIRED, Derived, Field, Fixed, Reader, checked, irrelevant, must_be,
                                   translated)
from mapping.family import ModelConfig, padded_vocab
from mapping.layout import moe_layer_freq
from mapping.rules import Rule, Shapes

HF = "model.layers.{L}."
MC = "decoder.layers.{L}."
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' per-layer ``layer_types`` values


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


def hf_dtype(value) -> str:
    """``torch_dtype`` / ``dtype`` as a plain name ("bfloat16"); float32 when unset."""
    return str(value or "float32").replace("torch.", "")


# ---------------------------------------------------------------- GQA config.json fields

HEADS = Derived(lambda get: get("num_attention_heads"))
HEAD_DIM = Derived(lambda get: get("hidden_size") // get("num_attention_heads"))
LLAMA3_FIXED = {"low_freq_factor": Fixed(1.0, True), "high_freq_factor": Fixed(4.0, True),
                "original_max_position_embeddings": Fixed(8192, True)}  # RotaryEmbedding._apply_scaling
GQA_ROPE = {"default": {}, "llama3": {"factor": REQUIRED, **LLAMA3_FIXED}}


def gqa_fields(family: str, architecture: str, model_type: str, *, kv_heads, head_dim, max_positions: int) -> dict:
    """The fields every GQA family shares; defaults are the transformers class's."""
    return {**cf.BASE, **cf.QUANTIZATION, **cf.identity(family, architecture, (model_type,)),
            **cf.rope_fields(GQA_ROPE),
            "num_key_value_heads": translated(kv_heads, if_null=HEADS),
            "head_dim": translated(head_dim, if_null=HEAD_DIM),
            "max_position_embeddings": translated(max_positions)}


def no_bias(family: str, what: str) -> Field:
    return must_be(False, f"{family}'s rules map no {what}; this model cannot be converted")


def window_layers(get) -> list[int]:
    """Layers transformers 5 runs with a sliding window. Qwen2/Qwen3: the window is on only with
    ``use_sliding_window``, on the layers ``layer_types`` marks (default: index >= ``max_window_layers``);
    Qwen3-MoE (no ``layer_types`` field): on every layer."""
    if not get("use_sliding_window") or get("sliding_window") is None:
        return []
    n = get("num_hidden_layers")
    if "layer_types" not in get.fields:
        return list(range(n))
    first = get("max_window_layers") or 0
    types = get("layer_types") or [SLIDING if i >= first else FULL for i in range(n)]
    return [i for i, t in enumerate(types) if t == SLIDING]


def layer_types_ok(v, get) -> bool:
    """``layer_types``: one of sliding/full attention per layer."""
    return isinstance(v, list) and len(v) == get("num_hidden_layers") and set(v) <= {SLIDING, FULL}


def window_ok(v, get) -> bool:
    """``sliding_window`` of a family that windows the layers ``layer_types`` marks sliding: at least
    one token, null only when no layer slides."""
    if v is None:
        return SLIDING not in get("layer_types")
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def positive(v, get) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def layer_types(t: dict, n: int) -> list[str]:
    """transformers' ``layer_types`` of ``n`` layers from MCore's ``window_size`` and
    ``window_attn_skip_freq`` in the TransformerConfig kwargs ``t`` (int N: layer L, 1-based, slides
    unless L % N == 0; a list: 1 = slides; None: every layer slides)."""
    freq = t.get("window_attn_skip_freq")
    if not t.get("window_size"):
        return [FULL] * n
    if freq is None:
        return [SLIDING] * n
    if isinstance(freq, int):
        return [SLIDING if (L + 1) % freq else FULL for L in range(n)]
    return [SLIDING if x else FULL for x in freq]


def softmax_moe(get) -> dict:
    """MoE settings of a family whose every layer is MoE with softmax over the top-k router logits and
    no aux loss at inference (Mixtral, gpt-oss): MCore's top-k-then-softmax, fp32 router, per-expert GEMMs."""
    n = get("num_hidden_layers")
    return dict(num_moe_experts=get("num_local_experts"), moe_router_topk=get("num_experts_per_tok"),
                moe_ffn_hidden_size=get("intermediate_size"), moe_layer_freq=moe_layer_freq(range(n), n),
                moe_router_score_function="softmax", moe_router_pre_softmax=False,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
                moe_grouped_gemm=False)


def _full_attention(window, get) -> bool:
    return not window_layers(get) or window >= get("max_position_embeddings")


def _window_supported(get) -> str:
    layers = window_layers(get)
    return (f"full attention only, but use_sliding_window=true gives layers {layers[0]}..{layers[-1]} of "
            f"{get('num_hidden_layers')} (max_window_layers={get('max_window_layers')} or layer_types) a window "
            f"shorter than max_position_embeddings={get('max_position_embeddings')}") if "layer_types" in get.fields \
        else (f"full attention only, but use_sliding_window=true gives every layer a window shorter than "
              f"max_position_embeddings={get('max_position_embeddings')}")


def sliding_fields(per_layer: bool) -> dict:
    """Qwen's sliding-window fields: any combination that leaves every layer full attention."""
    fields = {"use_sliding_window": checked(False, lambda v, get: isinstance(v, bool), "true or false",
                                            "set a boolean")}
    if per_layer:
        fields["max_window_layers"] = checked(28, lambda v, get: v is None or isinstance(v, int),
                                              "a layer count", "set an integer")
        fields["layer_types"] = checked(
            None, lambda v, get: v is None or (len(v) == get("num_hidden_layers")
                                               and set(v) <= {"full_attention", "sliding_attention"}),
            "one of full_attention, sliding_attention per layer", "fix layer_types or drop it")
    else:  # transformers 5's Qwen3-MoE slides every layer; the check below refuses any effective window
        fields.update(irrelevant("max_window_layers"))
    fields["sliding_window"] = checked(
        4096, _full_attention, _window_supported,
        "Megatron-Core's attention here has no sliding window: convert only a model trained with full "
        "attention (then set use_sliding_window false)")
    return fields


def sliding_off(m: ModelConfig, per_layer: bool) -> dict:
    """What ``write_config`` writes for the sliding-window fields: full attention everywhere."""
    return dict(use_sliding_window=False, sliding_window=None,
                **({"max_window_layers": m.num_layers} if per_layer else {}))


# ---------------------------------------------------------------- GQA translation

def gqa_config(get: Reader, *, qkv_bias: bool = False, qk_norm: bool = False, moe: dict | None = None,
               moe_layers: tuple = ()) -> ModelConfig:
    """Dense / MoE GQA families (Llama, Qwen2, Qwen3, Qwen3-MoE) from their checked fields."""
    heads, hidden, n_layers = get("num_attention_heads"), get("hidden_size"), get("num_hidden_layers")
    groups = get("num_key_value_heads")
    head_dim = get("head_dim") or hidden // heads
    transformer = dict(
        num_layers=n_layers, hidden_size=hidden, ffn_hidden_size=get("intermediate_size"),
        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim, normalization="RMSNorm",
        layernorm_epsilon=get("rms_norm_eps"), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=qkv_bias,
        qk_layernorm=qk_norm, hidden_dropout=0.0, attention_dropout=0.0,
        **(moe or {}))
    rope_hf = get("rope_parameters")
    rope = {"rotary_base": rope_hf["rope_theta"]}
    if rope_hf["rope_type"] == "llama3":
        rope.update(rope_scaling=True, rope_scaling_factor=rope_hf["factor"])
    vocab = get("vocab_size")
    return ModelConfig(
        family=get.family, transformer=transformer, mla=False, num_layers=n_layers,
        num_experts=(moe or {}).get("num_moe_experts", 0) or 0, moe_layers=tuple(moe_layers),
        vocab_size=vocab, padded_vocab_size=padded_vocab(vocab),
        max_position_embeddings=get("max_position_embeddings"),
        tie_embeddings=bool(get("tie_word_embeddings")), rope=rope,
        shapes=Shapes(num_query_groups=groups, heads_per_group=heads // groups, head_dim=head_dim,
                      vocab_size=vocab, padded_vocab_size=padded_vocab(vocab)),
        hf_dtype=hf_dtype(get("torch_dtype")), notes=get.notes)


def gqa_hf_config(m: ModelConfig, architecture: str, model_type: str, **extra) -> dict:
    """config.json of a GQA family from its MCore side (the inverse of ``gqa_config``)."""
    t = m.transformer
    cfg = dict(
        architectures=[architecture], model_type=model_type, vocab_size=m.vocab_size,
        hidden_size=t["hidden_size"], intermediate_size=t["ffn_hidden_size"], num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_query_groups"],
        head_dim=t["kv_channels"], hidden_act="silu", rms_norm_eps=t["layernorm_epsilon"],
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope["rotary_base"], rope_scaling=None,
        tie_word_embeddings=m.tie_embeddings, torch_dtype=m.hf_dtype, **extra)
    if m.rope.get("rope_scaling"):
        cfg["rope_scaling"] = dict(rope_type="llama3", factor=m.rope["rope_scaling_factor"],
                                   **{k: f.value for k, f in LLAMA3_FIXED.items()})
    return cfg
