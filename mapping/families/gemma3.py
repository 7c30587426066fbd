"""Gemma 3, text only (Gemma3ForCausalLM, ``model_type: gemma3_text``; google/gemma-3-1b-pt,
gemma-3-270m). transformers 5.19's ``modeling_gemma3.py`` is the truth; how each piece lands in
Megatron-Core 0.16.1 (the modules are ``runtime.gemma``, plugged in by this family's layer-spec hook):

* norms: ``norm(x) * (1 + w)``, weights stored zero-centred as HF stores them (no +1 in the
  mapping): ``layernorm_zero_centered_gamma``, for all four layer norms, q/k norms and the final norm;
* four norms per layer: ``input_layernorm`` and ``pre_feedforward_layernorm`` are the stock
  ``input_layernorm`` / ``pre_mlp_layernorm``; ``post_attention_layernorm`` and
  ``post_feedforward_layernorm`` (on a sublayer's output, before the residual add) live in
  ``self_attention.linear_proj.post_layernorm`` and ``mlp.linear_fc2.post_layernorm``, Megatron-Bridge's
  names for them (``post_attention_layernorm`` is *not* Llama's pre-MLP norm here);
* attention: GQA with per-head q/k norms, softmax scale ``query_pre_attn_scalar ** -0.5``
  (``softmax_scale``), no biases (``attention_bias: true`` is refused);
* layer pattern: ``layer_types`` (else every ``sliding_window_pattern``-th layer global) becomes
  ``window_attn_skip_freq`` (the pattern N when the types are transformers' pattern N, else the 0/1
  list); transformers' window W covers W keys including the token itself = ``window_size=(W-1, 0)``;
* rope: global layers use GPTModel's rotary embedding (``rope_theta``; linear scaling, as the 4B+
  models publish, as ``seq_len_interpolation_factor``: positions / factor == inv_freq / factor);
  sliding layers their own (``rope_local_base_freq``, ``rotary_base_local``). Read from the published
  ``rope_theta``/``rope_local_base_freq``/``rope_scaling`` (scaling applies to global layers only, as in
  transformers) or transformers 5's ``rope_parameters: {full_attention: .., sliding_attention: ..}``;
  rope types other than default and linear are refused;
* embedding scaled by sqrt(hidden_size) in the activation dtype (``embedding_multiplier``);
* MLP: GeGLU with ``gelu_pytorch_tanh`` (gate/up stored like SwiGLU's); other activations refused;
* tied embeddings by default (``tie_word_embeddings`` true);
* ``final_logit_softcapping`` / ``attn_logit_softcapping`` (null in Gemma 3) and
  ``use_bidirectional_attention`` (EmbeddingGemma) are refused: not implemented.

Megatron-LM's ``pretrain_gpt.py`` cannot build this model from flags (``megatron_lm_gap``).
"""
from typing import Mapping

import torch

from mapping import config_fields as cf
from mapping.config_fields import Derived, checked, irrelevant, must_be, read_fields, show, translated
from mapping.families import common as c
from mapping.family import ConfigError, Family, ModelConfig, padded_vocab
from mapping.rules import Rule, Shapes

ARCH = "Gemma3ForCausalLM"
SLIDING, FULL = c.SLIDING, c.FULL
ROPE_KEYS = ("rope_theta", "rope_local_base_freq", "rope_scaling", "rope_parameters")
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta
ROPE_KINDS = {"default": set(), "linear": {"factor"}}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_pytorch_tanh``: GELU with the tanh approximation."""
    return torch.nn.functional.gelu(x, approximate="tanh")


# --------------------------------------------------------------------------- config.json fields
def _pattern_types(get) -> list[str]:
    """transformers' ``layer_types`` when config.json has none: every N-th layer global."""
    n = get("sliding_window_pattern")
    return [SLIDING if (i + 1) % n else FULL for i in range(get("num_hidden_layers"))]


