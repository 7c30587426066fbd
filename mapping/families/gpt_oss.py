"""gpt-oss (GptOssForCausalLM; openai/gpt-oss-20b, gpt-oss-120b): GQA attention with q/k/v/o
biases and per-head attention sinks, sliding-window layers alternating with full ones, YaRN rope,
and in every layer a softmax top-k router (with a bias) over experts with biases and a clamped
SwiGLU. transformers 5.19's ``modeling_gpt_oss.py`` is the truth; how each piece lands in
Megatron-Core 0.16.1:

* sinks: ``self_attn.sinks`` [heads] = ``core_attention.softmax_offset`` with
  ``softmax_type="learnable"`` (an extra logit per head in every softmax row; TP splits it by heads);
* window: transformers' ``sliding_window`` W covers W keys including the token itself, MCore's
  ``window_size=(W-1, 0)``; ``layer_types`` becomes ``window_attn_skip_freq`` (2 for the published
  alternation sliding, full, ...: MCore slides layer L+1 when (L+1) % 2 != 0; else the 0/1 list);
  on CPU both run in ``runtime.modules.SDPACoreAttention`` (MCore's mask is built on "cuda");
* biases: the router bias exists in MCore only with ``add_bias_linear=True``, which also gives
  ``linear_qkv``, ``linear_proj`` and the experts' ``linear_fc1``/``linear_fc2`` biases: all real
  in gpt-oss, so ``attention_bias: false`` is refused (the router and expert biases would stay);
* experts: ``mlp.experts.gate_up_proj`` [E, H, 2I] stacks all experts with gate and up
  interleaved along the last axis (columns 0, 2, ... gate; 1, 3, ... up), ``down_proj`` [E, I, H],
  ``gate_up_proj_bias`` [E, 2I] (interleaved), ``down_proj_bias`` [E, H]. Each MCore expert tensor is
  expert E's slice (``[{E}]``, ``mapping.rules.EXPERT_SLICE``) through the transforms below;
* activation: ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate clamped above and up both ways
  at ``swiglu_limit``: MCore's GLU with ``glu_linear_offset=1``, ``activation_func_clamp_value``
  and ``quick_gelu``, whose gain is fixed at 1.702: another ``swiglu_alpha`` is refused;
* routing: logits = x W^T + b, top-k, softmax over the k: ``moe_router_pre_softmax=False``;
* rope: YaRN for a non-MLA model, ``GPTModel(position_embedding_type="yarn")`` reading
  ``yarn_*`` attributes off the config (carried in ``ModelConfig.rope``; ``truncate`` ->
  ``yarn_correction_range_round_to_int``); the attention factor is transformers' default from
  ``factor`` (0.1 ln(factor) + 1): ``attention_factor``/``mscale`` keys are refused;
* MXFP4: the published experts are ``*_blocks``/``*_scales``; ``convert.formats.hf_checkpoint``
  presents each pair as the bf16 tensor transformers dequantises it to, so the rules see only
  ``gate_up_proj``/``down_proj``. ``mcore2hf`` writes bf16 (no MXFP4 export).

Left out: expert tensor parallelism with biases (MCore asserts ``expert_tensor_parallel_size == 1``
when experts have biases: at TP > 1 run ETP 1, as Megatron-LM's own gpt-oss test does).
"""
import dataclasses

import torch

from mapping import config_fields as cf
from mapping.config_fields import (REQUIRED, Derived, Fixed, checked, irrelevant, must_be, read_fields, show,
                                   spelling, translated)
from mapping.families import common as c
from mapping.family import Family
from mapping.rules import EXPERT_SLICE, OPS, Op, Rule, register_op

ARCH = "GptOssForCausalLM"
SLIDING, FULL = c.SLIDING, c.FULL
QUICK_GELU_ALPHA = 1.702  # megatron.core.fusions.fused_bias_geglu.quick_gelu hard-codes it
MXFP4_PUBLISHED = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                              "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}
DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}  # GptOssConfig's rope when config.json has none


# --------------------------------------------------------------------------- transforms (one expert)
def _gate_up_to_mcore(ts, shapes):
    (x_H2I,) = ts  # columns 0, 2, 4, ... gate; 1, 3, 5, ... up
    return torch.cat([x_H2I[:, 0::2].t(), x_H2I[:, 1::2].t()], dim=0).contiguous()  # [2I, H] = [gate; up]


def _gate_up_to_hf(t_2IH, shapes):
    gate_IH, up_IH = t_2IH.chunk(2, dim=0)
    return [torch.stack([gate_IH.t(), up_IH.t()], dim=-1).reshape(gate_IH.shape[1], -1).contiguous()]


