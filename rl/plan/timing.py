"""A step-time estimate from peak figures and stated efficiencies (``rl.plan.assume.Speed``), so a
reader sees which half of a GRPO step dominates: generating, or training.

Rollout (per engine; the step's samples split evenly over the engines):
  prefill  2 x active params x prompt tokens (prefix caching: once per prompt, not per sample), at
           ``prefill_mfu`` of the engine GPUs' peak;
  decode   memory-bound: every step reads the engine GPU's weights (the dense part, and the routed
           experts the step's tokens touch: 1 - (1 - k/E)^c of them for c sequences) plus the KV cache of
           the c running sequences, at ``rollout_mbu`` of the bandwidth; c is capped by the KV cache,
           ``max_num_seqs`` and the samples; a compute floor of 2 x active params per token applies.
Training (FLOPs after Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters"): a forward is 2 x active params per token (output layer included) plus causal attention,
a x (d_qk + d_v) x S per token and layer for sequences of S tokens; training is 3 forwards, plus one with
full recompute; the old log-prob pass (always), the reference pass (KL) and R3's no-replay pass are one
forward each; time = FLOPs / (trainer GPUs x peak x ``train_mfu``), stretched by the 1F1B bubble
(1 + (pp - 1) / (vpp x micro-batches)).
CPU-offloaded optimizer: each optimizer step moves 28 bytes per host-held parameter (read gradient, read
and write master, m, v) at ``host_optimizer_gbs``.
Sync: the policy's weights in the engine dtype at ``sync_gbs``.
Step: colocated (or synchronous) runs the parts one after the other; ``rollout.async_generation`` on
separate GPUs overlaps generation with training, so the step is the longer of the two.
Leaves out: the long tail of a batch's longest responses, dynamic-sampling extra rounds (up to
``sampling.max_extra_rounds`` more rollouts), communication beyond the stated efficiencies.
"""
from __future__ import annotations

from rl.plan import memory as M
from rl.plan import params as P

TFLOP = 1e12


def lengths(cfg, sp) -> tuple[int, int]:
    """(mean prompt, mean response) tokens."""
    prompt = sp.prompt_tokens or max(1, cfg.data.max_prompt_tokens // 2)
    return prompt, sp.response_tokens or max(1, cfg.rollout.max_tokens // 2)


def attention_flops_per_token(m, seq: float) -> float:
    t = m.transformer
    a = t["num_attention_heads"]
    if m.mla:
        dqk, dv = t["qk_head_dim"] + t["qk_pos_emb_head_dim"], t["v_head_dim"]
    else:
        dqk = dv = t.get("kv_channels") or t["hidden_size"] // a
    return a * (dqk + dv) * seq * m.num_layers


def rollout_seconds(m, cfg, sp, eng: M.Engine, active: int) -> dict:
    prompt, response = lengths(cfg, sp)
    samples = cfg.data.prompts_per_step * cfg.rollout.n
    per_engine = -(-samples // eng.engines)
    c = max(1, min(sp.max_num_seqs, per_engine, eng.kv_tokens // (prompt + response) or 1))
    elem = M.engine_bytes_per_elem(cfg.rollout.dtype)
    weights = eng.weights * M.GB
    routed = 0.0
    if m.num_experts:
        per_layer = P.mlp(m, m.transformer.get("moe_ffn_hidden_size"), eng.tp) * m.num_experts * elem
        routed = per_layer * len(m.moe_layers)
        touched = 1 - (1 - m.transformer["moe_router_topk"] / m.num_experts) ** c
        weights = weights - routed + routed * touched
    kv = c * (prompt + response / 2) * M.kv_bytes_per_token(m, eng.tp, elem)
    step = max((weights + kv) / (sp.hbm_tbs * TFLOP * sp.rollout_mbu),
               2 * active * c / eng.tp / (sp.gpu_tflops * TFLOP * sp.prefill_mfu))
    waves = -(-per_engine // c)
    decode = waves * response * step
    prompts = -(-cfg.data.prompts_per_step // eng.engines)
    prefill = 2 * active * prompts * prompt / (eng.tp * sp.gpu_tflops * TFLOP * sp.prefill_mfu)
    total = prefill + decode
    return {"seconds": total, "prefill_s": prefill, "decode_s": decode, "concurrent_sequences": c,
            "tokens_per_s": samples * response / total}


def train_seconds(m, cfg, sp, lay, world: int, active: int, micro_batches: int) -> dict:
    prompt, response = lengths(cfg, sp)
    seq = prompt + response
    tokens = cfg.data.prompts_per_step * cfg.rollout.n * seq
    forward = tokens * (2 * active + attention_flops_per_token(m, seq))
    train = 3 + (1 if cfg.model.recompute == "full" else 0)
    passes = 1 + (1 if cfg.loss.kl_coef > 0 or cfg.run.log_kl else 0) + (1 if cfg.rollout.routing_replay else 0)
    bubble = 1 + (lay.pp - 1) / ((lay.vpp or 1) * micro_batches)
    rate = world * sp.gpu_tflops * TFLOP * sp.train_mfu
    t_train = forward * train * cfg.run.ppo_epochs / rate * bubble
    t_logprobs = forward * passes / rate * bubble
    return {"seconds": t_train + t_logprobs, "train_s": t_train, "logprobs_s": t_logprobs,
            "flops": forward * (train * cfg.run.ppo_epochs + passes), "tokens": tokens}


def step(m, cfg, sp, lay, eng: M.Engine, micro_batches: int, host_gb: float) -> dict:
    """``host_gb``: the largest rank's offloaded optimizer state (16 bytes per parameter: 28 moved per step)."""
    total, active = P.model_params(m)
    roll = rollout_seconds(m, cfg, sp, eng, active)
    train = train_seconds(m, cfg, sp, lay, lay.world, active, micro_batches)
    steps = cfg.run.ppo_epochs * cfg.run.mini_batches
    train["host_optimizer_s"] = host_gb / 16 * 28 / sp.host_optimizer_gbs * steps
    train["seconds"] += train["host_optimizer_s"]
    sync = total * M.engine_bytes_per_elem(cfg.rollout.dtype) / (sp.sync_gbs * 1e9)
    overlapped = cfg.rollout.async_generation and cfg.ray.mode == "disaggregated"
    trainer_side = train["seconds"] + sync
    seconds = max(roll["seconds"], trainer_side) if overlapped else roll["seconds"] + trainer_side
    return {"seconds": seconds, "rollout": roll, "train": train, "sync_s": sync, "overlapped": overlapped,
            "dominant": "rollout" if roll["seconds"] >= trainer_side else "training and weight sync"}