def _rope_dict(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise cf.refuse("gemma3", where, value, "a dict of rope parameters or null", f"fix {where}")
    kinds = {value[k] for k in ("rope_type", "type") if k in value}
    if len(kinds) > 1:
        raise cf.refuse("gemma3", where + ".type", value["type"], f"the same value as {where}.rope_type",
                        "keep one of them")
    return {"rope_type": kinds.pop() if kinds else "default",
            **{k: v for k, v in value.items() if k not in ("rope_type", "type")}}


def _one_rope(spec: dict, where: str, theta) -> dict:
    kind = spec.get("rope_type", "default")
    if kind not in ROPE_KINDS:
        raise cf.refuse("gemma3", f"{where}.rope_type", kind, "rope types default or linear (what Megatron-Core's "
                        "RotaryEmbedding computes per layer type here)", "this model cannot be converted")
    extra = set(spec) - {"rope_type", "rope_theta"} - ROPE_KINDS[kind]
    if extra:
        key = sorted(extra)[0]
        raise cf.refuse("gemma3", f"{where}.{key}", spec[key], f"{kind} rope with {sorted(ROPE_KINDS[kind]) or 'no'}"
                        " parameters", "Megatron-Core has no such rope parameter; this model cannot be converted")
    out = {"rope_type": kind, "rope_theta": float(theta)}
    if kind == "linear":
        factor = spec.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise cf.refuse("gemma3", f"{where}.factor", factor, "a positive linear scaling factor",
                            f"set {where}.factor")
        out["factor"] = float(factor)
    return out


def _rope(get) -> dict:
    """``{full_attention: {...}, sliding_attention: {...}}`` as transformers' ``Gemma3TextConfig``
    resolves it: ``rope_parameters`` per layer type, ``rope_scaling`` merged into the global layers'
    entry, thetas from the entries, else ``rope_theta`` / ``rope_local_base_freq``, else 1e6 / 1e4."""
    cfg = get.cfg
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping) or set(params) - {FULL, SLIDING}:
        raise cf.refuse("gemma3", "rope_parameters", params, "null or one dict per layer type "
                        f"({FULL}, {SLIDING})", "fix rope_parameters")
    top = {FULL: cfg.get("rope_theta"), SLIDING: cfg.get("rope_local_base_freq")}
    out = {}
    for kind, spelled in ((FULL, "rope_theta"), (SLIDING, "rope_local_base_freq")):
        spec = _rope_dict(params.get(kind), f"rope_parameters.{kind}")
        if kind == FULL and cfg.get("rope_scaling") is not None:
            old = _rope_dict(cfg["rope_scaling"], "rope_scaling")
            if spec.get("rope_type", "default") != "default" and cf.canon(
                    {k: v for k, v in spec.items() if k != "rope_theta"}) != cf.canon(old):
                raise ConfigError(f"config.json rope_scaling={show(cfg['rope_scaling'])} and rope_parameters."
                                  f"{kind}={show(params[kind])} disagree; keep one of them")
            spec = {**spec, **old}
        nested = spec.get("rope_theta")
        if nested is not None and top[kind] is not None and float(nested) != float(top[kind]):
            raise ConfigError(f"config.json {spelled}={show(top[kind])} and rope_parameters.{kind}.rope_theta="
                              f"{show(nested)} disagree; keep one of them")
        theta = next((t for t in (nested, top[kind]) if t is not None), DEFAULT_THETA[kind])
        out[kind] = _one_rope(spec, "rope_scaling" if kind == FULL and cfg.get("rope_scaling") else
                              f"rope_parameters.{kind}", theta)
    return out


def _count(v, get) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