def _bias_to_mcore(ts, shapes):
    (b_2I,) = ts
    return torch.cat([b_2I[0::2], b_2I[1::2]]).contiguous()


def _bias_to_hf(t_2I, shapes):
    gate_I, up_I = t_2I.chunk(2)
    return [torch.stack([gate_I, up_I], dim=-1).reshape(-1).contiguous()]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``: Megatron-LM's ``--quick-geglu`` activation (MCore's ``quick_gelu``),
    here without its ``torch.compile`` (fused activations are off on this path)."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


# At run time TP rank r holds [gate_r; up_r] of fc1, as for the stock gate_up transform.
register_op("gpt_oss_gate_up", Op(_gate_up_to_mcore, _gate_up_to_hf, merge_tp=OPS["gate_up"].merge_tp))
register_op("gpt_oss_gate_up_bias", Op(_bias_to_mcore, _bias_to_hf, merge_tp=OPS["gate_up"].merge_tp))
register_op("gpt_oss_down", Op(lambda ts, s: ts[0].t().contiguous(), lambda t, s: [t.t().contiguous()]))


# --------------------------------------------------------------------------- config.json fields
def _alternating(n: int) -> list[str]:
    return [SLIDING if (i + 1) % 2 else FULL for i in range(n)]


def _rope(get) -> dict:
    """Rope meaning. Neither ``rope_scaling`` nor ``rope_parameters`` (absent or null) means
    GptOssConfig's default YaRN; a ``rope_parameters`` without a type is plain rope, as in transformers."""
    cfg = get.cfg
    if cfg.get("rope_scaling") is None and cfg.get("rope_parameters") is None:
        get = cf.Reader(get.fields, get.family, {**cfg, "rope_scaling": DEFAULT_YARN})
    return _ROPE_MEANING(get)


_ROPE_MEANING = cf.rope_meaning({
    "default": {},
    "yarn": {"factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "beta_fast": 32.0, "beta_slow": 1.0,
             "truncate": 1.0,  # transformers' yarn default (true); gpt-oss publishes false
             "attention_factor": Fixed(None), "mscale": Fixed(None), "mscale_all_dim": Fixed(None)},
}, default_theta=150000.0)


FIELDS = {
    **cf.BASE, **cf.identity("gpt_oss", ARCH, ("gpt_oss",)),
    "torch_dtype": translated("bfloat16"),  # published gpt-oss has no torch_dtype; its unquantised tensors are bf16
    "rms_norm_eps": translated(1e-5),
    "num_key_value_heads": translated(8, if_null=c.HEADS),
    "head_dim": translated(64, if_null=c.HEAD_DIM),
    "max_position_embeddings": translated(131072),
    **{name: translated(meaning=_rope) for name in ("rope_theta", "rope_scaling", "rope_parameters")},
    "attention_bias": must_be(True, "gpt-oss's router and expert biases exist in Megatron-Core only together with "
                                    "q/k/v/o biases (add_bias_linear); this model cannot be converted"),
    "num_local_experts": translated(128),
    "num_experts": spelling("num_local_experts"),  # GptOssConfig.attribute_map
    "num_experts_per_tok": translated(4),
    "experts_per_token": spelling("num_experts_per_tok"),  # OpenAI's own name, kept in the published config
    "layer_types": translated(Derived(lambda get: _alternating(get("num_hidden_layers"))),
                              if_null=Derived(lambda get: _alternating(get("num_hidden_layers"))),
                              ok=c.layer_types_ok, supported="one of full_attention, sliding_attention per layer",
                              fix="fix layer_types or drop it"),
    "sliding_window": translated(128, ok=c.window_ok, supported="a window of at least 1 token (null only when no "
                                 "layer is a sliding_attention layer)", fix="set sliding_window"),
    "swiglu_alpha": must_be(QUICK_GELU_ALPHA, "Megatron-Core's quick_gelu fixes the sigmoid gain at 1.702; "
                            "this model cannot be converted"),
    "swiglu_limit": translated(7.0, ok=c.positive, supported="a positive clamp value",
                               fix="set swiglu_limit (GptOssExperts clamps at it)"),
    "quantization_config": checked(None, lambda v, get: v is None or cf.canon(v) == cf.canon(MXFP4_PUBLISHED),
                                   f"none or gpt-oss's published MXFP4 experts {show(MXFP4_PUBLISHED)}",
                                   "dequantise the checkpoint to bf16 first (and drop quantization_config)"),
    **irrelevant("hidden_act",  # GptOssExperts never reads it: its activation is the clamped SwiGLU above
                 "initial_context_length",  # OpenAI's name for rope's original context; transformers ignores it
                 "output_router_logits", "router_aux_loss_coef"),  # training-time auxiliary loss only
}


