"""The rollout-engine contract the trainer and the weight sync talk to.

A rollout engine samples responses for token-id prompts and takes new weights in place:

    samples = engine.generate(prompts, SamplingConfig(n=8, max_tokens=512))
    samples[i][j].token_ids, samples[i][j].logprobs, samples[i][j].finish_reason
    samples[i][j].policy_version                  # engine.weight_version when it was sampled
    samples[i][j].routed_experts                  # [prompt + response - 1, layers, top-k] (MoE, on request)
    logp_S = engine.prompt_logprobs([seq])[0]     # log p(seq[t] | seq[:t]) for t >= 1
    engine.begin_weight_update(expected=hf_names)  # then one load_weights call per bucket
    engine.load_weights([(hf_name, tensor), ...])
    report = engine.finish_weight_update()        # raises WeightUpdateError if incomplete
    engine.set_weight_version(step)               # the policy version samples are stamped with

Names are Hugging Face checkpoint names; tensors are full (unsharded) HF tensors in the
engine's dtype. The engine proves completeness itself (``finish_weight_update``): a sync that
misses or repeats a tensor fails, naming it. ``sleep``/``wake`` free and restore accelerator
memory between phases on colocated GPU runs; engines that cannot do that treat them as no-ops.
Every sample carries the engine's ``weight_version`` at the time it was generated (the trainer
sets it after each complete update), so an asynchronous trainer knows how stale a sample is; an
MoE engine asked for it also returns the experts each token was routed to (rollout routing
replay, ``rl.routing``), in vLLM's layout: one row per token the engine computed (prompt and
response, the last sampled token excepted), one column per decoder layer (0 for dense layers), top-k ids.

Leaves out: the implementation (``rl.rollout.vllm_engine``), where tensors come from
(``rl.sync.weight_sync``), tokenisation (prompts arrive as token ids).
Without it the trainer would be written against one engine's API.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (one set for the whole batch)."""
    n: int = 1
    """Responses per prompt (GRPO's group size G)."""
    max_tokens: int = 256
    """Longest response; a response cut here finishes with reason "length"."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 disables it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables it."""
    seed: Optional[int] = None
    """Per-request sampling seed (reproducible rollouts); None draws from the engine's RNG."""
    stop_token_ids: Optional[tuple[int, ...]] = None
    """Tokens that end a response (kept in the output); None = the model's EOS ids."""


@dataclass(frozen=True)
class Sample:
    """One sampled response."""
    token_ids: tuple[int, ...]
    """Response tokens (prompt excluded)."""
    logprobs: tuple[float, ...]
    """Engine log-probability of each response token, same length as ``token_ids``."""
    finish_reason: str
    """"stop" (a stop token was produced) or "length" (``max_tokens`` reached)."""
    policy_version: int = 0
    """The engine's ``weight_version`` when this sample was generated."""
    routed_experts: Optional[np.ndarray] = field(default=None, compare=False)
    """Expert ids [prompt + response - 1, decoder layers, top-k] (vLLM's ``routed_experts`` layout:
    row t is the token at position t of prompt + response; dense layers hold 0); None unless the
    engine was started to return them."""


@dataclass(frozen=True)
class UpdateReport:
    """What one weight update loaded, as proven by the engine."""
    tensors: int
    """HF tensors received."""
    bytes: int
    """Bytes received."""
    engine_params: int
    """Engine parameters refreshed (all of them, or the update would have failed)."""
    seconds: float
    """Wall time from ``begin_weight_update`` to the end of ``finish_weight_update``."""
    fixes: dict = field(default_factory=dict)
    """Engine-specific repairs applied around the reload (name -> modules touched)."""


class WeightUpdateError(RuntimeError):
    """A weight update did not refresh every engine parameter exactly once."""


class RolloutEngine(abc.ABC):
    """Sampling plus in-place weight updates; see the module docstring."""

    dtype: torch.dtype
    """Dtype the engine computes in; the weight sync casts to it."""
    weight_version: int = 0
    """Policy version of the weights loaded (0: the start-up checkpoint); stamped on every sample."""

    def set_weight_version(self, version: int) -> None:
        """Record which policy version the weights just loaded are (after a complete update)."""
        self.weight_version = int(version)

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        """``sampling.n`` samples for each prompt, in prompt order."""

    @abc.abstractmethod
    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """For each sequence a float32 tensor [S - 1]: log p(seq[t] | seq[:t]), t = 1..S-1."""

    @abc.abstractmethod
    def begin_weight_update(self, expected: Optional[Iterable[str]] = None) -> None:
        """Start an update; ``expected`` (HF names) lets the engine name what never arrived."""

    @abc.abstractmethod
    def load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of (HF name, full tensor) pairs into the running model.

        Returns holding no reference to the bucket's tensors: the sender reuses their storage
        for the next bucket (rl.sync.weight_sync), so whatever the engine keeps past this call (say
        a piece of a layer whose other pieces arrive later) it copies first.
        """

    @abc.abstractmethod
    def finish_weight_update(self) -> UpdateReport:
        """Prove every parameter was refreshed once and finish; else raise WeightUpdateError."""

    def abort_weight_update(self) -> None:
        """Give up the update in progress, if any (the sender failed); must not raise otherwise."""

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                       expected: Optional[Iterable[str]] = None) -> UpdateReport:
        """One-shot update from an iterable of (HF name, tensor)."""
        self.begin_weight_update(expected)
        self.load_weights(list(weights))
        return self.finish_weight_update()

    def set_lora(self, tensors: dict[str, torch.Tensor], config: dict, version: int) -> int:
        """Serve a LoRA adapter (PEFT names and adapter_config.json fields) on the loaded base weights from
        now on, as policy `version`; returns the bytes taken. Engines without LoRA raise."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve LoRA adapters")

    def sleep(self) -> None:
        """Release accelerator memory between rollout phases (no-op where unsupported)."""

    def wake(self) -> None:
        """Undo ``sleep`` (no-op where unsupported)."""

    def close(self) -> None:
        """Release the engine."""


def eos_token_ids(model_dir: Path) -> tuple[int, ...]:
    """EOS ids from generation_config.json, else config.json (int or list); () if neither says."""
    import json

    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()
