"""Triton kernel for MXFP4 (gpt-oss experts) -> BF16 dequantisation (GPU path).

What it does: one program per (tile of rows, tile of 32-element groups) loads the packed bytes
and their E8M0 scales and writes bf16 bit patterns, bit for bit what
``kernels.mxfp4_reference`` defines, with the integer rule of ``kernels.mxfp4_cpu`` (the
"general rule" there: exponent ``f = s + (m >> 1) - 1``, inf for f >= 255, the two subnormal
cases for s <= 1, NaN 0x7FC0 for s = 255). No float arithmetic, so the interpreter, every GPU
and the references agree; ``TRITON_INTERPRET=1`` runs it on CPU tensors (the tests do).

Both layouts are a matter of store offsets: element ``k = 32 g + 2 b (+1)`` of flattened row
``row = p * R + r`` goes to ``row * K + k`` (``"rows"``) or ``p * K * R + k * R + r``
(``"transformers"``). The transposed stores are strided on a GPU, which coalesces them poorly;
a tile of 64 rows keeps each warp's writes to one 128-byte run per output row.

Interpreter note: ``triton.jit`` reads ``TRITON_INTERPRET`` when this module is first imported.

What it leaves out: non-contiguous inputs (the dispatcher makes them contiguous), autotuning,
the swizzled layouts triton_kernels' matmul wants (transformers' ``swizzle_mxfp4``).
Without it, CUDA tensors would be copied to the host and back for every expert weight.

Shape legend: P = leading (expert) axes, R = rows, G = 32-element groups per row, K = 32 G.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BF16_NAN_BITS = 0x7FC0


@triton.jit
def _fp4_bits(nib, s):
    m = nib & 7
    e = (m >> 1) - 1
    h = tl.where(m >= 2, m & 1, 0)
    f = s + e
    normal = (f << 7) | (h << 6)
    subnormal = tl.where(f == 0, (2 + h) << 5, (2 + h) << 4)
    mag = tl.where(f >= 255, 0x7F80, tl.where(f >= 1, normal, subnormal))
    mag = tl.where(m == 0, 0, mag)
    return mag | ((nib & 8) << 12)


@triton.jit
def _mxfp4_dequant_kernel(blocks_ptr, scales_ptr, out_ptr, ROWS, R, G,
                          TRANSPOSED: tl.constexpr, TILE_R: tl.constexpr, TILE_G: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_r * TILE_R + tl.arange(0, TILE_R)  # flattened row p * R + r
    cols = pid_g * TILE_G * 16 + tl.arange(0, TILE_G * 16)  # byte index within the row
    nb = G * 16
    mask = (rows < ROWS)[:, None] & (cols < nb)[None, :]
    rows64 = rows.to(tl.int64)
    byte = tl.load(blocks_ptr + rows64[:, None] * nb + cols[None, :], mask=mask, other=0).to(tl.int32)
    s = tl.load(scales_ptr + rows64[:, None] * G + (cols // 16)[None, :], mask=mask, other=127).to(tl.int32)
    lo = tl.where(s == 255, BF16_NAN_BITS, _fp4_bits(byte & 15, s))
    hi = tl.where(s == 255, BF16_NAN_BITS, _fp4_bits(byte >> 4, s))
    k = (2 * cols)[None, :].to(tl.int64)  # element index of the low nibble
    K = 2 * nb
    if TRANSPOSED:
        p = rows64 // R
        r = rows64 % R
        offs = (p * K * R + r)[:, None] + k * R
        step = R
    else:
        offs = rows64[:, None] * K + k
        step = 1
    tl.store(out_ptr + offs, lo.to(tl.int16), mask=mask)
    tl.store(out_ptr + offs + step, hi.to(tl.int16), mask=mask)


def mxfp4_dequant_triton(blocks: torch.Tensor, scales: torch.Tensor, layout: str = "transformers",
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise contiguous uint8 ``blocks [*P, R, G, 16]`` / ``scales [*P, R, G]`` (CUDA, or CPU interpreted).

    Expects validated inputs (``kernels.mxfp4.mxfp4_dequant`` checks shapes, dtypes and ``out``).
    """
    *P, R, G, _ = blocks.shape
    if out is None:
        shape = (*P, G * 32, R) if layout == "transformers" else (*P, R, G * 32)
        out = torch.empty(shape, dtype=torch.bfloat16, device=blocks.device)
    if out.numel() == 0:
        return out
    rows = blocks.numel() // (G * 16)
    tile_r, tile_g = 64, 4
    grid = (triton.cdiv(rows, tile_r), triton.cdiv(G, tile_g))
    _mxfp4_dequant_kernel[grid](blocks, scales, out.view(torch.int16), rows, R, G,
                                TRANSPOSED=layout == "transformers", TILE_R=tile_r, TILE_G=tile_g)
    return out