# --------------------------------------------------------------------------- translation
def _window(get) -> dict:
    width, types = get("sliding_window"), get("layer_types")
    if width is None:
        return dict(window_size=None, window_attn_skip_freq=None)
    sliding = [t == SLIDING for t in types]
    freq = 2 if types == _alternating(len(types)) else [int(s) for s in sliding]
    return dict(window_size=(width - 1, 0), window_attn_skip_freq=freq)


def _mcore_rope(r: dict) -> dict:
    """GPTModel rope arguments; non-MLA YaRN settings are ``yarn_*`` attributes GPTModel reads off the config."""
    if r["rope_type"] == "default":
        return {"rotary_base": r["rope_theta"]}
    return {"position_embedding_type": "yarn", "rotary_base": r["rope_theta"],
            "yarn_rotary_scaling_factor": r["factor"],
            "yarn_original_max_position_embeddings": int(r["original_max_position_embeddings"]),
            "yarn_beta_fast": r["beta_fast"], "yarn_beta_slow": r["beta_slow"],
            "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.0,  # MCore's defaults: attention factor 0.1 ln(f) + 1
            "yarn_correction_range_round_to_int": bool(r["truncate"])}


def read_config(cfg: dict):
    get = read_fields(FIELDS, "gpt_oss", cfg)
    moe, n = c.softmax_moe(get), get("num_hidden_layers")
    m = c.gqa_config(get, qkv_bias=True, moe=moe, moe_layers=tuple(range(n)))
    transformer = dict(m.transformer, add_bias_linear=True, activation_func=quick_gelu, glu_linear_offset=1.0,
                       activation_func_clamp_value=float(get("swiglu_limit")), softmax_type="learnable",
                       **_window(get))
    return dataclasses.replace(m, transformer=transformer, rope=_mcore_rope(get("rope_parameters")))


def rules(m):
    attn, mlp = c.HF + "self_attn.", c.HF + "mlp."
    experts, hf = c.MC + "mlp.experts.local_experts.{E}.", mlp + "experts."
    return [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qkv_bias=True),
            Rule(c.MC + "self_attention.linear_proj.bias", attn + "o_proj.bias"),
            Rule(c.MC + "self_attention.core_attention.softmax_offset", attn + "sinks", tp="column"),
            Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight"),
            Rule(c.MC + "mlp.router.weight", mlp + "router.weight"),
            Rule(c.MC + "mlp.router.bias", mlp + "router.bias"),
            Rule(experts + "linear_fc1.weight", hf + "gate_up_proj" + EXPERT_SLICE, op="gpt_oss_gate_up",
                 tp="column", expert=True),
            Rule(experts + "linear_fc1.bias", hf + "gate_up_proj_bias" + EXPERT_SLICE, op="gpt_oss_gate_up_bias",
                 tp="column", expert=True),
            Rule(experts + "linear_fc2.weight", hf + "down_proj" + EXPERT_SLICE, op="gpt_oss_down", tp="row",
                 expert=True),
            Rule(experts + "linear_fc2.bias", hf + "down_proj_bias" + EXPERT_SLICE, expert=True)]


def write_config(m) -> dict:
    t, r = m.transformer, m.rope
    window = t.get("window_size")
    cfg = c.gqa_hf_config(m, ARCH, "gpt_oss", attention_bias=True, num_local_experts=t["num_moe_experts"],
                          num_experts_per_tok=t["moe_router_topk"], sliding_window=window[0] + 1 if window else None,
                          layer_types=c.layer_types(t, m.num_layers), swiglu_alpha=QUICK_GELU_ALPHA,
                          swiglu_limit=t["activation_func_clamp_value"])
    cfg["intermediate_size"] = t["moe_ffn_hidden_size"]
    if r.get("position_embedding_type") == "yarn":
        cfg["rope_scaling"] = dict(rope_type="yarn", factor=r["yarn_rotary_scaling_factor"],
                                   original_max_position_embeddings=r["yarn_original_max_position_embeddings"],
                                   beta_fast=r["yarn_beta_fast"], beta_slow=r["yarn_beta_slow"],
                                   truncate=r["yarn_correction_range_round_to_int"])
    else:
        cfg["rope_scaling"] = {"rope_type": "default"}  # no key would mean GptOssConfig's default YaRN
    return cfg


FAMILY = Family(name="gpt_oss", architectures=(ARCH,),
                description="gpt-oss: attention sinks, sliding window on alternate layers, YaRN, q/k/v/o and "
                            "router biases, stacked experts with biases (gate/up interleaved), clamped SwiGLU, "
                            "MXFP4 experts read as bf16",
                published=("openai/gpt-oss-20b", "openai/gpt-oss-120b"),
                read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS)
