"""Shared by the weight-sync tests and their torchrun workers: an in-memory engine that records
what a sync delivers, and an engine wrapper that withholds one tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rl.rollout.base import RolloutEngine, UpdateReport, WeightUpdateError


class CollectingEngine(RolloutEngine):
    """Keeps a copy of every tensor it is sent and the byte size of every bucket; checks names
    against the announced list like a real engine would."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.buckets: list[list[tuple[str, int]]] = []
        self.expected = None

    def generate(self, prompts, sampling):
        raise NotImplementedError

    def prompt_logprobs(self, sequences):
        raise NotImplementedError

    def begin_weight_update(self, expected=None):
        self.tensors, self.buckets = {}, []
        self.expected = set(expected) if expected is not None else None

    def load_weights(self, bucket):
        self.buckets.append([(n, t.numel() * t.element_size()) for n, t in bucket])
        for n, t in bucket:
            if n in self.tensors:
                raise WeightUpdateError(f"{n} sent twice")
            self.tensors[n] = t.detach().clone()

    def finish_weight_update(self):
        if self.expected is not None and (missing := self.expected - set(self.tensors)):
            raise WeightUpdateError(f"never received: {sorted(missing)}")
        return UpdateReport(len(self.tensors), sum(t.nbytes for t in self.tensors.values()), 0, 0.0)

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(out))
        out.with_suffix(".buckets.json").write_text(json.dumps(self.buckets))


class Withholding(RolloutEngine):
    """Forwards everything to ``inner`` except the tensor called ``name`` (a lossy transport)."""

    def __init__(self, inner: RolloutEngine, name: str):
        self.inner, self.name, self.dtype = inner, name, inner.dtype

    def generate(self, prompts, sampling):
        return self.inner.generate(prompts, sampling)

    def prompt_logprobs(self, sequences):
        return self.inner.prompt_logprobs(sequences)

    def begin_weight_update(self, expected=None):
        self.inner.begin_weight_update(expected)

    def load_weights(self, bucket):
        self.inner.load_weights([(n, t) for n, t in bucket if n != self.name])

    def finish_weight_update(self):
        return self.inner.finish_weight_update()

    def abort_weight_update(self):
        self.inner.abort_weight_update()


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def mcore_checkpoint(family: str, dtype: str, root: Path) -> tuple[Path, Path]:
    """(HF dir, hf2mcore output) of the cached tiny ``family`` checkpoint, converted into root."""
    from convert import hf2mcore
    from tools.make_tiny import cached_tiny

    hf = cached_tiny(family, dtype=dtype)
    out = root / f"mcore_{family}_{dtype}"
    if not (out / "latest_checkpointed_iteration.txt").is_file():
        hf2mcore.run(str(hf), str(out), overwrite=True)
    return hf, out
