"""Triton kernel for DeepSeek block-scaled FP8 -> BF16 dequantisation (GPU path).

What it does: one program per (row block, column block) of the weight loads the block's
e4m3fn bytes and its one fp32 scale and writes bf16 bit patterns, bit for bit what
``kernels.fp8_reference`` defines (fp32 multiply, round to nearest even, NaN -> 0x7FC0).
It computes exactly what ``kernels.fp8_cpu`` computes, step for step (see that module for why
each step is exact): decode the byte with integer ops, one fp32 multiply, integer RNE.

Why not ``tl.load`` the fp8 type and ``.to(tl.bfloat16)``: (a) Triton's fp8e4nv type needs
sm89+ on NVIDIA (the published DeepSeek cast script inherits that), while byte loads and
integer ops run on any GPU; (b) under ``TRITON_INTERPRET=1`` (how the tests run this kernel on
CPU) the interpreter decodes the NaN codes 0x7F/0xFF as +-480 and casts fp32 -> bf16 by
truncation (README, Platform notes); decoding and rounding by hand makes the interpreter,
GPUs and the references agree. Subnormal fp8 codes are decoded as ``em * 2**-9`` so no
subnormal fp32 value is ever formed from the input (flush-to-zero GPU modes cannot hurt the
decode; a product below 2**-126 still depends on the GPU's denormal mode).

Interpreter note: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates the kernel, i.e.
when this module is first imported, not at launch. Set the variable before the import (the
tests run this module in a subprocess with it set).

What it leaves out: non-contiguous inputs (the dispatcher makes them contiguous), autotuning
(one tile per scale block; dequant is memory-bound), block sizes that differ between rows and
columns. Without it, CUDA tensors would be copied to the host and back for every weight.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / B), ceil(N / B); B = block size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BF16_NAN_BITS = 0x7FC0


@triton.jit
def block_tile(bi, bj, M, N, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """(element offsets, in-bounds mask) of block (bi, bj) of an M x N row-major matrix, as a
    TILE x TILE tile (TILE = next power of two >= BLOCK); shared with kernels.fp8_quant_triton."""
    r = tl.arange(0, TILE)
    rows = bi * BLOCK + r
    cols = bj * BLOCK + r
    row_ok = (r < BLOCK) & (rows < M)
    col_ok = (r < BLOCK) & (cols < N)
    mask = row_ok[:, None] & col_ok[None, :]
    return rows[:, None].to(tl.int64) * N + cols[None, :], mask


@triton.jit
def _fp8_block_dequant_kernel(w_ptr, scale_ptr, out_ptr, M, N, n_col_blocks,
                              BLOCK: tl.constexpr, TILE: tl.constexpr):
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    offs, mask = block_tile(bi, bj, M, N, BLOCK, TILE)
    c = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32)
    scale = tl.load(scale_ptr + bi * n_col_blocks + bj)

    sign = (c & 0x80) << 24
    em = c & 0x7F
    normal_bits = (em << 20) + (120 << 23)  # rebias the exponent: 127 - 7
    subnormal_bits = (em.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True)  # em * 2**-9
    value_bits = tl.where(em >= 8, normal_bits, subnormal_bits) | sign
    prod = value_bits.to(tl.float32, bitcast=True) * scale
    pb = prod.to(tl.uint32, bitcast=True)
    rounded = (pb + 0x7FFF + ((pb >> 16) & 1)) >> 16
    is_nan = (em == 0x7F) | (prod != prod)
    bits = tl.where(is_nan, BF16_NAN_BITS, rounded)
    tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)


def fp8_block_dequant_triton(w_fp8_MN: torch.Tensor, scale_inv_mn: torch.Tensor, block_size: int = 128,
                             out_MN: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise a contiguous 2-D float8_e4m3fn tensor (CUDA, or CPU under TRITON_INTERPRET=1).

    Expects validated inputs (``kernels.fp8.fp8_block_dequant`` checks shapes and dtypes).
    """
    M, N = w_fp8_MN.shape
    if out_MN is None:
        out_MN = torch.empty(M, N, dtype=torch.bfloat16, device=w_fp8_MN.device)
    if M == 0 or N == 0:
        return out_MN
    m, n = -(-M // block_size), -(-N // block_size)
    scale_mn = scale_inv_mn.to(device=w_fp8_MN.device, dtype=torch.float32).contiguous()
    _fp8_block_dequant_kernel[(m, n)](
        w_fp8_MN.view(torch.uint8), scale_mn, out_MN.view(torch.int16), M, N, n,
        BLOCK=block_size, TILE=triton.next_power_of_2(block_size))
    return out_MN
