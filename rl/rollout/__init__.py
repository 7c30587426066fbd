"""Rollout engines: sample responses and take new weights in place.

``base`` holds the contract (``RolloutEngine``, ``SamplingConfig``, ``Sample``); ``vllm_engine``
implements it on vLLM; ``vllm_reload`` runs inside vLLM's worker during weight updates. vLLM is
imported only when a ``VLLMEngine`` is built.
"""
from rl.rollout.base import RolloutEngine, Sample, SamplingConfig, UpdateReport, WeightUpdateError


def __getattr__(name):
    if name in ("VLLMEngine", "VLLMConfig"):
        from rl.rollout import vllm_engine

        return getattr(vllm_engine, name)
    raise AttributeError(name)


__all__ = ["RolloutEngine", "Sample", "SamplingConfig", "UpdateReport", "WeightUpdateError",
           "VLLMEngine", "VLLMConfig"]
