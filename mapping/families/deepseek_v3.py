"""DeepSeek-V3 / R1: MLA attention, first-k dense layers, then MoE with sigmoid routing,
an fp32 expert-score correction bias (``noaux_tc``), group-limited routing and shared experts.

``q_lora_rank: null`` (Moonlight) swaps the q down/up pair for a single ``q_proj``: see
``moonlight.py``. HF's interleaved rope layout needs no weight permutation (MCore's MLA rope
de-interleaves internally). Multi-token-prediction layers are stored by DeepSeek at layer index
``num_hidden_layers + i`` (a full MLA + MoE decoder layer plus ``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm``, and copies of the embedding and head); MCore holds them as ``mtp.layers.i``
and shares the embedding and output layer with the main model.

Routing as DeepSeek's V3 code defines it: ``noaux_tc`` (sigmoid scores plus the correction bias,
groups ranked by their top-2 sum) is what every published checkpoint uses and the only routing
transformers implements; ``greedy`` (no groups) and ``group_limited_greedy`` (groups ranked by
their best expert), softmax or sigmoid, are expressible in Megatron-Core and read too, with a note.
Kimi-K2 publishes ``model_type: kimi_k2`` with this architecture.
"""
import torch

from mapping import config_fields as cf
from mapping.config_fields import (REQUIRED, Fixed, checked, irrelevant, must_be, read_fields, spelling,
                                   translated)
from mapping.families import common as c
from mapping.family import ConfigError, Family, ModelConfig, padded_vocab
from mapping.layout import moe_layer_freq
from mapping.rules import Rule, Shapes

A = c.HF + "self_attn."
S = c.MC + "self_attention."

MLA_ROPE = {"default": {}, "yarn": {
    "factor": REQUIRED, "original_max_position_embeddings": REQUIRED, "beta_fast": 32.0, "beta_slow": 1.0,
    "mscale": 1.0, "mscale_all_dim": 0.0,  # DeepSeek's and MLATransformerConfig's defaults
    "truncate": Fixed(True), "attention_factor": Fixed(None)}}
# topk_method -> how many top experts DeepSeek sums to rank a group (None: no group limit)
TOPK_METHODS = {"noaux_tc": 2, "group_limited_greedy": 1, "greedy": None}
ARCH = "DeepseekV3ForCausalLM"

