"""Fast CPU path for DeepSeek FP8 block quantisation, bf16/fp32 -> e4m3fn + fp32 scales (numba).

What it does: ``fp8_block_quant_cpu`` gives, bit for bit, what ``fp8_reference`` defines for
``fp8_block_quant_reference``: per B x B block ``s = amax / 448`` (1 where that is 0, NaN where
the block holds a NaN), ``code = e4m3_rne(clamp(x / s, -448, 448))``, NaN codes written as 0x7F.
It works on raw bits, so no step depends on torch's or the CPU's float8 support:

1. amax as an integer max of the bits with the sign cleared: for non-negative floats the bit
   patterns sort like the values, and NaN patterns sort above +inf, so the max is NaN-sticky
   for free; for bf16 it runs on the 16-bit patterns themselves (32 lanes per vector);
2. ``s = amax / 448`` and ``x / s``: correctly rounded fp32 divisions, the reference's. Not a
   multiply by ``1 / s``: that differs from ``x / s`` in the last fp32 bit now and then, and the
   e4m3 rounding of a value near a tie can depend on that bit (measured: the divide costs ~10%);
3. e4m3 round-to-nearest-even, as c10's ``fp8e4m3fn_from_fp32_value`` (what torch runs; checked
   against torch on all 2.2e9 fp32 values with |x| <= 448): below 2**-6 (e4m3's subnormals) add
   2**14 in fp32, whose ulp is the e4m3 subnormal step 2**-9, so the fp32 adder rounds for us,
   then subtract 2**14's bits; above, rebias the exponent (fp32 bias 127 - e4m3 bias 7 = 120)
   and round the 20 dropped mantissa bits to even with ``+ 0x7FFFF + lsb``. ``|q| >= 448`` (the
   clamp; fp32 inf included) gives 0x7E, NaN 0x7F.

Layout of the work: tasks are (row block, column chunk) boxes, chunks sized so a box's input
(B rows x chunk) stays in L2 between its two passes (amax, then quantise); each worker runs a
contiguous run of boxes as a pipeline, interleaving the quantise pass of box t with the amax
pass of box t + 1 row by row, and prefetching (``prefetcht0``) the rows of box t + 1 four rows
ahead. Both passes are straight loops over a row segment that LLVM turns into AVX-512 code
(~21 instructions per 16 elements for the quantise pass, 3 per 32 for the amax pass).

Measured with ``python -m tools.bench_dequant --op quant`` (8192 x 16384 bf16, 2 threads, bytes =
2 in + 1 out per element + scales): 13.8-14 ms a pass, 0.36-0.52x torch ``copy_`` (copy_ itself
moved between 29 and 74 GB/s over the runs), ~65x the reference. Without the prefetch the same
pass took ~23 ms (the amax pass waited on memory: 0.24x); the pipelining alone did not help.
Compute alone (L2-resident input) is ~0.1 ns per element. On these 2-vCPU machines one thread
ran as fast as two, and so did ``copy_`` (as if the two vCPUs shared one core).

What it leaves out: input dtypes other than bf16 and fp32 (the dispatcher converts fp16/fp64
with ``.float()``, exactly as the reference does), non-contiguous inputs (made contiguous by the
dispatcher), FTZ/DAZ CPU modes (untested; with DAZ an fp32 subnormal input would read as 0).
Without it, exporting DeepSeek-V3's ~671 G weights to FP8 would run the torch reference
(~0.02x ``copy_``, several hours) instead of minutes.

Threads: ``torch.get_num_threads()`` (capped by numba's pool), like ``kernels.fp8_cpu``.

Shape legend: M, N = weight rows / columns; m, n = ceil(M / B), ceil(N / B); B = block size.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_U32 = np.uint32
_F32 = np.float32
FP8_NAN_CODE = 0x7F  # see fp8_reference.FP8_NAN_CODE
_L2_TASK_BYTES = 256 * 1024  # input bytes per task: fits the L2 of every core measured here
_PREFETCH_ROWS = 4  # how many rows ahead the amax pass's input is prefetched


@intrinsic
def prefetch(typingctx, arr, idx):
    """``prefetcht0`` of ``arr[idx]`` (1-D, no bounds or wraparound check): a hint, never a fault."""
    def codegen(context, builder, signature, args):
        arr_t = signature.args[0]
        ary = context.make_array(arr_t)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arr_t, ary, [args[1]], wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()
    return types.void(arr, idx), codegen


def _f32_bits(x):
    """The fp32 bit pattern of one input element (bf16 bits in a uint16, or fp32 bits in a uint32)."""


def _abs_bits(x):
    """The input element's bits with the sign cleared, in the input's own width (max over them = amax)."""


@overload(_f32_bits, inline="always")
def _f32_bits_impl(x):
    if x == types.uint16:  # bf16: a 16-bit shift; constant, so LLVM keeps 32-bit lanes
        return lambda x: _U32(_U32(x) << _U32(16))
    return lambda x: _U32(x)


@overload(_abs_bits, inline="always")
def _abs_bits_impl(x):
    if x == types.uint16:  # max over uint16 lanes: 32 per AVX-512 vector
        return lambda x: np.uint16(x & np.uint16(0x7FFF))
    return lambda x: _U32(x & _U32(0x7FFFFFFF))


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def e4m3_code(q_f32):
    """fp32 -> e4m3fn byte: RNE, |q| >= 448 -> +-448 (0x7E), NaN -> 0x7F (module docstring, step 3)."""
    b = _F32(q_f32).view(np.uint32)
    a = _U32(b & _U32(0x7FFFFFFF))
    sign = _U32(_U32(b >> _U32(24)) & _U32(0x80))
    sub = _U32(_F32(a.view(np.float32) + _F32(16384.0)).view(np.uint32) - _U32(0x46800000))  # 0x46800000: 2**14
    lsb = _U32(_U32(a >> _U32(20)) & _U32(1))
    nrm = _U32(_U32(_U32(_U32(a - _U32(0x3C000000)) + _U32(0x7FFFF)) + lsb) >> _U32(20))  # 0x3C000000: 120 << 23
    code = sub if a < _U32(0x3C800000) else nrm  # 0x3C800000: 2**-6, the smallest e4m3 normal
    code = _U32(0x7E) if a >= _U32(0x43E00000) else code  # 0x43E00000: 448.0
    return np.uint8(_U32(FP8_NAN_CODE) if a > _U32(0x7F800000) else _U32(code | sign))


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def block_scale(amax_bits):
    """The block's fp32 scale from the max of its ``|x|`` bit patterns (module docstring, step 1-2)."""
    if amax_bits > _U32(0x7F800000):
        return _F32(np.nan)
    s = _F32(_U32(amax_bits).view(np.float32) / _F32(448.0))
    return _F32(1.0) if s == _F32(0.0) else s


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def _amax_row(w_seg, colmax):
    for k in range(w_seg.shape[0]):
        a = _abs_bits(w_seg[k])
        colmax[k] = a if a > colmax[k] else colmax[k]


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def _quant_row(w_seg, s_row, q_seg):
    for k in range(w_seg.shape[0]):  # index from range(0, n) only: see kernels.fp8_cpu
        q_seg[k] = e4m3_code(_f32_bits(w_seg[k]).view(np.float32) / s_row[k])


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def _set_scales(colmax, s_row, scale_row, block):
    """Per ``block`` columns: the scale from the max of ``colmax`` into ``s_row`` and ``scale_row``.

    Clears ``colmax`` for the next box's amax pass.
    """
    for c in range(scale_row.shape[0]):
        seg = colmax[c * block:(c + 1) * block]
        amax = seg[0]
        for k in range(seg.shape[0]):
            amax = seg[k] if seg[k] > amax else amax
            seg[k] = 0
        s = block_scale(_f32_bits(amax))
        scale_row[c] = s
        s_seg = s_row[c * block:(c + 1) * block]
        for k in range(s_seg.shape[0]):
            s_seg[k] = s


