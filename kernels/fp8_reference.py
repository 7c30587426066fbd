"""Plain reference implementations of DeepSeek's block-scaled FP8 format.

DeepSeek-V3/R1 publish linear weights as ``float8_e4m3fn`` with a float32 companion
``<name>_scale_inv`` holding one scale per 128 x 128 block (edge blocks are partial):
``value = fp8 * scale_inv[i // 128, j // 128]``. These functions are the definition the
fast paths (``kernels.fp8``) are tested against; they favour obviousness over speed.

Dequantisation is defined as: fp32 value of the e4m3fn code times the fp32 block scale (one
fp32 rounding), then round-to-nearest-even to bf16. NaN: e4m3fn has two NaN codes, 0x7F and
0xFF (no infinities); they, and any NaN product (NaN or infinite scales), dequantise to the
single bf16 pattern ``0x7FC0`` (positive quiet NaN, the sign is not kept). The pattern is fixed
here because torch itself has none: on this CPU its fp32 -> bf16 cast writes 0xFFFF for a NaN
in a contiguous tensor (vectorised path) and 0x7FC0 in a strided one (scalar path), and CUDA's
``__float2bfloat16_rn`` writes 0x7FFF.

Quantisation is defined as DeepSeek's convention made total (DeepSeek-V3's own Triton
``weight_quant`` in inference/kernel.py computes ``s = max(abs(x)) / 448.; y = x / s`` and leaves
the corner cases to the hardware). Per block, all in fp32 with IEEE round-to-nearest-even:

    amax = max |x|            (NaN if the block holds a NaN)
    s    = amax / 448         (one correctly rounded fp32 division)
    s    = 1 where s == 0     (an all-zero block, or an fp32 block with amax <= 448 * 2**-150)
    code = e4m3_rne(clamp(x / s, -448, 448)),   scale_inv = s

DeepSeek's kernel would store s = 0 and NaN codes (0 / 0) for an all-zero block; here it gets
s = 1 and codes +-0 so that dequantisation gives the zeros back. Non-finite input (which
``kernels.fp8.fp8_block_quant`` rejects; the kernels still define it): a block holding a NaN
gets s = NaN (always the pattern 0x7FC00000) and every code NaN; a block holding +-inf and no
NaN gets s = +inf, its infinities code NaN and its finite values +-0. Every NaN code is 0x7F
(the sign is not kept: x86 makes 0 / 0 a negative NaN, CUDA a positive one, and torch's cast
keeps the sign). Hence a block's scale is finite exactly when its input is, and a check of the
small scale tensor finds any non-finite input. The clamp makes torch's own cast behaviour above
448 (it saturates, GPU casts may not) irrelevant.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / block), ceil(N / block).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
BF16_NAN_BITS = 0x7FC0  # canonical quiet NaN: what every bf16 NaN from these kernels looks like
FP8_NAN_CODE = 0x7F  # the one e4m3fn NaN code quantisation writes (0xFF is NaN too; never written)
F32_NAN_BITS = 0x7FC00000  # the scale quantisation writes for a block holding a NaN


def scale_shape(shape_MN: tuple[int, int], block_size: int = 128) -> tuple[int, int]:
    """Shape of the ``scale_inv`` tensor for a weight of ``shape_MN``."""
    M, N = shape_MN
    return (-(-M // block_size), -(-N // block_size))


def expand_scales(scale_inv_mn: torch.Tensor, shape_MN: tuple[int, int], block_size: int = 128) -> torch.Tensor:
    """Repeat each block scale over its block, cropped to the weight's shape."""
    M, N = shape_MN
    full = scale_inv_mn.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return full[:M, :N]


def fp8_block_dequant_reference(w_fp8_MN: torch.Tensor, scale_inv_mn: torch.Tensor,
                                block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp32 multiply of each element by its block's scale, then round-to-nearest-even cast."""
    if w_fp8_MN.dim() != 2:
        raise ValueError(f"fp8 weight must be 2-D, got shape {tuple(w_fp8_MN.shape)}")
    want = scale_shape(tuple(w_fp8_MN.shape), block_size)
    if tuple(scale_inv_mn.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv_mn.shape)} does not match weight "
                         f"{tuple(w_fp8_MN.shape)} with block {block_size}: expected {want}")
    s_MN = expand_scales(scale_inv_mn.float(), tuple(w_fp8_MN.shape), block_size)
    prod_MN = w_fp8_MN.float() * s_MN
    out_MN = prod_MN.to(out_dtype)
    if out_dtype == torch.bfloat16:  # one NaN pattern, whatever torch's cast path would write
        out_MN.view(torch.int16).masked_fill_(torch.isnan(prod_MN), BF16_NAN_BITS)
    return out_MN


def fp8_block_quant_reference(w_MN: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's convention: per block, scale = amax / 448; fp8 = w / scale; scale_inv = scale.

    A scale of 0 (all-zero block) becomes 1 so that dequantisation stays exact (0 * 1 = 0); NaN
    and inf as in the module docstring. Returns ``(w_fp8_MN float8_e4m3fn, scale_inv_mn float32)``.
    """
    if w_MN.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w_MN.shape)}")
    M, N = w_MN.shape
    m, n = scale_shape((M, N), block_size)
    x = w_MN.float()
    padded = torch.zeros(m * block_size, n * block_size, dtype=torch.float32, device=w_MN.device)
    padded[:M, :N] = x
    blocks = padded.view(m, block_size, n, block_size)
    amax_mn = blocks.abs().amax(dim=(1, 3))  # amax propagates NaN
    scale_mn = amax_mn / FP8_E4M3_MAX
    scale_mn = torch.where(scale_mn == 0, torch.ones_like(scale_mn), scale_mn)
    scale_mn.view(torch.int32).masked_fill_(torch.isnan(scale_mn), F32_NAN_BITS)  # one NaN, whatever the input's
    q = (blocks / scale_mn[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q_MN = q.view(m * block_size, n * block_size)[:M, :N]
    w_fp8 = q_MN.to(torch.float8_e4m3fn).contiguous()
    w_fp8.view(torch.uint8).masked_fill_(torch.isnan(q_MN), FP8_NAN_CODE)
    return w_fp8, scale_mn.contiguous()