FIELDS = {
    **cf.BASE, **cf.QUANTIZATION, **cf.identity("deepseek_v3", ARCH, ("deepseek_v3", "kimi_k2")),
    **cf.rope_fields(MLA_ROPE),
    "max_position_embeddings": translated(4096),
    "num_key_value_heads": checked(
        128, lambda v, get: v == get("num_attention_heads"),
        lambda get: f"num_key_value_heads = num_attention_heads = {get('num_attention_heads')} (MLA)",
        "set num_key_value_heads to num_attention_heads", if_null=c.HEADS),
    **{k: translated() for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                 "v_head_dim", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")},
    "num_local_experts": spelling("n_routed_experts"),
    "n_shared_experts": translated(1, if_null=0),
    "first_k_dense_replace": translated(3, if_null=0),
    "routed_scaling_factor": translated(2.5),
    "scoring_func": translated(
        "sigmoid", ok=lambda v, get: v in ("sigmoid", "softmax"), supported="sigmoid or softmax",
        fix="Megatron-Core's router has no other score function; this model cannot be converted"),
    "topk_method": translated(
        "noaux_tc", ok=lambda v, get: v in TOPK_METHODS and (v != "noaux_tc" or get("scoring_func") == "sigmoid"),
        supported="noaux_tc (with scoring_func sigmoid: Megatron-Core's expert bias), greedy or group_limited_greedy",
        fix="Megatron-Core's router expresses no other top-k method; this model cannot be converted"),
    "n_group": translated(8),
    "topk_group": translated(4),
    "norm_topk_prob": translated(
        True, ok=lambda v, get: bool(v) or get("scoring_func") != "sigmoid" or get("num_experts_per_tok") == 1,
        supported="norm_topk_prob true with scoring_func sigmoid (Megatron-Core always renormalises the sigmoid top-k)",
        fix="Megatron-Core cannot express un-normalised sigmoid routing; this model cannot be converted"),
    "num_nextn_predict_layers": translated(1, if_null=0),
    "num_mtp_layers": spelling("num_nextn_predict_layers"),
    "attention_bias": c.no_bias("deepseek_v3", "q_a/kv_a/o_proj biases"),
    "rope_interleave": must_be(True, "Megatron-Core's MLA rope de-interleaves DeepSeek's interleaved layout; "
                               "a non-interleaved checkpoint would be rotated wrongly: it cannot be converted"),
    "moe_layer_freq": must_be(1, "DeepSeek's layer pattern here is first_k_dense_replace dense layers, then MoE "
                              "in every layer; this model cannot be converted"),
    "pretraining_tp": must_be(1, "set it to 1: it only chose a sliced matmul in transformers 4 (same weights)"),
    **irrelevant("head_dim", "qk_head_dim",  # transformers 5 derives both from the qk head dims on load
                 "ep_size",  # experts per rank in DeepSeek's inference code; same function
                 "aux_loss_alpha", "seq_aux", "output_router_logits"),  # training-time auxiliary loss only
}


def _routing_notes(get) -> tuple[str, ...]:
    method, k = get("topk_method"), get("num_experts_per_tok")
    groups, topk_group, per_group = get("n_group") or 1, get("topk_group") or 1, TOPK_METHODS[method]
    notes = []
    if per_group and groups > 1 and k // topk_group != per_group:
        notes.append(f"group-limited routing differs: Megatron-Core scores a group by its top "
                     f"{k // topk_group} experts, DeepSeek by its top {per_group} (num_experts_per_tok={k}, "
                     f"topk_group={topk_group}); the converted model routes differently")
    if (get("scoring_func"), method) != ("sigmoid", "noaux_tc"):
        notes.append(f"routing scoring_func={get('scoring_func')}, topk_method={method}: transformers' "
                     "DeepseekV3 always routes with sigmoid scores and e_score_correction_bias, so compare this "
                     "model with the checkpoint's own modeling code, not transformers")
    return tuple(notes)


def _rope(get) -> dict:
    r = get("rope_parameters")
    if r["rope_type"] == "default":
        return {"rope_type": "rope", "rotary_base": r["rope_theta"]}
    return dict(rope_type="yarn", rotary_base=r["rope_theta"], rotary_scaling_factor=r["factor"],
                original_max_position_embeddings=int(r["original_max_position_embeddings"]),
                beta_fast=r["beta_fast"], beta_slow=r["beta_slow"], mscale=r["mscale"],
                mscale_all_dim=r["mscale_all_dim"])


def read_config(cfg: dict, family: str = "deepseek_v3") -> ModelConfig:
    get = read_fields(FIELDS, family, cfg)
    return mla_config(get, mtp=get("num_nextn_predict_layers") or None, notes=_routing_notes(get))


def mla_config(get, mtp: int | None = None, notes: tuple[str, ...] = ()) -> ModelConfig:
    """MLA + first-k-dense MoE ``ModelConfig`` from checked DeepSeek fields (V3 here, V2 in
    ``deepseek_v2.py``): ``get`` must know every field read below."""
    n_layers, k_dense = get("num_hidden_layers"), get("first_k_dense_replace")
    moe_layers = tuple(range(k_dense, n_layers))
    scoring, method, k, moe_ffn = (get("scoring_func"), get("topk_method"), get("num_experts_per_tok"),
                                   get("moe_intermediate_size"))
    grouped = TOPK_METHODS[method] is not None
    transformer = dict(
        num_layers=n_layers, hidden_size=get("hidden_size"), ffn_hidden_size=get("intermediate_size"),
        num_attention_heads=get("num_attention_heads"), q_lora_rank=get("q_lora_rank"),
        kv_lora_rank=get("kv_lora_rank"), qk_head_dim=get("qk_nope_head_dim"),
        qk_pos_emb_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"),
        qk_layernorm=True, multi_latent_attention=True, **_rope(get),
        normalization="RMSNorm", layernorm_epsilon=get("rms_norm_eps"), gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=get("n_routed_experts"), moe_router_topk=k, moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=(get("n_shared_experts") or 0) * moe_ffn or None,
        moe_layer_freq=moe_layer_freq(moe_layers, n_layers),
        moe_router_score_function=scoring, moe_router_enable_expert_bias=method == "noaux_tc",
        moe_router_num_groups=get("n_group") if grouped else None,
        moe_router_group_topk=get("topk_group") if grouped else None,
        moe_router_topk_scaling_factor=get("routed_scaling_factor"),
        # softmax: top-k-then-softmax == renormalised top-k; sigmoid ignores it (always renormalised)
        moe_router_pre_softmax=scoring == "sigmoid" or not (get("norm_topk_prob") and k > 1),
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        moe_grouped_gemm=False, mtp_num_layers=mtp)
    vocab, heads = get("vocab_size"), get("num_attention_heads")
    return ModelConfig(
        family=get.family, transformer=transformer, mla=True, num_layers=n_layers,
        num_experts=get("n_routed_experts"), moe_layers=moe_layers, vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab), max_position_embeddings=get("max_position_embeddings"),
        tie_embeddings=bool(get("tie_word_embeddings")), rope={},
        shapes=Shapes(num_query_groups=heads, heads_per_group=1, head_dim=get("v_head_dim"),
                      vocab_size=vocab, padded_vocab_size=padded_vocab(vocab)),
        hf_dtype=c.hf_dtype(get("torch_dtype")), notes=get.notes + notes)


