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

``with_sizes`` applies the same sizes to Megatron-LM flags (a published model's
``megatron_lm_args.txt``), so the consumer the zoo builds has the shrunk model's sizes.

Leaves out: weights (``tools.make_tiny`` fabricates them from the shrunk config).
"""
from __future__ import annotations

import copy
from typing import Any

from runtime.megatron_lm import flag_pairs, moe_freq

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
    cfg.update(with_depth(cfg, min(layers, cfg["num_hidden_layers"])))


def with_depth(cfg: dict, layers: int) -> dict:
    """``cfg`` with ``layers`` decoder layers, its per-layer fields (``max_window_layers``,
    ``mlp_only_layers``, ``layer_types``) cut to that depth."""
    out = dict(cfg, num_hidden_layers=layers)
    if cfg.get("max_window_layers") is not None:
        out["max_window_layers"] = min(cfg["max_window_layers"], layers)
    if cfg.get("mlp_only_layers"):
        out["mlp_only_layers"] = [L for L in cfg["mlp_only_layers"] if L < layers]
    if isinstance(cfg.get("layer_types"), list):
        out["layer_types"] = cfg["layer_types"][:layers]
    return out


def _fit_ids(value, replacement: int):
    if isinstance(value, list):
        return [v if v < VOCAB else replacement for v in value]
    return value if value is None or value < VOCAB else replacement


# Megatron-LM flags with the sizes of a config.json
# flag <- config.json field (the first one present wins); None drops the flag (its default applies)
SIZE_FLAGS = {
    "--num-layers": ("num_hidden_layers",), "--hidden-size": ("hidden_size",),
    "--ffn-hidden-size": ("intermediate_size",), "--num-attention-heads": ("num_attention_heads",),
    "--num-query-groups": ("num_key_value_heads",), "--kv-channels": ("head_dim",),
    "--num-experts": ("num_experts", "n_routed_experts", "num_local_experts"),
    "--moe-ffn-hidden-size": ("moe_intermediate_size",), "--moe-router-topk": ("num_experts_per_tok",),
    "--moe-router-num-groups": ("n_group",), "--moe-router-group-topk": ("topk_group",),
    "--q-lora-rank": ("q_lora_rank",), "--kv-lora-rank": ("kv_lora_rank",),
    "--qk-head-dim": ("qk_nope_head_dim",), "--qk-pos-emb-head-dim": ("qk_rope_head_dim",),
    "--v-head-dim": ("v_head_dim",), "--max-position-embeddings": ("max_position_embeddings",),
    "--padded-vocab-size": ("vocab_size",),
}


def size_values(config: dict) -> dict:
    """Each size flag's value for ``config`` (None where the config has no such size)."""
    values = {flag: next((config[n] for n in names if config.get(n) is not None), None)
              for flag, names in SIZE_FLAGS.items()}
    if values["--kv-channels"] is None:
        values["--kv-channels"] = config["hidden_size"] // config["num_attention_heads"]
    shared = config.get("n_shared_experts")  # DeepSeek: a count of experts; Qwen2-MoE: a width
    values["--moe-shared-expert-intermediate-size"] = (
        shared * config["moe_intermediate_size"] if shared else config.get("shared_expert_intermediate_size"))
    values["--window-size"], values["--window-attn-skip-freq"] = _window_values(config)
    return values


def _window_values(config: dict) -> tuple:
    """``--window-size`` (W keys including the token itself = ``(W-1, 0)``) and the sliding layers
    (``--window-attn-skip-freq``: 2 for sliding, full, sliding, ...) of a config whose
    ``layer_types`` slide (gpt-oss); (None, None) where no layer does."""
    width, types = config.get("sliding_window"), config.get("layer_types") or []
    if not width or config.get("use_sliding_window") is False or "sliding_attention" not in types:
        return None, None
    sliding = [int(t == "sliding_attention") for t in types]
    alternating = sliding == [(i + 1) % 2 for i in range(len(types))]
    return f"{width - 1},0", "2" if alternating else "[" + ",".join(map(str, sliding)) + "]"


def _resized_moe_freq(text: str, config: dict) -> str:
    """An int stays; a dense-prefix list ``[0]*k+[1]*m`` becomes k = first_k_dense_replace
    (else the text's k) and m = num_hidden_layers - k."""
    pattern = moe_freq(text)
    if isinstance(pattern, int):
        return text
    k = next((i for i, v in enumerate(pattern) if v != 0), len(pattern))
    if any(v != 1 for v in pattern[k:]):
        raise ValueError(f"--moe-layer-freq {text}: only a dense-prefix list [0]*k+[1]*m is resized; "
                         "write the pattern for this config by hand")
    k = config.get("first_k_dense_replace", k)
    return f"[0]*{k}+[1]*{config['num_hidden_layers'] - k}"


def with_sizes(flags_text: str, config: dict) -> str:
    """``flags_text`` (one flag per line) with every size taken from an HF ``config.json`` dict:
    replaced where present, appended where missing, dropped where the config has none."""
    values = size_values(config)
    out = []
    for flag, vals in flag_pairs(flags_text):
        if flag == "--moe-layer-freq":
            vals = [_resized_moe_freq(" ".join(vals), config)]
        elif flag in values:
            if values[flag] is None:
                continue
            vals = [str(values[flag])]
        out.append((flag, vals))
    present = {flag for flag, _ in out}
    out += [(f, [str(v)]) for f, v in values.items() if v is not None and f not in present]
    return "\n".join(" ".join([flag, *vals]) for flag, vals in out)