@njit(nogil=True, boundscheck=False, inline="always", error_model="numpy")
def _task_box(t, n_chunks, chunk, block, M, N):
    bi = t // n_chunks
    j0 = (t % n_chunks) * chunk
    return bi, bi * block, min(M, (bi + 1) * block), j0, min(N, j0 + chunk)


@njit(parallel=True, nogil=True, boundscheck=False, cache=True, error_model="numpy")
def _quant_tasks(w_MN, q_MN, scale_mn, block, chunk, n_workers):
    """``w_MN``: uint16 bf16 bits or uint32 fp32 bits; ``chunk``: a multiple of ``block``.

    Each worker runs a contiguous run of (row block, column chunk) tasks as a pipeline: while it
    quantises task t's rows (input in L2 since t's amax pass), it reads the same rows of task
    t + 1 for that task's amax, so the two passes' memory traffic overlaps their arithmetic.
    """
    M, N = w_MN.shape
    n_chunks = (N + chunk - 1) // chunk
    n_tasks = scale_mn.shape[0] * n_chunks
    for wk in prange(n_workers):
        t_lo, t_hi = wk * n_tasks // n_workers, (wk + 1) * n_tasks // n_workers
        colmax = np.zeros(chunk, w_MN.dtype)  # max of |x| bits per column of the next task
        s_row = np.empty(chunk, np.float32)  # the current task's scales, one per column
        if t_lo < t_hi:
            _, i0, i1, j0, j1 = _task_box(t_lo, n_chunks, chunk, block, M, N)
            for i in range(i0, i1):
                _amax_row(w_MN[i, j0:j1], colmax[:j1 - j0])
        for t in range(t_lo, t_hi):
            bi, i0, i1, j0, j1 = _task_box(t, n_chunks, chunk, block, M, N)
            _set_scales(colmax[:j1 - j0], s_row[:j1 - j0], scale_mn[bi, j0 // block:(j1 + block - 1) // block], block)
            nxt = t + 1 < t_hi
            _, n0, n1, m0, m1 = _task_box(t + 1, n_chunks, chunk, block, M, N)
            for r in range(max(i1 - i0, n1 - n0 if nxt else 0)):
                if nxt and r + _PREFETCH_ROWS < n1 - n0:
                    ahead = w_MN[n0 + r + _PREFETCH_ROWS, m0:m1]
                    for k in range(0, ahead.shape[0], 64 // ahead.itemsize):
                        prefetch(ahead, k)
                if r < i1 - i0:
                    _quant_row(w_MN[i0 + r, j0:j1], s_row[:j1 - j0], q_MN[i0 + r, j0:j1])
                if nxt and r < n1 - n0:
                    _amax_row(w_MN[n0 + r, m0:m1], colmax[:m1 - m0])


def _column_chunk(M: int, N: int, block: int, itemsize: int, threads: int) -> int:
    """Columns per task: a multiple of ``block``, small enough for L2, enough tasks for all threads."""
    col_blocks = -(-N // block)
    per_task = max(1, min(col_blocks, _L2_TASK_BYTES // (block * block * itemsize)))
    row_blocks = -(-M // block)
    while per_task > 1 and row_blocks * -(-col_blocks // per_task) < 4 * threads:
        per_task //= 2
    return per_task * block


def fp8_block_quant_cpu(w_MN: torch.Tensor, block_size: int = 128, out_fp8_MN: torch.Tensor | None = None,
                        out_scale_mn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a contiguous 2-D bf16 or fp32 CPU tensor into (new or given) e4m3fn codes and fp32 scales.

    Expects validated inputs (``kernels.fp8.fp8_block_quant`` checks shapes and dtypes).
    """
    M, N = w_MN.shape
    m, n = -(-M // block_size), -(-N // block_size)
    if out_fp8_MN is None:
        out_fp8_MN = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    if out_scale_mn is None:
        out_scale_mn = torch.empty(m, n, dtype=torch.float32)
    if M == 0 or N == 0:
        return out_fp8_MN, out_scale_mn
    if w_MN.dtype == torch.bfloat16:
        bits = w_MN.view(torch.int16).numpy().view(np.uint16)
    elif w_MN.dtype == torch.float32:
        bits = w_MN.view(torch.int32).numpy().view(np.uint32)
    else:
        raise TypeError(f"fp8_block_quant_cpu: weight dtype {w_MN.dtype}: pass bf16 or fp32 (convert with .float())")
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    chunk = _column_chunk(M, N, block_size, w_MN.element_size(), threads)
    n_tasks = m * -(-N // chunk)
    _quant_tasks(bits, out_fp8_MN.view(torch.uint8).numpy(), out_scale_mn.numpy(), block_size, chunk,
                 min(n_tasks, 4 * threads))
    return out_fp8_MN, out_scale_mn
