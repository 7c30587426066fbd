"""Public MXFP4 entry point: dequantise gpt-oss expert weights (``*_blocks`` + ``*_scales``) to bf16.

``mxfp4_dequant(blocks, scales, layout="transformers")`` takes the two uint8 tensors exactly as
gpt-oss checkpoints store them (``blocks [*P, R, G, 16]``, ``scales [*P, R, G]``) and returns bf16:

- ``layout="transformers"``: ``[*P, 32 G, R]``, bit for bit what transformers'
  ``convert_moe_packed_tensors`` returns for 4-D input (``gate_up_proj [E, H, 2I]``), except for
  the scale byte 255 (NaN here, as the OCP MX spec says; see ``kernels.mxfp4_reference``);
- ``layout="rows"``: ``[*P, R, 32 G]``, the stored row order = ``[E, out, in]``, what a Linear or
  Megatron expert weight wants; no transpose, ~2x faster on CPU: converters should use it.

``kernels.mxfp4_reference`` is the definition; the implementations, chosen by name from
``DEQUANT_IMPLS`` (default by device, like ``kernels.fp8``), agree with it bit for bit
(tests/test_mxfp4_kernels.py):

- ``"triton"``: CUDA tensors (``kernels.mxfp4_triton``, integer ops only);
- ``"cpu"``: CPU tensors with numba (``kernels.mxfp4_cpu``; 0.2-0.5x torch ``copy_`` for
  ``"transformers"``, 0.5-0.83x for ``"rows"``, see ``tools.bench_dequant --format mxfp4``);
- ``"reference"``: the float64 torch expression, used on CPU without numba.

What this module leaves out: quantisation back to MXFP4 (export), other MX element types.
Without it each caller would reimplement transformers' layout by hand and get the nibble order,
the transposition or the 255 case wrong in one of them.

Shape legend: P = leading (expert) axes, R = rows (output features), G = groups of 32 along the
input features, K = 32 G.
"""
from __future__ import annotations

from typing import Callable

import torch

from kernels.fp8 import default_impl
from kernels.mxfp4_reference import check_mxfp4_args, mxfp4_dequant_reference, mxfp4_out_shape


def _reference(blocks, scales, layout, out):
    result = mxfp4_dequant_reference(blocks, scales, layout)
    return result if out is None else out.copy_(result)


def _cpu(blocks, scales, layout, out):
    from kernels.mxfp4_cpu import mxfp4_dequant_cpu
    return mxfp4_dequant_cpu(blocks, scales, layout, out)


def _triton(blocks, scales, layout, out):
    from kernels.mxfp4_triton import mxfp4_dequant_triton
    return mxfp4_dequant_triton(blocks, scales, layout, out)


DequantFn = Callable[[torch.Tensor, torch.Tensor, str, "torch.Tensor | None"], torch.Tensor]
DEQUANT_IMPLS: dict[str, DequantFn] = {"reference": _reference, "cpu": _cpu, "triton": _triton}


def mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor, layout: str = "transformers", *,
                  out: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """bf16 ``FP4[code] * 2**(scale - 127)`` in ``layout`` (module docstring).

    ``out``: optional contiguous bf16 tensor of the result's shape to write into.
    ``impl``: a key of ``DEQUANT_IMPLS``; default: by the device of ``blocks``.
    """
    check_mxfp4_args(blocks, scales, layout)
    if scales.device != blocks.device:
        raise ValueError(f"mxfp4_dequant: blocks are on {blocks.device} but scales on {scales.device}; "
                         f"move both to one device")
    name = impl or default_impl(blocks.device)
    if name not in DEQUANT_IMPLS:
        raise ValueError(f"mxfp4_dequant: unknown impl {name!r}; choose one of {sorted(DEQUANT_IMPLS)}")
    want = mxfp4_out_shape(tuple(blocks.shape), layout)
    if out is not None and (tuple(out.shape) != want or out.dtype != torch.bfloat16 or not out.is_contiguous()
                            or out.device != blocks.device):
        raise ValueError(f"mxfp4_dequant: out must be a contiguous bf16 tensor of shape {want} on {blocks.device} "
                         f"(layout {layout!r}), got {out.dtype} {tuple(out.shape)} on {out.device}")
    return DEQUANT_IMPLS[name](blocks.contiguous(), scales.contiguous(), layout, out)
