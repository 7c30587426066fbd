"""Shrink a published config.json to a test-sized model of exactly the same structure.

One rule for every family: the fields that are *sizes* (widths, head and expert counts, ranks,
layer and vocab counts, token ids that index the vocab) get small values; every other field
(layer pattern, first-k-dense, tied embeddings, rope type and its factors, q-LoRA on or off,
group routing, MTP layers declared, shared experts, quantisation, dtype) is kept as published.
``tests/test_zoo.py`` checks both halves on the published configs in
``tests/fixtures/published/``.

Relations the shrunk sizes keep, because models or Megatron-Core depend on them:

* GQA stays GQA and MHA stays MHA (``heads / kv_heads`` becomes 2 or stays 1); TP=2 splits the
  query groups and heads.
* Group-limited routing keeps ``topk / topk_group`` (Megatron-Core and DeepSeek rank groups alike
  only for some ratios), and every group keeps enough experts; EP=2 splits the experts.
* A first-k-dense stack keeps its k dense layers and gets 2 MoE layers after them; per-layer lists
  (``mlp_only_layers``, ``layer_types``) are cut to the new depth.
* ``vocab_size`` is a multiple of 128, as in every published model here, so Megatron's vocab
  padding leaves it unchanged.
* ``sliding_window`` is a length in tokens, so a size: it becomes at most 8, shorter than the zoo's
  24-token batch, so that a windowed layer (gpt-oss) computes something else than a full one. Where
  no layer slides (Qwen's ``use_sliding_window: false``) the value means nothing either way.
  ``experts_per_token`` (gpt-oss's second spelling of ``num_experts_per_tok``) follows top-k.

Leaves out: weights (``tools.make_tiny`` fabricates them from the shrunk config).
"""
from __future__ import annotations

import copy
from typing import Any

HIDDEN, FFN, MOE_FFN, HEAD_DIM, VOCAB, WINDOW = 128, 256, 64, 32, 512, 8
MAX_KV_HEADS, MAX_Q_PER_KV, MAX_EXPERTS, MAX_TOPK, MAX_GROUPS, MOE_LAYERS = 2, 2, 16, 4, 4, 2
MLA = {"q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}
EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SIZE_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "head_dim", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
    "num_experts_per_tok", "experts_per_token", "n_group", "topk_group", "max_window_layers", "mlp_only_layers",
    "layer_types", "sliding_window", *EXPERT_COUNTS, *MLA, *TOKEN_IDS})


def shrink(published: dict[str, Any], token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The shrunk copy of ``published`` (not modified). ``token_ids``: ids to use for bos/eos/pad
    when the published ones do not fit the small vocab (default 0, 1, 2)."""
    cfg = copy.deepcopy(published)
    _attention(cfg)
    _experts(cfg)
    _layers(cfg)
    for key in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in cfg:
            cfg[key] = {"hidden_size": HIDDEN, "intermediate_size": FFN}.get(key, MOE_FFN)
    for key, value in MLA.items():
        if cfg.get(key) is not None:
            cfg[key] = value
    cfg["vocab_size"] = VOCAB
    if isinstance(cfg.get("sliding_window"), int):
        cfg["sliding_window"] = min(cfg["sliding_window"], WINDOW)
    ids = token_ids or {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    for key in TOKEN_IDS:
        if key in cfg:
            cfg[key] = _fit_ids(cfg[key], ids[key])
    return cfg


def _attention(cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    per_kv = heads // kv
    new_kv = min(kv, MAX_KV_HEADS) if per_kv > 1 else min(heads, MAX_KV_HEADS * MAX_Q_PER_KV)
    cfg["num_attention_heads"] = new_kv * min(per_kv, MAX_Q_PER_KV)
    if "num_key_value_heads" in cfg:
        cfg["num_key_value_heads"] = new_kv
    if cfg.get("head_dim") is not None:
        cfg["head_dim"] = HEAD_DIM
    elif "qk_nope_head_dim" not in cfg and HIDDEN % cfg["num_attention_heads"]:
        raise ValueError(f"hidden {HIDDEN} does not split over {cfg['num_attention_heads']} heads")


def _experts(cfg: dict) -> None:
    keys = [k for k in EXPERT_COUNTS if cfg.get(k)]
    if not keys:
        return
    experts = min(cfg[keys[0]], MAX_EXPERTS)
    for k in keys:
        cfg[k] = experts
    topk = cfg.get("num_experts_per_tok")
    new_topk = min(topk, MAX_TOPK) if topk else topk
    if topk:
        cfg["num_experts_per_tok"] = new_topk
        if "experts_per_token" in cfg:
            cfg["experts_per_token"] = new_topk
    groups, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if groups > 1:  # keep topk / topk_group, and enough experts in the chosen groups
        cfg["n_group"] = min(groups, MAX_GROUPS)
        cfg["topk_group"] = max(1, topk_group * new_topk // topk)
        if experts % cfg["n_group"] or experts // cfg["n_group"] * cfg["topk_group"] < new_topk:
            raise ValueError(f"{experts} experts in {cfg['n_group']} groups cannot route top-{new_topk}")


def _layers(cfg: dict) -> None:
    dense = cfg.get("first_k_dense_replace")
    layers = (dense + MOE_LAYERS) if dense is not None else MOE_LAYERS
    layers = min(layers, cfg["num_hidden_layers"])
    cfg["num_hidden_layers"] = layers
    if cfg.get("max_window_layers") is not None:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    if cfg.get("mlp_only_layers"):
        cfg["mlp_only_layers"] = [L for L in cfg["mlp_only_layers"] if L < layers]
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:layers]


def _fit_ids(value, replacement: int):
    if isinstance(value, list):
        return [v if v < VOCAB else replacement for v in value]
    return value if value is None or value < VOCAB else replacement
