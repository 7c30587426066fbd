"""``mcore2hf --dtype fp8``: write DeepSeek's published block-scaled FP8 layout.

The tensors the family's published FP8 checkpoints quantise (``Family.fp8_weights``: DeepSeek-V3's
attention and MLP/expert projections) are written as ``float8_e4m3fn`` plus a float32
``<name>_scale_inv`` of 128 x 128 blocks (``kernels.fp8_block_quant``: scale = block amax / 448,
e4m3 round to nearest even); everything else (embeddings, head, norms, router, expert bias,
MTP's ``eh_proj``) keeps its dtype; config.json gains DeepSeek's ``quantization_config``.

Round trip, as measured by ``tests/test_fp8_export.py`` on a tiny DeepSeek-V3 quantised the way the
published checkpoint is: FP8 -> bf16 (hf2mcore) -> FP8 (here) gives back every e4m3 code; a scale
can differ from the original only by the bf16 rounding of its block's largest value (the bf16
weights hold 448 x scale rounded to bf16), and importing the export again gives bf16 weights within
one bf16 ulp of the MCore weights.

Leaves out: other FP8 recipes (per-tensor, e5m2), MXFP4 export, stacked-expert tensors.
"""
from __future__ import annotations

import re

import torch

from convert.formats import SCALE_SUFFIX
from kernels import fp8_block_quant
from kernels.fp8_reference import scale_shape
from mapping.config_fields import FP8_BLOCK
from mapping.family import ConfigError
from mapping.rules import stacked_slice

BLOCK = FP8_BLOCK["weight_block_size"][0]


class Export:
    """How HF tensors are stored: as planned (this class), or FP8 (``Fp8Export``)."""

    def quantises(self, outputs) -> bool:
        return False

    def specs(self, outputs):
        return list(outputs)

    def write(self, w, name: str, tensor: torch.Tensor) -> None:
        w.write(name, tensor)

    def config(self, cfg: dict) -> dict:
        return cfg


class Fp8Export(Export):
    def __init__(self, family):
        if not family.fp8_weights:
            raise ConfigError(f"--dtype fp8: {family.name} publishes no FP8 layout (only families with "
                              "Family.fp8_weights, e.g. deepseek_v3); export bf16")
        self.pattern = re.compile(family.fp8_weights)

    def _quantised(self, name: str, shape) -> bool:
        return len(shape) == 2 and stacked_slice(name) is None and bool(self.pattern.search(name))

    def quantises(self, outputs) -> bool:
        return any(self._quantised(n, s) for n, s, _ in outputs)

    def specs(self, outputs):
        out = []
        for name, shape, dtype in outputs:
            if self._quantised(name, shape):
                out += [(name, shape, torch.float8_e4m3fn), (name + SCALE_SUFFIX, scale_shape(shape, BLOCK), torch.float32)]
            else:
                out.append((name, shape, dtype))
        return out

    def write(self, w, name: str, tensor: torch.Tensor) -> None:
        if not self._quantised(name, tensor.shape):
            return w.write(name, tensor)
        codes_MN, scale_inv_mn = fp8_block_quant(tensor.to(torch.bfloat16), BLOCK)
        w.write(name, codes_MN)
        w.write(name + SCALE_SUFFIX, scale_inv_mn)

    def config(self, cfg: dict) -> dict:
        return dict(cfg, quantization_config=dict(FP8_BLOCK))


def export_for(dtype: str, family) -> Export:
    """``--dtype``: "auto" (as planned) or "fp8"."""
    if dtype == "fp8":
        return Fp8Export(family)
    if dtype != "auto":
        raise ConfigError(f"--dtype {dtype!r}: expected auto or fp8")
    return Export()
