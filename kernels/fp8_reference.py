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

Shape legend: M, N = weight rows / columns; m, n = ceil(M / block), ceil(N / block).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
BF16_NAN_BITS = 0x7FC0  # canonical quiet NaN: what every bf16 NaN from these kernels looks like


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

    All-zero blocks get scale 1 so that dequantisation stays exact (0 * 1 = 0).
    Returns ``(w_fp8_MN float8_e4m3fn, scale_inv_mn float32)``.
    """
    if w_MN.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w_MN.shape)}")
    M, N = w_MN.shape
    m, n = scale_shape((M, N), block_size)
    x = w_MN.float()
    padded = torch.zeros(m * block_size, n * block_size, dtype=torch.float32, device=w_MN.device)
    padded[:M, :N] = x
    blocks = padded.view(m, block_size, n, block_size)
    amax_mn = blocks.abs().amax(dim=(1, 3))
    scale_mn = torch.where(amax_mn > 0, amax_mn / FP8_E4M3_MAX, torch.ones_like(amax_mn))
    q = (blocks / scale_mn[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    w_fp8 = q.view(m * block_size, n * block_size)[:M, :N].to(torch.float8_e4m3fn).contiguous()
    return w_fp8, scale_mn.contiguous()
