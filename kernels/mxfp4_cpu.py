"""Fast CPU path for MXFP4 (gpt-oss experts) -> BF16 dequantisation (numba, multi-threaded).

What it does: ``mxfp4_dequant_cpu`` gives, bit for bit, what ``kernels.mxfp4_reference``
defines: ``FP4[code] * 2**(s - 127)`` exactly in bf16, +-inf on overflow, the NaN 0x7FC0 for
every element of a group whose E8M0 scale is 255. No float arithmetic is involved: the bf16 bit
pattern is assembled from the code and the scale with integer ops. For the e2m1 magnitude
``m = code & 7`` (0, 0.5, 1, 1.5, 2, 3, 4, 6):

- general rule: the value's exponent relative to 1 is ``e = (m >> 1) - 1`` (0.5 -> -1), its
  mantissa bit ``h = m & 1`` for m >= 2 (``1.5 = 1.1b``), 0 for m = 1; the biased bf16 exponent
  is ``f = s + e`` (the biases 127 of E8M0 and bf16 cancel); ``f >= 255``: inf ``0x7F80``;
  ``f >= 1``: ``f << 7 | h << 6``; ``f = 0 or -1`` (only when s <= 1): the subnormal
  ``(2 + h) << (f + 5)``; m = 0: zero; then the sign (code bit 3) as bit 15;
- fast rule, for a run of groups whose scales all lie in 2..252 (every real weight): no
  overflow or subnormal can occur, and ``f << 7 | h << 6`` collapses to
  ``(m << 6) + ((s - 1) << 7)`` for m >= 2 (``m << 6`` is ``(m >> 1) << 7 | (m & 1) << 6``) and to
  ``(s - 1) << 7`` for m = 1: three integer ops and two selects per element, in 16-bit lanes.

Two layouts. ``"rows"`` ([..., R, K], the stored order): each byte gives two bf16 values, low
nibble first, written as one uint32 (little-endian: the low half is the earlier element); 16
bytes share one scale, so the inner loop is one 16-lane AVX-512 vector. ``"transformers"``
([..., K, R]): the output runs along R, so the kernel first transposes the tile's input bytes
(8 rows x 8 bytes at a time, as 8 uint64 words, with three rounds of masked swaps: 4-byte, 2-byte
then 1-byte blocks) into a ``[16, rows]`` buffer, then decodes with the rows as vector lanes
and writes contiguous output runs. The input is a quarter of the output's bytes, so
transposing it (in L1/L2) is the cheaper side of the transpose, though it still takes about
half the time. torch's own strided copy of the transposed result, which transformers does,
ran at ~2.6 GB/s here.

Measured with ``python -m tools.bench_dequant --format mxfp4`` (8 x 5760 x 2880, gpt-oss's
gate_up_proj shape, 2 threads; bytes = 0.5 in + 2 out per element + scales; ``copy_`` moved
23-110 GB/s over the runs and the ratios move with it): ``"rows"`` 6-17 ms a pass, 0.5-0.83x
``copy_``; ``"transformers"`` 14-29 ms, 0.2-0.5x ``copy_`` (0.32x with ``copy_`` at 75 GB/s,
below the 0.3x aim when ``copy_`` reached 100+ GB/s); the float64 reference and transformers'
own function ~0.005x. Tried for the transposed path and dropped (slower or no better): 8 rows x
4 groups of SWAR transposes as one 8-lane vector (LLVM vectorises it, but the uint64 re-layout
it then needs costs as much), reading 8 whole rows sequentially per step, prefetching the next
cache line of each row, tiles of 256 .. 5760 rows.

What it leaves out: non-contiguous inputs (the dispatcher makes them contiguous), other MX
element types. Without it the CPU path is the float64 torch reference, 50-100x slower.

Threads: ``torch.get_num_threads()`` (capped by numba's pool), as in ``kernels.fp8_cpu``.

Shape legend: P = leading (expert) axes, R = rows, G = 32-element groups per row, K = 32 G.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

_U16, _U32, _U64, _I32 = np.uint16, np.uint32, np.uint64, np.int32
_NAN_PAIR = 0x7FC07FC0  # two canonical bf16 NaNs
_TILE_R = 2048  # rows per transposed task: 32 KB byte buffer, 4 KB output runs


@njit(nogil=True, boundscheck=False, inline="always")
def _fp4_general(nib, s):
    """One e2m1 code (0..15) times 2**(s - 127) -> bf16 bits in a uint32, any s < 255."""
    m = _I32(nib & _I32(7))
    e = _I32(_I32(m >> _I32(1)) - _I32(1))
    h = _I32(_I32(m & _I32(1)) if m >= _I32(2) else _I32(0))
    f = _I32(s + e)
    normal = _I32(_I32(f << _I32(7)) | _I32(h << _I32(6)))
    subnormal = _I32(_I32(_I32(2) + h) << _I32(4))  # f = -1; constant shifts only (they vectorise)
    subnormal = _I32(subnormal << _I32(1)) if f == _I32(0) else subnormal
    mag = _I32(0x7F80) if f >= _I32(255) else (normal if f >= _I32(1) else subnormal)
    mag = _I32(0) if m == _I32(0) else mag
    return _U32(_I32(mag | _I32(_I32(nib & _I32(8)) << _I32(12))))


@njit(nogil=True, boundscheck=False, inline="always")
def _pair_general(byte, s):
    """Both elements of a byte (low nibble in the low half), any scale, NaN for s = 255."""
    b = _I32(byte)
    pair = _U32(_fp4_general(_I32(b & _I32(15)), s) | _U32(_fp4_general(_I32(b >> _I32(4)), s) << _U32(16)))
    return _U32(_NAN_PAIR) if s == _I32(255) else pair


@njit(nogil=True, boundscheck=False, inline="always")
def _fp4_fast(nib, base):
    """The fast rule: ``base = (s - 1) << 7`` with 2 <= s <= 252."""
    m = _U16(nib & _U16(7))
    t = _U16(0) if m == _U16(1) else _U16(m << _U16(6))
    mag = _U16(0) if m == _U16(0) else _U16(t + base)
    return _U16(mag | _U16(_U16(nib & _U16(8)) << _U16(12)))


@njit(nogil=True, boundscheck=False, inline="always")
def _fast_ok(s_lo, s_hi):
    return s_lo >= 2 and s_hi <= 252


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _dequant_rows(blocks_rb, scales_rg, out_rb, rows_per_task):
    """blocks_rb: [rows, G * 16] bytes; out_rb: [rows, G * 16] uint32 (two bf16 each)."""
    rows = blocks_rb.shape[0]
    G = scales_rg.shape[1]
    for t in prange((rows + rows_per_task - 1) // rows_per_task):
        for r in range(t * rows_per_task, min(rows, (t + 1) * rows_per_task)):
            for g in range(G):
                s = _I32(scales_rg[r, g])
                b_seg = blocks_rb[r, g * 16:g * 16 + 16]
                o_seg = out_rb[r, g * 16:g * 16 + 16]
                if _fast_ok(s, s):
                    base = _U16(_U16(_U16(s) - _U16(1)) << _U16(7))
                    for k in range(16):
                        byte = _U16(b_seg[k])
                        lo = _fp4_fast(_U16(byte & _U16(15)), base)
                        hi = _fp4_fast(_U16(byte >> _U16(4)), base)
                        o_seg[k] = _U32(_U32(lo) | _U32(_U32(hi) << _U32(16)))
                else:
                    for k in range(16):
                        o_seg[k] = _pair_general(b_seg[k], s)


@njit(nogil=True, boundscheck=False, inline="always")
def _swap(a, b, mask, shift):
    t = _U64(_U64(_U64(a >> _U64(shift)) ^ b) & _U64(mask))
    return _U64(a ^ _U64(t << _U64(shift))), _U64(b ^ t)


@njit(nogil=True, boundscheck=False, inline="always")
def _transpose8x8(x0, x1, x2, x3, x4, x5, x6, x7):
    """8 words = 8 rows of 8 bytes -> 8 words = the 8 columns (byte j of output k = byte k of input j)."""
    m4, m2, m1 = 0x00000000FFFFFFFF, 0x0000FFFF0000FFFF, 0x00FF00FF00FF00FF
    x0, x4 = _swap(x0, x4, m4, 32)
    x1, x5 = _swap(x1, x5, m4, 32)
    x2, x6 = _swap(x2, x6, m4, 32)
    x3, x7 = _swap(x3, x7, m4, 32)
    x0, x2 = _swap(x0, x2, m2, 16)
    x1, x3 = _swap(x1, x3, m2, 16)
    x4, x6 = _swap(x4, x6, m2, 16)
    x5, x7 = _swap(x5, x7, m2, 16)
    x0, x1 = _swap(x0, x1, m1, 8)
    x2, x3 = _swap(x2, x3, m1, 8)
    x4, x5 = _swap(x4, x5, m1, 8)
    x6, x7 = _swap(x6, x7, m1, 8)
    return x0, x1, x2, x3, x4, x5, x6, x7


@njit(nogil=True, boundscheck=False, inline="always")
def _gather_group(words_prw, bytes_prb, p, r0, n, g, bt_kw, bt_kb):
    """Bytes of group ``g`` for rows r0 .. r0 + n, transposed into ``bt_kb[16, n]``."""
    n8 = n // 8 * 8
    for i8 in range(n8 // 8):
        for half in range(2):
            w = words_prw[p, r0 + 8 * i8:r0 + 8 * i8 + 8, 2 * g + half]
            y = _transpose8x8(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7])
            for k in range(8):
                bt_kw[8 * half + k, i8] = y[k]
    for i in range(n8, n):
        row = bytes_prb[p, r0 + i, g * 16:g * 16 + 16]
        for k in range(16):
            bt_kb[k, i] = row[k]


@njit(parallel=True, nogil=True, boundscheck=False, cache=True)
def _dequant_transposed(words_prw, bytes_prb, scales_prg, out_pkr, tile_r, g_per_task):
    """words_prw / bytes_prb: the blocks as [P, R, G * 2] uint64 / [P, R, G * 16] uint8; out_pkr: [P, K, R] uint16."""
    P, R = bytes_prb.shape[0], bytes_prb.shape[1]
    G = scales_prg.shape[2]
    r_tiles = (R + tile_r - 1) // tile_r
    g_tasks = (G + g_per_task - 1) // g_per_task
    for t in prange(P * r_tiles * g_tasks):
        p = t // (r_tiles * g_tasks)
        r0 = ((t // g_tasks) % r_tiles) * tile_r
        g0 = (t % g_tasks) * g_per_task
        n = min(R, r0 + tile_r) - r0
        bt_kw = np.empty((16, tile_r // 8), np.uint64)
        bt_kb = bt_kw.view(np.uint8)  # [16, tile_r]: byte k of group g for each row
        s_r = np.empty(tile_r, np.int32)
        base_r = np.empty(tile_r, np.uint16)
        for g in range(g0, min(G, g0 + g_per_task)):
            s_lo, s_hi = 255, 0
            for i in range(n):
                s = _I32(scales_prg[p, r0 + i, g])
                s_r[i] = s
                s_lo, s_hi = min(s_lo, s), max(s_hi, s)
            _gather_group(words_prw, bytes_prb, p, r0, n, g, bt_kw, bt_kb)
            fast = _fast_ok(s_lo, s_hi)
            if fast:
                for i in range(n):
                    base_r[i] = _U16(_U16(_U16(s_r[i]) - _U16(1)) << _U16(7))
            for k in range(16):
                o_lo = out_pkr[p, g * 32 + 2 * k, r0:r0 + n]
                o_hi = out_pkr[p, g * 32 + 2 * k + 1, r0:r0 + n]
                b_k = bt_kb[k]
                if fast:
                    for i in range(n):
                        byte = _U16(b_k[i])
                        o_lo[i] = _fp4_fast(_U16(byte & _U16(15)), base_r[i])
                        o_hi[i] = _fp4_fast(_U16(byte >> _U16(4)), base_r[i])
                else:
                    for i in range(n):
                        pair = _pair_general(b_k[i], s_r[i])
                        o_lo[i] = _U16(pair & _U32(0xFFFF))
                        o_hi[i] = _U16(pair >> _U32(16))


def mxfp4_dequant_cpu(blocks: torch.Tensor, scales: torch.Tensor, layout: str = "transformers",
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise contiguous uint8 ``blocks [*P, R, G, 16]`` / ``scales [*P, R, G]`` into (new or given) bf16.

    Expects validated inputs (``kernels.mxfp4.mxfp4_dequant`` checks shapes, dtypes and ``out``).
    """
    *P, R, G, _ = blocks.shape
    p = int(np.prod(P)) if P else 1
    if out is None:
        shape = (*P, G * 32, R) if layout == "transformers" else (*P, R, G * 32)
        out = torch.empty(shape, dtype=torch.bfloat16)
    if out.numel() == 0:
        return out
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    b_prb = blocks.numpy().reshape(p, R, G * 16)
    s_prg = scales.numpy().reshape(p, R, G)
    o16 = out.view(torch.int16).numpy().view(np.uint16)
    if layout == "rows":
        rows = p * R
        per_task = max(1, min(256, -(-rows // (4 * threads))))
        _dequant_rows(b_prb.reshape(rows, G * 16), s_prg.reshape(rows, G), o16.reshape(rows, G * 32).view(np.uint32),
                      per_task)
    else:
        tile_r = min(_TILE_R, -(-R // 8) * 8)
        tasks = p * -(-R // tile_r)
        g_per_task = G if tasks >= 4 * threads else max(1, -(-G // -(-4 * threads // tasks)))
        _dequant_transposed(b_prb.view(np.uint64), b_prb, s_prg, o16.reshape(p, G * 32, R), tile_r, g_per_task)
    return out