def write_config(m: ModelConfig) -> dict:
    """config.json from the MCore side (the inverse of ``read_config``); model_type deepseek_v3 (also
    for Kimi-K2's kimi_k2: the same architecture, which transformers knows without remote code)."""
    t = m.transformer
    k_dense = min(m.moe_layers, default=m.num_layers)
    if m.moe_layers != tuple(range(k_dense, m.num_layers)):
        raise ConfigError(f"MoE layers {list(m.moe_layers)} are not 'first k dense, then MoE'; "
                         "DeepSeek-V3's config.json cannot express them")
    shared = t["moe_shared_expert_intermediate_size"] or 0
    scoring = t["moe_router_score_function"]
    method = ("noaux_tc" if t["moe_router_enable_expert_bias"] else
              "group_limited_greedy" if t["moe_router_group_topk"] else "greedy")
    cfg = dict(
        architectures=[ARCH], model_type="deepseek_v3", vocab_size=m.vocab_size, hidden_size=t["hidden_size"],
        intermediate_size=t["ffn_hidden_size"], num_hidden_layers=t["num_layers"],
        num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_attention_heads"],
        q_lora_rank=t["q_lora_rank"], kv_lora_rank=t["kv_lora_rank"], qk_nope_head_dim=t["qk_head_dim"],
        qk_rope_head_dim=t["qk_pos_emb_head_dim"], v_head_dim=t["v_head_dim"],
        rms_norm_eps=t["layernorm_epsilon"], hidden_act="silu", attention_bias=False, rope_interleave=True,
        pretraining_tp=1,
        max_position_embeddings=m.max_position_embeddings, rope_theta=t["rotary_base"], rope_scaling=None,
        n_routed_experts=t["num_moe_experts"], num_experts_per_tok=t["moe_router_topk"],
        moe_intermediate_size=t["moe_ffn_hidden_size"], n_shared_experts=shared // t["moe_ffn_hidden_size"],
        first_k_dense_replace=k_dense, moe_layer_freq=1, scoring_func=scoring, topk_method=method,
        n_group=t["moe_router_num_groups"] or 1, topk_group=t["moe_router_group_topk"] or 1,
        routed_scaling_factor=t["moe_router_topk_scaling_factor"] or 1.0,
        norm_topk_prob=scoring == "sigmoid" or not t["moe_router_pre_softmax"],
        num_nextn_predict_layers=t["mtp_num_layers"] or 0, tie_word_embeddings=m.tie_embeddings,
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


def moe_rules(moe: tuple[int, ...], shared: bool, bias: bool = True) -> list[Rule]:
    rules = [Rule(c.MC + "pre_mlp_layernorm.weight", c.HF + "post_attention_layernorm.weight", layers=moe),
             Rule(c.MC + "mlp.router.weight", c.HF + "mlp.gate.weight", layers=moe),
             *c.expert_rules(layers=moe)]
    if bias:  # noaux_tc: the score-correction bias (fp32 buffer)
        rules.insert(2, Rule(c.MC + "mlp.router.expert_bias", c.HF + "mlp.gate.e_score_correction_bias",
                             layers=moe, hf_dtype=torch.float32))
    if shared:
        rules += c.swiglu_rules(c.MC + "mlp.shared_experts.", c.HF + "mlp.shared_experts.", layers=moe)
    return rules


def _moe_parts(m: ModelConfig) -> tuple[bool, bool]:
    """(shared experts, router expert bias)."""
    t = m.transformer
    return bool(t["moe_shared_expert_intermediate_size"]), bool(t["moe_router_enable_expert_bias"])


def layer_rules(m: ModelConfig) -> list[Rule]:
    dense = tuple(L for L in range(m.num_layers) if L not in m.moe_layers)
    return [*mla_rules(m.transformer["q_lora_rank"] is not None), *c.dense_mlp_rules(layers=dense),
            *moe_rules(m.moe_layers, *_moe_parts(m))]


def mtp_rules(m: ModelConfig, i: int) -> list[Rule]:
    """MTP layer ``i``: an MLA + MoE decoder layer under ``mtp.layers.i.transformer_layer``."""
    return mtp_layer_rules(m, i, [*mla_rules(m.transformer["q_lora_rank"] is not None),
                                  *moe_rules(None, *_moe_parts(m))])


def mtp_layer_rules(m: ModelConfig, i: int, layer: list[Rule]) -> list[Rule]:
    """MTP layer ``i`` as DeepSeek stores it (HF layer ``num_hidden_layers + i``): the decoder-layer
    rules ``layer`` (written for ``{L}``, no layer restriction) moved under
    ``mtp.layers.i.transformer_layer``, plus the MTP layer's own norms and projection."""
    hf, mc = f"model.layers.{m.num_layers + i}.", f"mtp.layers.{i}."
    moved = [r.renamed(mcore=r.mcore.replace(c.MC, mc + "transformer_layer."),
                       hf=tuple(h.replace(c.HF, hf) for h in r.hf)) for r in layer]
    return [*moved,
            Rule(mc + "enorm.weight", hf + "enorm.weight"), Rule(mc + "hnorm.weight", hf + "hnorm.weight"),
            Rule(mc + "eh_proj.weight", hf + "eh_proj.weight", tp="column"),
            Rule(mc + "final_layernorm.weight", hf + "shared_head.norm.weight")]


def rules(m: ModelConfig) -> list[Rule]:
    return rules_with_mtp(m, layer_rules(m), lambda i: mtp_rules(m, i))


def rules_with_mtp(m: ModelConfig, layers: list[Rule], mtp_layer) -> list[Rule]:
    """Embedding, head and decoder ``layers``, plus the MTP layer (``mtp_layer(0)``) when declared:
    its copies of the embedding and head are the main ones (``vocab_shared``)."""
    mtp = m.transformer.get("mtp_num_layers") or 0
    if not mtp:
        return [*c.embedding_rules(m.tie_embeddings), *layers]
    if mtp != 1:
        raise ConfigError(f"num_nextn_predict_layers={mtp}: only one MTP layer (as published) is mapped")
    if m.tie_embeddings:
        raise ConfigError("config.json tie_word_embeddings=true with num_nextn_predict_layers=1: the MTP rules "
                          "map a separate lm_head and shared_head.head; convert without MTP (hf2mcore --mtp drop)")
    last = f"model.layers.{m.num_layers}."
    return [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight", last + "embed_tokens.weight"),
                 op="vocab_shared", tp="column"),
            Rule("decoder.final_layernorm.weight", "model.norm.weight"),
            Rule("output_layer.weight", ("lm_head.weight", last + "shared_head.head.weight"),
                 op="vocab_shared", tp="column"),
            *layers, *mtp_layer(0)]


# DeepSeek-V3/R1 and Kimi-K2 as published: attention and MLP/expert projections in FP8 (main and MTP
# layers); embeddings, head, norms, router, expert bias and MTP's eh_proj in bf16/fp32.
FP8_WEIGHTS = r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"

FAMILY = Family(name="deepseek_v3", fp8_weights=FP8_WEIGHTS, architectures=(ARCH,),
                description="DeepSeek-V3/R1, Kimi-K2: MLA, first-k dense, sigmoid routing + expert bias, group-limited routing, shared experts, MTP layer, FP8 input", published=("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1", "moonshotai/Kimi-K2-Instruct"),
                read_config=read_config, rules=rules, write_config=write_config,
                matches=lambda cfg: cfg.get("q_lora_rank") is not None, fields=FIELDS)
