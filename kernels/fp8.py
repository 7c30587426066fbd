"""Public FP8 entry points: block dequantisation (dispatched by device) and block quantisation.

``fp8_block_dequant(weight, scale_inv, block_size=128)`` turns a DeepSeek FP8 weight
(2-D ``float8_e4m3fn``, any shape, plus fp32 ``scale_inv[ceil(M/B), ceil(N/B)]``) into bf16:
fp32 multiply then round to nearest even, NaN codes (0x7F, 0xFF) -> the bf16 NaN 0x7FC0.
``kernels.fp8_reference`` is the definition; the implementations, chosen by name from
``DEQUANT_IMPLS``, all agree with it bit for bit (tests/test_fp8_kernels.py):

- ``"triton"``: CUDA tensors (``kernels.fp8_triton``; any GPU, no sm89 fp8 type needed);
- ``"cpu"``: CPU tensors when numba is importable (``kernels.fp8_cpu``, 0.4-0.8x torch ``copy_``);
- ``"reference"``: the plain torch expression (~0.015x ``copy_``), used on CPU without numba.

``fp8_block_quant(w, block_size=128)`` is the inverse, DeepSeek's convention: per block,
``scale = amax / 448``, ``fp8 = rne_e4m3(w / scale)``, ``scale_inv = scale`` (all-zero blocks:
scale 1; the full definition, NaN and inf included, is in ``kernels.fp8_reference``). The same
three implementations, by name from ``QUANT_IMPLS``, agree with the reference bit for bit in the
codes and the scales (tests/test_fp8_quant_kernels.py); on CPU numba's reaches 0.36-0.52x
``copy_``, the reference (run slab by slab, 128 rows at a time, to bound its memory) ~0.01x.
Input: bf16 or fp32 as is, fp16/fp64 through ``.float()`` (as the reference does). Non-finite
input raises, found from the scales after quantising (no extra pass over the weight).
Round-trip bound (tested), per element x of a block with scale s:

    |dequant(quant(x)) - x| <= (2**-4 + 2**-8) * |x| + 2**-10 * s

2**-4 is half an e4m3 ulp relative to the value (3 mantissa bits) for |x| >= 2**-6 * s (normal
e4m3 range), 2**-10 * s is half the subnormal spacing 2**-9 (scaled) below it, and 2**-8 is half
a bf16 ulp for the final rounding of the dequantised value. The block's amax element maps to
+-448 and comes back within the bf16 rounding alone. For bf16 input, quantising the bf16
dequantisation again gives the same codes and scales (tested; see the test module for where
that stops holding).

What this module leaves out: other fp8 formats (e5m2), per-tensor or per-channel scales,
non-square blocks. Without it every caller would pick a path by hand and the three would drift.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / B), ceil(N / B); B = block size.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

import torch

from kernels.fp8_reference import fp8_block_dequant_reference, fp8_block_quant_reference, scale_shape


def _reference(w_fp8_MN, scale_inv_mn, block_size, out_MN):
    result = fp8_block_dequant_reference(w_fp8_MN, scale_inv_mn, block_size)
    return result if out_MN is None else out_MN.copy_(result)


def _cpu(w_fp8_MN, scale_inv_mn, block_size, out_MN):
    from kernels.fp8_cpu import fp8_block_dequant_cpu
    return fp8_block_dequant_cpu(w_fp8_MN, scale_inv_mn, block_size, out_MN)


def _triton(w_fp8_MN, scale_inv_mn, block_size, out_MN):
    from kernels.fp8_triton import fp8_block_dequant_triton
    return fp8_block_dequant_triton(w_fp8_MN, scale_inv_mn, block_size, out_MN)


DequantFn = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]
DEQUANT_IMPLS: dict[str, DequantFn] = {"reference": _reference, "cpu": _cpu, "triton": _triton}

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_warned_no_numba = False


def default_impl(device: torch.device) -> str:
    """The implementation the kernels (fp8 dequant/quant, ``kernels.mxfp4``) pick for tensors on ``device``."""
    global _warned_no_numba
    if device.type == "cuda":
        return "triton"
    if device.type != "cpu":
        raise ValueError(f"kernels: no implementation for device {device}; "
                         f"move the tensors to CPU or CUDA")
    if _HAVE_NUMBA:
        return "cpu"
    if not _warned_no_numba:
        warnings.warn("numba is not installed: the FP8 and MXFP4 kernels on CPU use the plain torch references "
                      "(~50x slower). `pip install numba` for the fast CPU paths.", stacklevel=3)
        _warned_no_numba = True
    return "reference"


def _check_dequant_args(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"fp8_block_dequant: weight must be 2-D, got shape {tuple(weight.shape)}; "
                         f"reshape stacked weights to [rows, cols] first")
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_block_dequant: weight dtype is {weight.dtype}, expected torch.float8_e4m3fn "
                        f"(a uint8 tensor of raw codes can be passed as .view(torch.float8_e4m3fn))")
    if not scale_inv.is_floating_point():
        raise TypeError(f"fp8_block_dequant: scale_inv dtype is {scale_inv.dtype}, expected a float type")
    if block_size <= 0:
        raise ValueError(f"fp8_block_dequant: block_size must be positive, got {block_size}")
    want = scale_shape(tuple(weight.shape), block_size)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"fp8_block_dequant: scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                         f"{tuple(weight.shape)} with block {block_size}: expected {want}")


def fp8_block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128, *,
                      out: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """bf16 ``weight * scale_inv`` per ``block_size`` x ``block_size`` block (see module docstring).

    ``out``: optional contiguous bf16 tensor of the weight's shape to write into.
    ``impl``: a key of ``DEQUANT_IMPLS``; default: by the weight's device (``default_impl``).
    """
    _check_dequant_args(weight, scale_inv, block_size)
    name = impl or default_impl(weight.device)
    if name not in DEQUANT_IMPLS:
        raise ValueError(f"fp8_block_dequant: unknown impl {name!r}; choose one of {sorted(DEQUANT_IMPLS)}")
    if out is not None and (out.shape != weight.shape or out.dtype != torch.bfloat16 or not out.is_contiguous()):
        raise ValueError(f"fp8_block_dequant: out must be a contiguous bf16 tensor of shape {tuple(weight.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return DEQUANT_IMPLS[name](weight.contiguous(), scale_inv.to(weight.device), block_size, out)


def _quant_reference(w_MN, block_size, q_MN, scale_mn):
    for bi, r0 in enumerate(range(0, w_MN.shape[0], block_size)):  # a slab at a time: bounded extra memory
        q, s = fp8_block_quant_reference(w_MN[r0:r0 + block_size], block_size)
        q_MN[r0:r0 + block_size] = q
        scale_mn[bi] = s[0]
    return q_MN, scale_mn


def _quant_cpu(w_MN, block_size, q_MN, scale_mn):
    from kernels.fp8_quant_cpu import fp8_block_quant_cpu
    return fp8_block_quant_cpu(w_MN, block_size, q_MN, scale_mn)


def _quant_triton(w_MN, block_size, q_MN, scale_mn):
    from kernels.fp8_quant_triton import fp8_block_quant_triton
    return fp8_block_quant_triton(w_MN, block_size, q_MN, scale_mn)


QuantFn = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
QUANT_IMPLS: dict[str, QuantFn] = {"reference": _quant_reference, "cpu": _quant_cpu, "triton": _quant_triton}


def _quant_outputs(w: torch.Tensor, block_size: int, out) -> tuple[torch.Tensor, torch.Tensor]:
    want_q, want_s = tuple(w.shape), scale_shape(tuple(w.shape), block_size)
    if out is None:
        return (torch.empty(want_q, dtype=torch.float8_e4m3fn, device=w.device),
                torch.empty(want_s, dtype=torch.float32, device=w.device))
    q, s = out
    for name, t, shape, dtype in [("out[0] (codes)", q, want_q, torch.float8_e4m3fn),
                                  ("out[1] (scale_inv)", s, want_s, torch.float32)]:
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != w.device:
            raise ValueError(f"fp8_block_quant: {name} must be a contiguous {dtype} tensor of shape {shape} on "
                             f"{w.device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    return q, s


def fp8_block_quant(w: torch.Tensor, block_size: int = 128, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                    impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8 float8_e4m3fn, scale_inv float32)`` with scale = amax / 448 per block (module docstring).

    ``out``: optional ``(codes, scale_inv)`` pair of contiguous tensors to write into.
    ``impl``: a key of ``QUANT_IMPLS``; default: by the weight's device (``default_impl``).
    Raises ``ValueError`` if ``w`` holds inf or NaN (found from the scales, after quantising).
    """
    if w.dim() != 2:
        raise ValueError(f"fp8_block_quant: weight must be 2-D, got shape {tuple(w.shape)}; "
                         f"reshape stacked weights to [rows, cols] first")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"fp8_block_quant: weight dtype is {w.dtype}, expected bf16, fp16, fp32 or fp64")
    if block_size <= 0:
        raise ValueError(f"fp8_block_quant: block_size must be positive, got {block_size}")
    name = impl or default_impl(w.device)
    if name not in QUANT_IMPLS:
        raise ValueError(f"fp8_block_quant: unknown impl {name!r}; choose one of {sorted(QUANT_IMPLS)}")
    q_MN, scale_mn = _quant_outputs(w, block_size, out)
    x_MN = w if w.dtype in (torch.bfloat16, torch.float32) else w.float()  # the reference's .float() too
    QUANT_IMPLS[name](x_MN.contiguous(), block_size, q_MN, scale_mn)
    bad_mn = ~torch.isfinite(scale_mn)  # a scale is finite exactly when its block's input is
    if bool(bad_mn.any()):
        i, j = bad_mn.nonzero()[0].tolist()
        raise ValueError(f"fp8_block_quant: weight {tuple(w.shape)} holds inf or NaN in {int(bad_mn.sum())} of "
                         f"{bad_mn.numel()} blocks (first: rows {i * block_size}.., cols {j * block_size}..); "
                         f"a block scale would be meaningless: find where the weight became non-finite")
    return q_MN, scale_mn
