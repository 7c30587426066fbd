"""Memory per GPU and per node: one trainer rank of each pipeline stage, one rollout-engine GPU, the host.

Trainer bytes per parameter follow Megatron-LM's accounting (``theoretical_memory_usage.py``,
``num_bytes_per_parameter``; docs/user-guide/features/dist_optimizer.md), for what the trainer builds:
Megatron-Core's ``DistributedDataParallel(grad_reduce_in_fp32=True)`` and ``get_megatron_optimizer``:

    bf16 params: 2 (weight) + 4 (fp32 main grad) + 12 (fp32 master, Adam m and v) = 18, or 6 + 12 / d
                 with the distributed optimizer, d = the data-parallel ranks sharing the parameter;
    fp32 params: 4 + 4 + 8 (Adam m and v; the parameter is its own master) = 16, or 8 + 8 / d.

``d`` is dp x cp for dense parameters and the expert data-parallel size world / (ep x etp x pp) for
routed experts, whose weights are also divided by ep x etp (Megatron-LM's estimator ignored EP until
NVIDIA/Megatron-LM#4687; it also plans only the most loaded stage, "1/pp of the layers plus the
embedding", where here every stage is counted from its own layers). ``optim.cpu_offload`` moves
``offload_fraction`` of the optimizer state to the host, with the fp32 gradient shard it steps on.
The rollout engine (vLLM) holds its weights at its own TP (experts split over it too, MLA's latent
projections whole, as ``spec="te"`` counts them) and a KV cache of ``kv_cache_bytes`` or of what
``gpu_memory_utilization`` leaves; MLA caches the latent (kv_lora_rank + rope dim) on every TP rank,
GQA splits its key/value heads. Colocated, vLLM's sleep (``rl.rollout.VLLMEngine.sleep``) frees both while
the trainer trains; level 1 keeps the weights in host memory, level 2 drops them.
Leaves out: NCCL and allocator overheads beyond ``Cluster.reserve_gb`` (trainer) and ``engine_reserve_gb``
(vLLM, its profiled activation peak included); the frozen reference's activations (forward only, one
micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rl.plan import activations as A
from rl.plan import params as P

GB = 1e9


@dataclass(frozen=True)
class Stage:
    """One trainer rank of a pipeline stage (every rank of a stage holds the same)."""
    stage: int
    """pipeline rank"""
    layers: str
    """its decoder layers (global, 0-based), e.g. "3-6" (virtual stages: "0-1,8-9")"""
    params: dict
    """parameters of one rank by component (rl.plan.params.COMPONENTS)"""
    weights: float
    """GB of parameters in the model dtype"""
    grads: float
    """GB of fp32 main gradients (DDP grad_reduce_in_fp32)"""
    optimizer: float
    """GB of optimizer state on the GPU (fp32 master and Adam moments, this rank's shard)"""
    optimizer_host: float
    """GB of optimizer state (and the gradient shard it steps on) moved to the host by optim.cpu_offload"""
    activations: float
    """GB saved for the backward by the micro-batches in flight"""
    recompute: float
    """GB a full-recompute chunk needs again during the backward"""
    logits: float
    """GB of the last stage's logits and log-softmax terms (one micro-batch)"""
    routing: float
    """GB of R3 replayed expert indices for the micro-batches in flight"""
    reference: float
    """GB of the frozen reference model's weights (loss.kl_coef > 0 or run.log_kl)"""
    sync: float
    """GB of live-sync receive buffers (rl.sync: within 2 x rollout.bucket_bytes)"""
    train: float
    """GB on the GPU while training (with Cluster.reserve_gb)"""
    generate: Optional[float]
    """colocated: GB on the GPU while vLLM generates (trainer residue + engine); None when disaggregated"""
    host: float
    """GB of host memory for this rank (offloads, its copy of the step's batch, process)"""


@dataclass(frozen=True)
class Engine:
    """One GPU of a rollout engine (vLLM)."""
    tp: int
    """vLLM tensor parallel size"""
    engines: int
    """engine replicas"""
    weights: float
    """GB of weights on one engine GPU"""
    kv_cache: float
    """GB of KV cache on one engine GPU"""
    kv_tokens: int
    """tokens the KV cache holds"""
    full_sequences: int
    """max_model_len sequences the KV cache holds at once"""
    total: float
    """GB on one engine GPU while generating (with the sync bucket and Cluster.engine_reserve_gb)"""
    sleep_frees: float
    """colocated: GB vLLM's sleep frees on the GPU (its weights and KV cache)"""


def bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """(weight, main grad, optimizer state) bytes of one parameter (module docstring)."""
    return (2, 4, 12) if dtype == "bf16" else (4, 4, 8)


def stage_layers_text(layers: tuple) -> str:
    runs, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            runs.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(runs) or "-"


def trainer_stage(cfg, m, lay, r: int, cl, engine: Engine, batch_bytes: float, micro_batches: int) -> Stage:
    """Stage ``r``'s memory (module docstring; activations: rl.plan.activations)."""
    s, o = cfg.model, cfg.optim
    counts = P.rank_params(m, lay, s.spec, r)
    expert = counts[P.EXPERT]
    dense = sum(counts.values()) - expert
    w, g, opt = bytes_per_param(s.dtype)
    weights, grads = (dense + expert) * w, (dense + expert) * g
    shards = (dense / lay.dense_dp + expert / lay.expert_dp) if o.distributed else dense + expert
    moved = o.offload_fraction if o.cpu_offload else 0.0
    optimizer = shards * opt * (1 - moved)
    optimizer_host = shards * (opt + g) * moved
    seq = min(cfg.rollout.max_model_len, cfg.data.max_prompt_tokens + cfg.rollout.max_tokens)
    sp = s.tp if (s.tp > 1 and m.num_experts) else 1
    tok = A.Tokens(n=cfg.run.micro_batch_size * seq // s.cp, elem=w, tp=s.tp, sp=sp, etp=lay.etp, spec=s.spec,
                   imbalance=cl.moe_imbalance)
    flight = A.in_flight(r, lay.pp, lay.vpp, micro_batches)
    layers = lay.stage_layers[r]
    act, work = A.stage_bytes(m, layers, tok, s.recompute, s.recompute_method, s.recompute_num_layers,
                              s.recompute_modules, flight)
    logits = A.logits_bytes(m, tok) if r == lay.pp - 1 else 0.0
    routing = A.routing_bytes(m, layers, tok) * flight if cfg.rollout.routing_replay else 0.0
    reference = (dense + expert) * w if (cfg.loss.kl_coef > 0 or cfg.run.log_kl) else 0.0
    sync = 2 * cfg.rollout.bucket_bytes
    reserve = cl.reserve_gb * GB
    train = weights + grads + optimizer + act + work + logits + routing + reference + sync + reserve
    generate = None
    resident = weights + grads + optimizer + reference
    if cfg.ray.mode == "colocated":
        generate = (0.0 if cl.offload_during_rollout else resident) + reserve + engine.total * GB
    host = optimizer_host + batch_bytes + cl.host_process_gb * GB
    host += resident if (cl.offload_during_rollout and cfg.ray.mode == "colocated") else 0.0
    return Stage(stage=r, layers=stage_layers_text(layers), params=dict(counts), weights=weights / GB,
                 grads=grads / GB, optimizer=optimizer / GB, optimizer_host=optimizer_host / GB,
                 activations=act / GB, recompute=work / GB, logits=logits / GB, routing=routing / GB,
                 reference=reference / GB, sync=sync / GB, train=train / GB,
                 generate=None if generate is None else generate / GB, host=host / GB)


def engine_bytes_per_elem(dtype: str) -> int:
    return 4 if dtype in ("float32", "fp32") else 2


def engine_weights(m, tp: int, elem: int) -> float:
    """Bytes of weights on one GPU of a vLLM engine at tensor parallel size ``tp``."""
    t = m.transformer
    h, a = t["hidden_size"], t["num_attention_heads"]
    n = sum(sum(P.layer_params(m, i, tp, 1, tp, "te").values()) for i in range(m.num_layers))
    n += m.padded_vocab_size // tp * h * (1 if m.tie_embeddings else 2) + h
    if not m.mla:  # vLLM replicates key/value heads when tp exceeds them
        g, d = t.get("num_query_groups") or a, t.get("kv_channels") or h // a
        n += 2 * d * h * m.num_layers * (-(-g // tp) - g / tp)
    return n * elem


def kv_bytes_per_token(m, tp: int, elem: int) -> float:
    """KV-cache bytes per token on one engine GPU."""
    t = m.transformer
    if m.mla:
        return (t["kv_lora_rank"] + t["qk_pos_emb_head_dim"]) * m.num_layers * elem
    a = t["num_attention_heads"]
    g, d = t.get("num_query_groups") or a, t.get("kv_channels") or t["hidden_size"] // a
    return 2 * -(-g // tp) * d * m.num_layers * elem


def auto_rollout_tp(m, cfg, cl) -> int:
    """The smallest power of two whose weight shard leaves a fifth of the engine's memory to the KV cache
    (with rollout.kv_cache_bytes: whose weights and that cache fit on the GPU)."""
    elem, r = engine_bytes_per_elem(cfg.rollout.dtype), cfg.rollout
    room = (cl.gpu_gb - cl.engine_reserve_gb) * GB - r.bucket_bytes - r.kv_cache_bytes if r.kv_cache_bytes else \
        0.8 * engine_budget(cfg, cl, 0.0)
    tp = 1
    while tp < 256 and engine_weights(m, tp, elem) > room:
        tp *= 2
    return tp


def engine_budget(cfg, cl, weights: float) -> float:
    """Bytes vLLM may fill with weights and KV cache on one GPU."""
    r = cfg.rollout
    if r.kv_cache_bytes:
        return weights + r.kv_cache_bytes
    return (r.gpu_memory_utilization * cl.gpu_gb - cl.engine_reserve_gb) * GB


def engine(m, cfg, cl, tp: int, engines: int) -> Engine:
    r = cfg.rollout
    elem = engine_bytes_per_elem(r.dtype)
    weights = engine_weights(m, tp, elem)
    kv = max(0.0, engine_budget(cfg, cl, weights) - weights)
    tokens = int(kv // kv_bytes_per_token(m, tp, elem))
    total = weights + kv + r.bucket_bytes + cl.engine_reserve_gb * GB
    return Engine(tp=tp, engines=engines, weights=weights / GB, kv_cache=kv / GB, kv_tokens=tokens,
                  full_sequences=tokens // r.max_model_len, total=total / GB,
                  sleep_frees=(weights + kv) / GB if cfg.ray.mode == "colocated" else 0.0)


def batch_bytes(cfg, m) -> float:
    """One trainer process's copy of a step's batch (rl.batch: tokens, masks, log-probs, R3 routes)."""
    rows = cfg.data.prompts_per_step * cfg.rollout.n
    seq = min(cfg.rollout.max_model_len, cfg.data.max_prompt_tokens + cfg.rollout.max_tokens)
    per_token = 8 + 1 + 4 * 4   # token ids; loss mask; old, rollout, reference log-probs, entropy
    if cfg.rollout.routing_replay and m.num_experts:
        per_token += m.num_layers * m.transformer["moe_router_topk"] * (1 if m.num_experts <= 256 else 2)
    return rows * seq * per_token


def micro_batches(cfg) -> int:
    """Micro-batches of one optimizer step on one data-parallel rank."""
    rows = cfg.data.prompts_per_step * cfg.rollout.n // cfg.run.mini_batches
    per_rank = -(-rows // cfg.model.dp)
    return max(1, -(-per_rank // cfg.run.micro_batch_size))
