"""Exact parameter counts of the policy Megatron-Core builds, per pipeline rank, from the config alone.

    counts = rank_params(m, layout, spec="te", stage=3)    # {"experts": ..., "attention": ..., ...}

``m`` is the family's ``mapping.family.ModelConfig`` (``family.read_config(config.json)``); the counts
are those of one rank of the stage (every TP / EP rank of a stage holds the same number). They restate
what Megatron-Core 0.16.1's GPT layers allocate (local and Transformer Engine specs) by formula, so a
671B plan takes milliseconds instead of a 5 s meta-model build; ``tests/test_rl_plan.py`` compares them
with MCore meta models at the recipes' layouts. Sharding, per tensor:

* TP-split: attention projections (MLA's up-projections too), dense MLP, shared experts, vocabulary
  rows of the embedding and output layer; their row-parallel biases are whole on every rank;
* whole on every rank: norms, q/k norms, the router, the shared-expert gate; MLA's down-projections
  under ``spec="te"`` (MCore builds ``TELinear`` with ``parallel_mode="duplicated"``), TP-split under
  the local spec;
* routed experts: ``E / ep`` experts per rank, each split over ETP.
Buffers (the router's expert bias) are not parameters and are left out, as MCore's count does.
Leaves out: MTP layers (RL trains without them: the caller drops them) and modules a family's
``layer_spec`` hook adds (Gemma 3's post-norms: ``hook_note`` says so).
"""
from __future__ import annotations

from collections import Counter

COMPONENTS = ("embedding", "attention", "mlp", "shared_experts", "router", "experts", "norms", "output_layer")
EXPERT = "experts"  # the only component sharded over expert data parallelism


def _t(m) -> dict:
    return m.transformer


def _norm(m, size: int) -> int:
    return size * (2 if _t(m).get("normalization") == "LayerNorm" else 1)


def _linear(m, rows: int, cols: int, split_rows: int = 1, split_cols: int = 1, bias: bool = False) -> int:
    """Weight [rows / split_rows, cols / split_cols] (+ its bias: split with the rows, whole for a
    row-parallel linear)."""
    return rows // split_rows * (cols // split_cols) + (rows // split_rows if bias else 0)


def attention(m, tp: int, spec: str) -> int:
    t = _t(m)
    h, a = t["hidden_size"], t["num_attention_heads"]
    bias = bool(t.get("add_bias_linear"))
    if m.mla:
        dn, dr, dv = t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"]
        down = 1 if spec == "te" else tp  # TELinear "duplicated" vs the local ColumnParallelLinear
        rq, rkv = t.get("q_lora_rank"), t["kv_lora_rank"]
        q = (_linear(m, rq, h, down) + _norm(m, rq) + _linear(m, a * (dn + dr), rq, tp) if rq
             else _linear(m, a * (dn + dr), h, tp))
        kv = _linear(m, rkv + dr, h, down) + _norm(m, rkv) + _linear(m, a * (dn + dv), rkv, tp)
        return q + kv + _linear(m, h, a * dv, split_cols=tp)
    g, d = t.get("num_query_groups") or a, t.get("kv_channels") or h // a
    qkv = _linear(m, (a + 2 * g) * d, h, tp, bias=bias or bool(t.get("add_qkv_bias")))
    out = _linear(m, h, a * d, split_cols=tp) + (h if bias else 0)
    qk_norm = 2 * _norm(m, d) if t.get("qk_layernorm") else 0
    sinks = a // tp if t.get("softmax_type") == "learnable" else 0
    return qkv + out + qk_norm + sinks


def mlp(m, ffn: int, split: int) -> int:
    """A (gated) MLP of hidden size ``ffn`` split ``split`` ways (fc1 by rows, fc2 by columns)."""
    t = _t(m)
    h, bias = t["hidden_size"], bool(t.get("add_bias_linear"))
    fc1 = _linear(m, (2 if t.get("gated_linear_unit") else 1) * ffn, h, split, bias=bias)
    return fc1 + _linear(m, h, ffn, split_cols=split) + (h if bias else 0)


def layer_params(m, layer: int, tp: int, ep: int, etp: int, spec: str) -> Counter:
    """Parameters of decoder layer ``layer`` (global, 0-based) on one rank, by component."""
    t = _t(m)
    h = t["hidden_size"]
    c = Counter(attention=attention(m, tp, spec), norms=2 * _norm(m, h))
    if layer not in m.moe_layers:
        c["mlp"] = mlp(m, t["ffn_hidden_size"], tp)
        return c
    E, f = m.num_experts, t.get("moe_ffn_hidden_size") or t["ffn_hidden_size"]
    c["router"] = E * h + (E if t.get("add_bias_linear") else 0)
    c[EXPERT] = E // ep * mlp(m, f, etp)
    if t.get("moe_shared_expert_intermediate_size"):
        c["shared_experts"] = mlp(m, t["moe_shared_expert_intermediate_size"], tp)
        c["router"] += h if t.get("moe_shared_expert_gate") else 0
    return c


def rank_params(m, lay, spec: str, stage: int) -> Counter:
    """Parameters one rank of pipeline stage ``stage`` holds, by component (``COMPONENTS``)."""
    h = _t(m)["hidden_size"]
    c = Counter({k: 0 for k in COMPONENTS})
    for layer in lay.stage_layers[stage]:
        c.update(layer_params(m, layer, lay.tp, lay.ep, lay.etp, spec))
    rows = m.padded_vocab_size // lay.tp * h
    if stage == 0:
        c["embedding"] += rows
    if stage == lay.pp - 1:
        c["norms"] += _norm(m, h)
        # tied embeddings: the last stage keeps its own copy of the word embeddings when pp > 1
        c["output_layer"] += rows if (not m.tie_embeddings or lay.pp > 1) else 0
    return c


def model_params(m) -> tuple[int, int]:
    """(total, active per token) parameters of the whole model; active counts top-k of the routed
    experts and the output layer (the embedding is a lookup), as FLOP counts use it."""
    t, h = _t(m), _t(m)["hidden_size"]
    total = active = 0
    for layer in range(m.num_layers):
        c = layer_params(m, layer, 1, 1, 1, "local")
        total += sum(c.values())
        routed = c.get(EXPERT, 0)
        active += sum(c.values()) - routed + (routed * t["moe_router_topk"] // m.num_experts if routed else 0)
    vocab = m.padded_vocab_size * h
    total += vocab * (1 if m.tie_embeddings else 2) + _norm(m, h)
    return total, active + vocab + _norm(m, h)


def hook_note(m) -> str:
    """A warning when the family adjusts MCore's layer spec (modules these formulas do not know)."""
    from mapping.registry import FAMILIES

    family = FAMILIES.get(m.family)
    if family is not None and family.layer_spec is not None:
        return (f"{m.family} adjusts Megatron-Core's layer spec; parameter counts follow the config fields and leave "
                "out modules only the hook adds (Gemma 3: two hidden-size norms per layer)")
    return ""