FIELDS = {
    **cf.BASE, **cf.QUANTIZATION, **cf.identity("gemma3", ARCH, ("gemma3_text",)),
    "tie_word_embeddings": translated(True),
    "num_key_value_heads": translated(4, if_null=c.HEADS),
    "head_dim": translated(256, ok=_count, supported="a head width", fix="set head_dim (Gemma3Attention reads it)"),
    "max_position_embeddings": translated(131072),
    "query_pre_attn_scalar": translated(256, ok=c.positive, supported="a positive number (softmax scale "
                                        "query_pre_attn_scalar ** -0.5)", fix="set query_pre_attn_scalar"),
    "layer_types": translated(Derived(_pattern_types), if_null=Derived(_pattern_types), ok=c.layer_types_ok,
                              supported="one of full_attention, sliding_attention per layer",
                              fix="fix layer_types or drop it"),
    "sliding_window_pattern": translated(6, ok=_count, supported="a period of at least 1 layer",
                                         fix="set sliding_window_pattern (every N-th layer is global)"),
    "sliding_window": translated(4096, ok=c.window_ok, supported="a window of at least 1 token (null only when "
                                 "no layer is a sliding_attention layer)", fix="set sliding_window"),
    **{name: translated(meaning=_rope) for name in ROPE_KEYS},
    "hidden_activation": must_be("gelu_pytorch_tanh", "Megatron-Core is built here with a tanh-GELU gated MLP "
                                 "only; this model cannot be converted"),
    "attention_bias": c.no_bias("gemma3", "q/k/v/o_proj biases"),
    "final_logit_softcapping": must_be(None, "final logit soft-capping is not implemented here (Gemma 3 "
                                       "publishes null); this model cannot be converted"),
    "attn_logit_softcapping": must_be(None, "attention logit soft-capping is not implemented here (Gemma 3 "
                                      "publishes null); this model cannot be converted"),
    "use_bidirectional_attention": checked(False, lambda v, get: v in (None, False), "false (causal attention)",
                                           "bidirectional attention (EmbeddingGemma) is not built here"),
    **irrelevant("hidden_act",  # Gemma3MLP reads hidden_activation only
                 "_sliding_window_pattern",  # transformers' echo of the pattern; it reads sliding_window_pattern
                 "cache_implementation"),  # generation's cache choice (published gemma-3-1b: "hybrid")
}


# --------------------------------------------------------------------------- translation
def _window(get) -> dict:
    types, width = get("layer_types"), get("sliding_window")
    sliding = [int(t == SLIDING) for t in types]
    if not any(sliding):
        return dict(window_size=None, window_attn_skip_freq=None)
    if all(sliding):
        freq = None
    else:
        n = sliding.index(0) + 1  # MCore's int N: layer L (1-based) slides unless L % N == 0
        freq = n if sliding == [int((i + 1) % n != 0) for i in range(len(types))] else sliding
    return dict(window_size=(width - 1, 0), window_attn_skip_freq=freq)


def read_config(cfg: dict) -> ModelConfig:
    get = read_fields(FIELDS, "gemma3", cfg)
    heads, hidden, n = get("num_attention_heads"), get("hidden_size"), get("num_hidden_layers")
    groups, head_dim, vocab = get("num_key_value_heads"), get("head_dim"), get("vocab_size")
    rope = get("rope_parameters")
    full, local = rope[FULL], rope[SLIDING]
    transformer = dict(
        num_layers=n, hidden_size=hidden, ffn_hidden_size=get("intermediate_size"), num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, normalization="RMSNorm", layernorm_epsilon=get("rms_norm_eps"),
        layernorm_zero_centered_gamma=True, gated_linear_unit=True, activation_func=gelu_tanh,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        softmax_scale=get("query_pre_attn_scalar") ** -0.5, **_window(get),
        rotary_base_local=local["rope_theta"], rotary_interpolation_local=local.get("factor"),
        embedding_multiplier=hidden ** 0.5)
    gpt_rope = {"rotary_base": full["rope_theta"]}
    if full["rope_type"] == "linear":
        gpt_rope["seq_len_interpolation_factor"] = full["factor"]
    return ModelConfig(
        family="gemma3", transformer=transformer, mla=False, num_layers=n, num_experts=0, moe_layers=(),
        vocab_size=vocab, padded_vocab_size=padded_vocab(vocab), max_position_embeddings=get("max_position_embeddings"),
        tie_embeddings=bool(get("tie_word_embeddings")), rope=gpt_rope,
        shapes=Shapes(num_query_groups=groups, heads_per_group=heads // groups, head_dim=head_dim,
                      vocab_size=vocab, padded_vocab_size=padded_vocab(vocab)),
        hf_dtype=c.hf_dtype(get("torch_dtype")), notes=get.notes)


