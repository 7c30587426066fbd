"""The `rollout` section of the trainer's configuration (rl.config): the engine, sampling, and the
rollout-side switches (routing replay, one-step-ahead generation).
Leaves out: checks that need other sections (rl.config.TrainConfig does those).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutSection:
    engine: str = "vllm"
    """"vllm" (rl.rollout.VLLMEngine) or "transformers" (rl.rollout.hf_engine: no vLLM, fast start, slow
    sampling; for tests and debugging); both get the live weight sync"""
    n: int = 4
    """responses per prompt (the GRPO group size G)"""
    max_tokens: int = 64
    """longest response; longer ones are cut ("length") and count in response_length/clip_ratio"""
    temperature: float = 1.0
    """sampling temperature for training rollouts"""
    top_p: float = 1.0
    """nucleus sampling mass for training rollouts"""
    eval_temperature: float = 0.0
    """temperature for evaluation (0 = greedy, one sample per prompt)"""
    dtype: str = "float32"
    """engine dtype; vLLM-CPU: float32 for GQA models (bf16 hit SIGILL), bfloat16 for MoE"""
    max_model_len: int = 1024
    """engine context length (prompt + response)"""
    kv_cache_bytes: int = 64 << 20
    """engine KV-cache size in bytes (CPU); GPU engines size it by gpu_memory_utilization"""
    gpu_memory_utilization: float = 0.5
    """fraction of GPU memory for the engine when kv_cache_bytes is 0"""
    bucket_bytes: int = 512 << 20
    """weight-sync bucket size"""
    max_prefill_tokens: int = 2048
    """most prompt tokens (n x prompt length, summed) per engine call: vLLM-CPU 0.32's seeded sampling
    breaks when a prefill is split over scheduler steps (beyond its max_num_batched_tokens, 2048)"""
    prefix_caching: bool = True
    """let vLLM reuse a prompt's KV cache across its n samples"""
    routing_replay: bool = False
    """rollout routing replay (R3, rl.routing; MoE only): the engine returns the experts each token was
    routed to and the trainer's routers replay them; logs routing/replay_agreement and the log-prob
    mismatch without replay (an extra forward); vLLM-CPU turns prefix caching off for it"""
    async_generation: bool = False
    """one-step off-policy (rl.pipeline): the engine samples step k+1 while the trainer trains step k
    (timing/overlap_s, train/staleness); needs Ray with ray.mode=disaggregated"""
    max_staleness: int = 1
    """async_generation: most policy versions a trained sample may lag the trainer (>= 1; the one-step
    pipeline gives 1); groups with older samples are dropped (data/stale_groups_dropped)"""
