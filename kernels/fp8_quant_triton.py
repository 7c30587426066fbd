"""Triton kernel for DeepSeek FP8 block quantisation, bf16/fp32 -> e4m3fn + fp32 scales (GPU path).

What it does: one program per B x B block loads the block, takes its amax, writes its scale and
its e4m3fn bytes, bit for bit what ``kernels.fp8_reference.fp8_block_quant_reference`` defines,
by the same steps as ``kernels.fp8_quant_cpu`` (see that module for why each is exact):
integer max of ``bits & 0x7FFFFFFF`` (NaN-sticky), ``s = amax / 448`` (1 where 0, NaN for a NaN
block), ``x / s``, then c10's e4m3 rounding on the bits, clamped at 448, NaN -> 0x7F.

Why not DeepSeek's own ``weight_quant`` (DeepSeek-V3 inference/kernel.py: ``s = max(abs(x)) /
448.; y = (x / s).to(fp8)``): (a) Triton's ``/`` on fp32 is not IEEE division on NVIDIA GPUs
(``div.full.f32``, up to 2 ulp off), so a value near an e4m3 rounding tie may round the other way
than torch's ``x / s``; this kernel uses ``tl.math.div_rn``; (b) an all-zero block gives s = 0
and NaN codes there; (c) the fp8 store type needs sm89+, and under ``TRITON_INTERPRET=1`` (how
the tests run this on CPU) the interpreter's fp32 -> fp8 conversion is its own; byte stores and
integer ops agree everywhere. The subnormal step adds 2**14 in fp32: a GPU that flushes
subnormals to zero flushes only values that round to code 0 anyway, so it cannot change a code;
fp32 subnormal *inputs* (fp32 weights below 2**-126) would still read as 0 on such a GPU.

Interpreter note: ``triton.jit`` reads ``TRITON_INTERPRET`` when this module is first imported.

What it leaves out: non-contiguous inputs (the dispatcher makes them contiguous), input dtypes
other than bf16/fp32 (the dispatcher converts), autotuning (one tile per scale block).
Without it, CUDA tensors would be copied to the host for every exported weight.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / B), ceil(N / B); B = block size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8_triton import block_tile

FP8_NAN_CODE = 0x7F
F32_NAN_BITS = 0x7FC00000  # the scale of a block holding a NaN (see fp8_reference)


@triton.jit
def _fp8_block_quant_kernel(w_ptr, q_ptr, scale_ptr, M, N, n_col_blocks,
                            IS_BF16: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    offs, mask = block_tile(bi, bj, M, N, BLOCK, TILE)
    if IS_BF16:  # raw bits: bf16 -> fp32 is a 16-bit shift
        bits = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    else:
        bits = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    x = bits.to(tl.float32, bitcast=True)

    amax_bits = tl.max(bits & 0x7FFFFFFF)  # NaN patterns sort above +inf: NaN-sticky
    scale = tl.math.div_rn(amax_bits.to(tl.float32, bitcast=True), 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    scale = tl.where(amax_bits > 0x7F800000, tl.full([], F32_NAN_BITS, tl.uint32).to(tl.float32, bitcast=True), scale)
    tl.store(scale_ptr + bi * n_col_blocks + bj, scale)

    q = tl.math.div_rn(x, scale)
    qb = q.to(tl.uint32, bitcast=True)
    a = qb & 0x7FFFFFFF
    sign = (qb >> 24) & 0x80
    sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000  # + 2**14
    nrm = (a - 0x3C000000 + 0x7FFFF + ((a >> 20) & 1)) >> 20  # rebias by 120, round to even
    code = tl.where(a < 0x3C800000, sub, nrm)  # below 2**-6: e4m3 subnormal
    code = tl.where(a >= 0x43E00000, 0x7E, code) | sign  # clamp at 448
    code = tl.where(a > 0x7F800000, FP8_NAN_CODE, code)
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


def fp8_block_quant_triton(w_MN: torch.Tensor, block_size: int = 128, out_fp8_MN: torch.Tensor | None = None,
                           out_scale_mn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a contiguous 2-D bf16/fp32 tensor (CUDA, or CPU under TRITON_INTERPRET=1).

    Expects validated inputs (``kernels.fp8.fp8_block_quant`` checks shapes and dtypes).
    """
    M, N = w_MN.shape
    m, n = -(-M // block_size), -(-N // block_size)
    if out_fp8_MN is None:
        out_fp8_MN = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=w_MN.device)
    if out_scale_mn is None:
        out_scale_mn = torch.empty(m, n, dtype=torch.float32, device=w_MN.device)
    if M == 0 or N == 0:
        return out_fp8_MN, out_scale_mn
    if w_MN.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"fp8_block_quant_triton: weight dtype {w_MN.dtype}: pass bf16 or fp32 (convert with .float())")
    is_bf16 = w_MN.dtype == torch.bfloat16
    w_bits = w_MN.view(torch.int16) if is_bf16 else w_MN
    _fp8_block_quant_kernel[(m, n)](w_bits, out_fp8_MN.view(torch.uint8), out_scale_mn, M, N, n,
                                    IS_BF16=is_bf16, BLOCK=block_size, TILE=triton.next_power_of_2(block_size))
    return out_fp8_MN, out_scale_mn
