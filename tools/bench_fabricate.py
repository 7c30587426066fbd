"""Fabricate an N-GB checkpoint with a published model's shapes, at about the cost of writing it.

For ``tools.bench_convert --gb N``: the published config.json (``tests/fixtures/published``) with
the layer count that brings the bf16 checkpoint nearest N GB (``sized_config``), its tensor list
and shard plan from ``tools.tiny_weights`` (transformers' meta model, published names), and values
copied file to file from three small random pools (``fabricate``): bf16 N(0, 0.02) for weights,
e4m3 codes (no NaN) for FP8 weights, positive fp32 for block scales and fp32 tensors. Tensors
repeat pool bytes at different starting points; the converters never look at values, only move
them (FP8 dequantisation computes on them, which is what the FP8 benchmark measures).

Leaves out: tokenizer and generation config (conversion does not need them), realistic value
statistics (``tools.make_tiny`` draws per-tensor values, at ~100x the cost per byte).
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from convert.formats import StreamingSafetensors, transformers_config
from kernels.fp8_reference import scale_shape
from tools.shrink import with_depth
from tools.tiny_configs import FP8_QUANTIZATION_CONFIG
from tools.tiny_weights import plan_shards, tensor_specs

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "tests" / "fixtures" / "published"
KINDS = {"dense": "Qwen2.5-7B", "moe": "Qwen3-30B-A3B"}
POOL_BYTES = 64 << 20
SHARD_BYTES = 2_000_000_000
INDEX = "model.safetensors.index.json"


def _with_layers(published: dict, layers: int) -> dict:
    return dict(with_depth(published, layers), torch_dtype="bfloat16")


def _bf16_bytes(cfg: dict) -> int:
    specs = tensor_specs(transformers_config(cfg, torch.bfloat16), torch.bfloat16, False)
    return sum(size for s in specs for _, size in s.stored())


def sized_config(kind: str, gb: float) -> dict:
    """``KINDS[kind]``'s published config.json with the layer count whose bf16 size is nearest ``gb``
    (the stacks are homogeneous, so size is affine in the layer count)."""
    published = json.loads((PUBLISHED / KINDS[kind] / "config.json").read_text())
    one, two = _bf16_bytes(_with_layers(published, 1)), _bf16_bytes(_with_layers(published, 2))
    return _with_layers(published, max(1, 1 + round((gb * 1e9 - one) / (two - one))))


def _pools(where: Path) -> dict:
    """dtype -> an open file of ``POOL_BYTES`` random values of that dtype (deleted on close)."""
    g = torch.Generator().manual_seed(0)
    values = {torch.bfloat16: (0.02 * torch.randn(POOL_BYTES // 2, generator=g)).to(torch.bfloat16),
              torch.float8_e4m3fn: (64 * torch.randn(POOL_BYTES, generator=g)).clamp(-448, 448).to(torch.float8_e4m3fn),
              torch.float32: 1e-4 + 1e-3 * torch.rand(POOL_BYTES // 4, generator=g)}
    pools = {}
    for dtype, t in values.items():
        f = tempfile.TemporaryFile(dir=where)
        f.write(memoryview(t.view(torch.uint8).numpy()))
        f.flush()
        pools[dtype] = f
    return pools


def _ranges(pool, start: int, size: int) -> list[tuple[int, int, int]]:
    """``size`` bytes of ``pool`` from ``start`` on, wrapping around."""
    out, at = [], start % POOL_BYTES
    while size:
        n = min(size, POOL_BYTES - at)
        out.append((pool.fileno(), at, n))
        size, at = size - n, 0
    return out


def _stored(spec) -> list[tuple[str, tuple, torch.dtype]]:
    if not spec.fp8:
        return [(spec.name, spec.shape, spec.dtype)]
    return [(spec.name, spec.shape, torch.float8_e4m3fn),
            (spec.name + "_scale_inv", tuple(scale_shape(spec.shape)), torch.float32)]


def fabricate(cfg: dict, out: Path, fp8: bool = False) -> Path:
    """Write the checkpoint ``cfg`` describes into ``out`` (created): bf16, or DeepSeek's block FP8
    layout (``quantization_config`` added) when ``fp8``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=False)
    cfg = dict(cfg, quantization_config=dict(FP8_QUANTIZATION_CONFIG)) if fp8 else dict(cfg)
    specs = tensor_specs(transformers_config(cfg, torch.bfloat16), torch.bfloat16, fp8)
    plan = plan_shards(specs, SHARD_BYTES)
    pools = _pools(out)
    weight_map, total = {}, 0
    try:
        for k, entries in enumerate(plan, start=1):
            fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
            stored = {name: (shape, dtype) for spec in dict.fromkeys(s for _, _, s in entries)
                      for name, shape, dtype in _stored(spec)}
            layout = [(name, *stored[name]) for name, _, _ in entries]
            with StreamingSafetensors(out / fname, layout) as w:
                for i, (name, shape, dtype) in enumerate(layout):
                    size = math.prod(shape) * dtype.itemsize
                    w.write_copied(name, _ranges(pools[dtype], 4096 * (i * 7919 % 16384), size))
                    weight_map[name] = fname
                    total += size
    finally:
        for f in pools.values():
            f.close()
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