def _scalar(softmax_scale: float):
    """``query_pre_attn_scalar`` back from its softmax scale (an int where it was one: 256, 168)."""
    value = round(softmax_scale ** -2, 6)
    return int(value) if value.is_integer() else value


def write_config(m: ModelConfig) -> dict:
    t, n = m.transformer, m.num_layers
    window = t.get("window_size")
    factor = m.rope.get("seq_len_interpolation_factor")
    cfg = dict(
        architectures=[ARCH], model_type="gemma3_text", vocab_size=m.vocab_size, hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"], num_hidden_layers=n, num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t["num_query_groups"], head_dim=t["kv_channels"], hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=t["layernorm_epsilon"], max_position_embeddings=m.max_position_embeddings,
        query_pre_attn_scalar=_scalar(t["softmax_scale"]), sliding_window=window[0] + 1 if window else None,
        layer_types=c.layer_types(t, n), rope_theta=m.rope["rotary_base"], rope_local_base_freq=t["rotary_base_local"],
        rope_scaling=None if factor is None else {"rope_type": "linear", "factor": factor},
        attention_bias=False, final_logit_softcapping=None, attn_logit_softcapping=None,
        use_bidirectional_attention=False, tie_word_embeddings=m.tie_embeddings, torch_dtype=m.hf_dtype)
    if isinstance(t.get("window_attn_skip_freq"), int):
        cfg["sliding_window_pattern"] = t["window_attn_skip_freq"]
    if t.get("rotary_interpolation_local") is not None:  # only transformers 5's nested form says this
        cfg["rope_parameters"] = {
            FULL: {"rope_type": "linear" if factor else "default", "rope_theta": m.rope["rotary_base"],
                   **({"factor": factor} if factor else {})},
            SLIDING: {"rope_type": "linear", "rope_theta": t["rotary_base_local"],
                      "factor": t["rotary_interpolation_local"]}}
        del cfg["rope_scaling"]
    return cfg


def rules(m: ModelConfig) -> list[Rule]:
    return [*c.embedding_rules(m.tie_embeddings), *c.gqa_attention_rules(qk_norm=True),
            Rule(c.MC + "self_attention.linear_proj.post_layernorm.weight", c.HF + "post_attention_layernorm.weight"),
            Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "pre_feedforward_layernorm.weight"),
            *c.swiglu_rules(c.MC + "mlp.", c.HF + "mlp."),  # GeGLU: the same [gate; up] fc1 layout
            Rule(c.MC + "mlp.linear_fc2.post_layernorm.weight", c.HF + "post_feedforward_layernorm.weight")]


FAMILY = Family(
    name="gemma3", architectures=(ARCH,),
    description="Gemma 3 text: (1+w) RMSNorm, post-attention/post-feed-forward norms, embedding x sqrt(hidden), "
                "sliding-window layers with their own rope base among global ones, q/k norm, GeGLU (tanh), "
                "query_pre_attn_scalar; tied embeddings",
    published=("google/gemma-3-1b-pt", "google/gemma-3-270m"),
    read_config=read_config, rules=rules, write_config=write_config, fields=FIELDS,
    layer_spec="runtime.gemma:layer_spec", config_class="runtime.gemma:Gemma3TransformerConfig",
    megatron_lm_gap="Megatron-LM's pretrain_gpt.py has no flags for post-attention/post-feed-forward norms, a "
                    "second rope base for the sliding-window layers, embedding scaling or a tanh-GELU gated MLP; "
                    "the model is built with this family's layer spec (runtime.gemma), as Megatron-Bridge's "
                    "Gemma3 provider builds it")
