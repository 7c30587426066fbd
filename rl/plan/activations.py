"""Activation memory of the training forward: bytes saved for the backward pass, per decoder layer and
per token of one rank, and what one pipeline stage holds at its peak.

Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Table 2 (34·s·b·h + 5·a·s²·b bytes per layer, no parallelism), the accounting Megatron-LM's
``theoretical_memory_usage.py`` implements. Each term is a tensor the backward pass needs; adapted here:

* dropout is 0 in RL (``hidden_dropout = attention_dropout = 0``): no dropout masks;
* core attention is flash attention (TE, or torch SDPA under the local spec): it keeps q, k, v, its
  output and a float32 log-sum-exp per head, no s² probabilities. Under TE the fused qkv output stays
  alive (v is a view into it) next to the rotated q and k; the local spec
  (``runtime.modules.SDPACoreAttention``) repeats GQA's k and v to every head, and those copies are kept;
* norms: TE keeps the input and a float32 rstd; torch's norms (local spec) keep float32 copies, 8 bytes
  per element (measured with autograd's saved-tensor hooks on CPU);
* MLA: its latents and their norms (small), the up-projected q, k and the kv up-projection (v views it);
* gated MLPs (SwiGLU): fc1's input, its 2f output, fc2's f-wide input, plus the SiLU output when unfused
  (local spec);
* MoE: the router's float32 logits and scores; per routed copy (top-k of each token, every ETP rank
  sees it) the permuted input and the expert MLP's internals split over ETP; MCore 0.16 multiplies the
  routing probability in before fc2, which keeps the unscaled activation once more when unfused;
  ``moe_imbalance`` scales the routed part for uneven expert loads;
* sequence parallelism (TP > 1 with MoE, as ``runtime.megatron.transformer_config`` sets it) divides
  the norm-side tensors by TP; without it they are whole on every TP rank.
Recompute: ``full`` keeps one layer input per checkpointed chunk plus, during the backward, one chunk's
full activations; ``selective`` drops the listed modules' internals (MCore's ``recompute_modules``).
Pipeline stage ``r`` of a 1F1B schedule holds ``min(pp - r, micro-batches)`` micro-batches; virtual
stages multiply that by Megatron-LM's interleaving penalty ``1 + (pp - 1) / (pp * vpp)``. The last
stage adds its final norm and the logits of one micro-batch at their peak, the backward of ``rl.logprobs``'
log-softmax and entropy: the float32 shifted logits and exponentials it saved and three float32 gradients of
the same size, 20 bytes per logit (measured on CPU; the forward peaks lower: the logits and three float32
copies). These are estimates: kernels may keep more or less (``tests/test_rl_plan.py`` compares the whole
trainer plan with a CPU run's peak RSS).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tokens:
    """One micro-batch as one rank sees it."""
    n: int
    """tokens of the micro-batch on this rank (rows x padded length / cp)"""
    elem: int
    """bytes per activation element (2 for bf16, 4 for fp32)"""
    tp: int
    """tensor parallel size (head-split tensors are divided by it)"""
    sp: int
    """sequence-parallel divisor of the norm-side tensors (tp with sequence parallelism, else 1)"""
    etp: int
    """expert tensor parallel size"""
    spec: str
    """"te" or "local" (the local spec's attention repeats GQA's k and v)"""
    imbalance: float
    """routed tokens per rank relative to an even spread"""


def norm(k: Tokens, width: float) -> float:
    """Bytes per token a norm over ``width`` elements keeps: TE keeps its input and a float32 rstd; torch's
    RMSNorm/LayerNorm (the local spec) upcasts and keeps float32 copies, 8 bytes per element (measured)."""
    return width * 8 if k.spec == "local" else width * k.elem + 4


def attention(m, k: Tokens, drop: frozenset) -> float:
    """Bytes per token saved by one attention block (its input norm included)."""
    t, e = m.transformer, k.elem
    h, a = t["hidden_size"], t["num_attention_heads"]
    out = norm(k, h / k.sp) + (e * h / k.sp if "layernorm" not in drop else 0)  # norm; its output (linear input)
    lse = 4 * a / k.tp if "core_attn" not in drop else 0
    if m.mla:
        dn, dr, dv, rq, rkv = (t["qk_head_dim"], t["qk_pos_emb_head_dim"], t["v_head_dim"], t.get("q_lora_rank") or 0,
                               t["kv_lora_rank"])
        latents = norm(k, rq) + e * rq + norm(k, rkv) + e * (rkv + dr)  # q and kv latents, their norms
        up = e * a * (2 * (dn + dr) + (dn + dv)) / k.tp if "mla_up_proj" not in drop else 0  # q, k, kv_up out
        return out + latents + up + e * a * dv / k.tp + lse
    g, d = t.get("num_query_groups") or a, t.get("kv_channels") or h // a
    if k.spec == "local":   # q, and k and v repeated to every head, feed torch SDPA
        qkv = e * 3 * a * d / k.tp
    else:                   # the fused qkv output (v is a view into it) and the rotated q and k
        qkv = e * ((a + 2 * g) * d + (a + g) * d) / k.tp
    qk_norm = 0.0
    if t.get("qk_layernorm"):  # local: float32 copies of q and k; TE's norms read the qkv buffer, add an rstd
        qk_norm = 8 * (a + g) * d / k.tp if k.spec == "local" else 4 * (a + g) / k.tp
    return out + qkv + qk_norm + e * a * d / k.tp + lse


def mlp(m, k: Tokens, ffn: float, drop: bool) -> float:
    """Bytes per token of an MLP's internals at (local) hidden size ``ffn``: a gated one keeps fc1's 2f
    output and the f-wide input of fc2 (TE's fused SwiGLU), plus the SiLU output unfused (local spec)."""
    if drop:
        return 0.0
    gated = m.transformer.get("gated_linear_unit")
    return k.elem * ffn * ((3 if gated else 2) + (1 if k.spec == "local" else 0))


def layer(m, idx: int, k: Tokens, recompute_modules: tuple) -> float:
    """Bytes per token decoder layer ``idx`` saves (recompute ``none`` or ``selective``)."""
    t, e, drop = m.transformer, k.elem, frozenset(recompute_modules)
    h = t["hidden_size"]
    out = attention(m, k, drop) + norm(k, h / k.sp)
    norm_out = e * h / k.sp if "layernorm" not in drop else 0
    if idx not in m.moe_layers:
        return out + norm_out + mlp(m, k, t["ffn_hidden_size"] / k.tp, "mlp" in drop)
    if "moe" in drop:
        return out
    E, topk = m.num_experts, t["moe_router_topk"]
    f = (t.get("moe_ffn_hidden_size") or t["ffn_hidden_size"]) / k.etp
    copies = topk * k.etp * k.imbalance / k.sp     # routed copies of each local token this rank computes
    # per copy: the permuted input (fc1's), the MLP's internals; MCore 0.16 applies the routing probability
    # inside the expert (before fc2), so the local spec keeps the unscaled activation once more
    act = mlp(m, k, f, False) + (e * f if k.spec == "local" else 0) - (e * f if "moe_act" in drop else 0)
    routed = copies * (e * h + act)
    router = 8 * E / k.sp                           # float32 logits and scores
    shared = 0
    if t.get("moe_shared_expert_intermediate_size"):
        shared = mlp(m, k, t["moe_shared_expert_intermediate_size"] / k.tp, "shared_experts" in drop)
    return out + norm_out + router + routed + shared


def stage_bytes(m, layers: tuple, k: Tokens, recompute: str, method: str, num_layers: int,
                modules: tuple, in_flight: float) -> tuple[float, float]:
    """(bytes held for the backward by ``in_flight`` micro-batches, extra working set of a recompute)."""
    per = [layer(m, i, k, modules if recompute == "selective" else ()) * k.n for i in layers]
    boundary = k.elem * m.transformer["hidden_size"] / k.sp * k.n   # a checkpointed chunk's input
    if recompute != "full" or not per:
        return sum(per) * in_flight, 0.0
    if method == "block":
        kept = sum(per[num_layers:]) + boundary * min(num_layers, len(per))
        return kept * in_flight, max(per[:num_layers], default=0.0)
    chunks = -(-len(per) // num_layers)
    work = max(sum(per[i:i + num_layers]) for i in range(0, len(per), num_layers))
    return boundary * chunks * in_flight, work


def logits_bytes(m, k: Tokens) -> float:
    """The last stage's final norm and logits of one micro-batch at the backward of the log-softmax."""
    return k.n * (norm(k, m.transformer["hidden_size"] / k.sp) + m.padded_vocab_size / k.tp * 20)


def in_flight(stage: int, pp: int, vpp, micro_batches: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at once (1F1B; interleaved penalty)."""
    held = min(pp - stage, micro_batches)
    return held * (1 + (pp - 1) / (pp * vpp)) if vpp else held


def routing_bytes(m, layers: tuple, k: Tokens) -> float:
    """R3: the replayed expert indices (int64, top-k) of one micro-batch for this stage's MoE layers."""
    moe = sum(1 for i in layers if i in m.moe_layers)
    return moe * k.n / k.sp * m.transformer.get("moe_router_topk", 0) * 8

