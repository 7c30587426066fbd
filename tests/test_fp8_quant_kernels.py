"""FP8 block quantisation (bf16/fp32 -> e4m3fn + fp32 scales): every fast path against the reference, bit for bit.

The numba path runs in-process; the Triton kernel runs under TRITON_INTERPRET=1 in a subprocess
(``triton.jit`` reads that variable when ``kernels.fp8_quant_triton`` is imported), on small
shapes: the interpreter is ~50x slower. Inputs: random weights with per-block magnitudes, every
finite bf16 bit pattern, and hand-built blocks for each corner of the definition in
``kernels.fp8_reference`` (ties, the 448 clamp, e4m3 subnormals, bf16/fp32 subnormal input, the
scale underflow of tiny fp32 blocks, zero blocks, NaN and inf). Round trips: the error bound of
``kernels.fp8`` is in tests/test_fp8_kernels.py; here, what quant(dequant(quant(x))) keeps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import fp8_block_dequant, fp8_block_quant
from kernels.fp8 import QUANT_IMPLS
from kernels.fp8_quant_cpu import fp8_block_quant_cpu
from kernels.fp8_reference import F32_NAN_BITS, FP8_NAN_CODE, fp8_block_quant_reference, scale_shape

NAN, INF = float("nan"), float("inf")


def weights(shape, seed, dtype=torch.bfloat16, lo=-30.0, hi=10.0, block=128):
    """Gaussian values whose scale changes from block to block (2**lo .. 2**hi)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.empty(scale_shape(shape, block)).uniform_(lo, hi, generator=g).floor()
    mag = torch.exp2(e).repeat_interleave(block, 0).repeat_interleave(block, 1)[:shape[0], :shape[1]]
    return (torch.randn(shape, generator=g) * mag).to(dtype)


def all_bf16_patterns(finite=True, seed=0) -> torch.Tensor:
    """Every bf16 bit pattern (optionally only the finite ones), shuffled into a [rows, 256] tensor."""
    pats = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    if finite:
        pats = pats[torch.isfinite(pats)]
    pats = pats[torch.randperm(pats.numel(), generator=torch.Generator().manual_seed(seed))]
    n = pats.numel() // 256 * 256
    return pats[:n].view(-1, 256).contiguous()


def corner_blocks(dtype=torch.float32) -> torch.Tensor:
    """[8, 128] rows of one 8 x 8-block tensor (block 8): one corner of the definition per block (see comments)."""
    x = torch.zeros(8, 64, dtype=torch.float64)
    # block (0, 0): amax 448 -> scale 1 exactly; e4m3 ties round to even: 1.0625 (between 1 and 1.125) -> 1,
    # 1.1875 -> 1.25, 440 (between 416 and 448) -> 448, 2**-10 (half the smallest subnormal) -> 0, 3 * 2**-10 -> 2**-8
    x[0, :8] = torch.tensor([448, 1.0625, 1.1875, 440, 2**-10, 3 * 2**-10, -1.0625, -2**-10])
    x[1, :8] = torch.tensor([15 * 2**-10, 0.01953125, 2**-6, 2**-6 - 2**-10, 0.5 + 2**-5, 0.5 + 2**-4, 7 * 2**-9, -0.0])
    # block (0, 1): amax 447 -> a scale just below 1, so 447 / s rounds past 448 and must clamp
    x[0, 8:16] = torch.tensor([447, 446, 432, 431.99, -447, 1, 0.1, -0.1])
    # block (0, 2): all zero, with a -0: scale 1, codes 0x00 / 0x80
    x[1, 16] = -0.0
    # block (0, 3): bf16/fp32 subnormal inputs beside a normal amax
    x[0, 24:32] = torch.tensor([1e-3, 1e-39, -1e-39, 2.0**-133, 1e-45, -1e-45, 3e-40, 0])
    # block (0, 4): only fp32 subnormals: amax 1e-45 (2**-149), amax / 448 underflows to 0 -> scale 1
    x[0, 32:36] = torch.tensor([1e-45, -1e-45, 0, 1e-45])
    # block (0, 5): huge values (fp32), scale near 2**128 / 448
    x[0, 40:44] = torch.tensor([3.0e38, -1.0e38, 1.0, 2.0**120])
    # blocks (0, 6), (0, 7): amax 448 * 2**-20, so s = 2**-20 exactly; the rest: every e4m3 midpoint * s, +-
    mids = torch.full((128,), 448.0, dtype=torch.float64)
    mids[~_MID_SLOTS_448] = e4m3_midpoints() * torch.tensor([1.0, -1.0]).repeat(63)
    x[:, 48:64] = mids.view(8, 16) * 2.0**-20
    return x.to(dtype)


_MID_SLOTS_448 = (torch.arange(128) == 0) | (torch.arange(128) == 8)  # x[0, 48], x[0, 56]: one per block


def e4m3_midpoints() -> torch.Tensor:
    """The 126 midpoints between consecutive non-negative e4m3fn values (0 .. 448), in fp64."""
    v = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return (v[1:] + v[:-1]) / 2


def nonfinite_blocks(dtype=torch.float32) -> torch.Tensor:
    """Block size 4: a NaN block, an inf block, a -inf block, a NaN+inf block, a finite block."""
    x = torch.ones(4, 20, dtype=dtype)
    x[1, 1] = NAN
    x[2, 5], x[0, 6] = INF, -3.0
    x[3, 9] = -INF
    x[0, 12], x[1, 13] = NAN, INF
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def assert_same(got, want, what):
    (q, s), (q_ref, s_ref) = got, want
    for name, a, b in [("codes", bits(q), bits(q_ref)), ("scales", bits(s), bits(s_ref))]:
        mism = a != b
        assert not bool(mism.any()), (f"{what}: {name}: {int(mism.sum())} of {mism.numel()} differ, first at "
                                      f"{mism.nonzero()[0].tolist()}: {int(a[mism][0]):#x} vs {int(b[mism][0]):#x}")


@pytest.mark.parametrize("shape", [(1, 1), (129, 257), (1000, 700), (128, 1000), (5, 3000), (384, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_matches_reference_on_weights(shape, dtype):
    w = weights(shape, seed=shape[0] + shape[1], dtype=dtype)
    assert_same(fp8_block_quant(w, impl="cpu"), fp8_block_quant_reference(w), f"cpu {shape} {dtype}")


@pytest.mark.parametrize("finite", [True, False])
def test_cpu_matches_reference_on_every_bf16_pattern(finite):
    w = all_bf16_patterns(finite)
    assert_same(fp8_block_quant_cpu(w), fp8_block_quant_reference(w), "all bf16 patterns")
    assert_same(fp8_block_quant_cpu(w, 32), fp8_block_quant_reference(w, 32), "all bf16 patterns, block 32")


def test_cpu_matches_reference_on_random_fp32_bits():
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-2**31, 2**31 - 1, (300, 520), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)
    w = torch.where(torch.isfinite(w), w, torch.zeros(()))
    assert_same(fp8_block_quant_cpu(w), fp8_block_quant_reference(w), "random fp32 bits")
    assert_same(fp8_block_quant_cpu(w, 16), fp8_block_quant_reference(w, 16), "random fp32 bits, block 16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_matches_reference_on_corner_blocks(dtype):
    x = corner_blocks(dtype)
    q, s = fp8_block_quant_cpu(x, 8)
    assert_same((q, s), fp8_block_quant_reference(x, 8), f"corners {dtype}")
    codes = q.view(torch.uint8)
    assert codes[0, :8].tolist() == [0x7E, 0x38, 0x3A, 0x7E, 0x00, 0x02, 0xB8, 0x80] and s[0, 0] == 1.0
    assert codes[0, 8] == 0x7E and codes[0, 12] == 0xFE  # +-447 / s beyond 448 clamp
    assert s[0, 2] == 1.0 and codes[1, 16] == 0x80 and int(codes[0, 17]) == 0  # zero block
    if dtype == torch.float32:
        assert s[0, 4] == 1.0 and codes[0, 32:36].tolist() == [0, 0x80, 0, 0]  # underflowed scale -> 1
    # midpoints between codes c and c + 1 round to the even one, c + (c & 1), whatever the sign
    assert s[0, 6] == 2.0**-20 and s[0, 7] == 2.0**-20
    mid_codes = codes[:, 48:64].flatten()[~_MID_SLOTS_448].view(63, 2)
    c = torch.arange(126).view(63, 2)
    assert torch.equal(mid_codes & 0x7F, (c + (c & 1)).to(torch.uint8)) and (mid_codes[:, 1] >= 0x80).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nonfinite_input_definition(dtype):
    """The kernels define NaN/inf input (the public entry point refuses it): see kernels.fp8_reference."""
    x = nonfinite_blocks(dtype)
    want = fp8_block_quant_reference(x, 4)
    assert_same(fp8_block_quant_cpu(x, 4), want, f"non-finite {dtype}")
    q, s = want
    codes = q.view(torch.uint8)
    assert bits(s)[0, 0] == F32_NAN_BITS and (codes[:4, :4] == FP8_NAN_CODE).all()  # NaN block: all NaN
    assert s[0, 1] == INF and codes[2, 5] == FP8_NAN_CODE and codes[0, 6] == 0x80 and codes[0, 4] == 0  # inf block
    assert s[0, 2] == INF and codes[3, 9] == FP8_NAN_CODE  # -inf block: the scale is +inf
    assert bits(s)[0, 3] == F32_NAN_BITS and (codes[:, 12:16] == FP8_NAN_CODE).all()  # NaN wins over inf
    assert s[0, 4] == torch.tensor(1.0) / 448 and (codes[:, 16:] == 0x7E).all()
    with pytest.raises(ValueError, match=r"inf or NaN in 4 of 5 blocks \(first: rows 0.., cols 0..\)"):
        fp8_block_quant(x, 4)


def test_e4m3_rounding_matches_torch_on_a_sweep_of_fp32():
    """e4m3_code against torch's own fp32 -> e4m3fn cast on |x| <= 448: a stride through all patterns, plus
    every pattern within 64 of each e4m3 value and each midpoint (an exhaustive run over all 2.2e9 was clean)."""
    from numba import njit

    from kernels.fp8_quant_cpu import e4m3_code

    @njit
    def codes_of(x):
        out = np.empty(x.shape[0], np.uint8)
        for i in range(x.shape[0]):
            out[i] = e4m3_code(x[i])
        return out

    top = 0x43E00000  # 448.0
    sweep = torch.arange(0, top + 1, 997, dtype=torch.int64)
    e4m3 = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    points = torch.cat([e4m3, (e4m3[1:] + e4m3[:-1]) / 2]).view(torch.int32).to(torch.int64)
    near = (points[:, None] + torch.arange(-64, 65)[None, :]).flatten().clamp(0, top)
    pos = torch.cat([sweep, near]).to(torch.int32)
    x = torch.cat([pos, pos | torch.tensor(-2**31, dtype=torch.int32)]).view(torch.float32)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert (codes_of(x.numpy()) == want).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_input_dtypes_go_through_float(dtype):
    w = weights((200, 300), seed=3, dtype=dtype, lo=-10, hi=5)
    assert_same(fp8_block_quant(w), fp8_block_quant_reference(w), f"{dtype}")


def test_out_argument_threads_and_dispatch():
    w = weights((384, 1000), seed=4)
    q, s = torch.empty(384, 1000, dtype=torch.float8_e4m3fn), torch.empty(3, 8)
    got = fp8_block_quant(w, out=(q, s))
    assert got[0].data_ptr() == q.data_ptr() and got[1].data_ptr() == s.data_ptr()
    assert_same(got, fp8_block_quant_reference(w), "out=")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fp8_block_quant(w, impl="cpu")
    finally:
        torch.set_num_threads(before)
    assert_same(one, got, "1 thread vs default")
    w_t = w.t().contiguous().t()  # same values, column-major
    assert_same(fp8_block_quant(w_t), got, "non-contiguous input")
    assert set(QUANT_IMPLS) == {"reference", "cpu", "triton"}
    assert_same(fp8_block_quant(w, impl="reference"), got, "dispatched reference")


def test_errors_name_the_problem():
    w = weights((200, 300), seed=1)
    with pytest.raises(ValueError, match=r"out\[1\] \(scale_inv\) must be a contiguous torch.float32 tensor "
                                         r"of shape \(2, 3\)"):
        fp8_block_quant(w, out=(torch.empty(200, 300, dtype=torch.float8_e4m3fn), torch.empty(2, 2)))
    with pytest.raises(ValueError, match=r"out\[0\] \(codes\)"):
        fp8_block_quant(w, out=(torch.empty(200, 300, dtype=torch.uint8), torch.empty(2, 3)))
    with pytest.raises(ValueError, match="unknown impl"):
        fp8_block_quant(w, impl="avx")
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quant(w.view(1, 200, 300))
    with pytest.raises(TypeError, match="torch.int32"):
        fp8_block_quant(w.view(torch.int16).int())


def _round_trip(x):
    q, s = fp8_block_quant(x)
    return (q, s), fp8_block_quant(fp8_block_dequant(q, s))


def test_round_trip_is_exact_for_bf16_input():
    """bf16 x, every block scale >= 2**-117: dequant(q) * (1 +- 2**-9) is q's value scaled, far from every e4m3
    midpoint, and max |dequant| = bf16(448 * s) = amax: quant(dequant(quant(x))) == quant(x), codes and scales."""
    for x in [weights((1024, 1024), seed=5, lo=-100, hi=120), all_bf16_patterns()]:
        first, again = _round_trip(x)
        assert float(first[1].min()) >= 2.0**-117
        assert_same(again, first, f"bf16 round trip {tuple(x.shape)}")


def test_round_trip_limits():
    """Where it stops holding: tiny bf16 blocks (dequantised values are bf16 subnormals) change codes; fp32
    input changes scales (its amax is not a bf16 number; the dequantised amax is)."""
    tiny = weights((512, 512), seed=6, lo=-130, hi=-118)
    first, again = _round_trip(tiny)
    assert bool((bits(first[0]) != bits(again[0])).any()) and torch.equal(first[1], again[1])
    first, again = _round_trip(weights((512, 512), seed=6, dtype=torch.float32, lo=-4, hi=4))
    assert bool((first[1] != again[1]).all())


TRITON_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernels.fp8_quant_triton as kt
from kernels.fp8_reference import fp8_block_quant_reference
from tests.test_fp8_quant_kernels import weights, all_bf16_patterns, corner_blocks, nonfinite_blocks
report = {"kernel_type": type(kt._fp8_block_quant_kernel).__name__, "mismatches": {}}
cases = [("weights bf16 (1, 1)", weights((1, 1), 1), 128), ("weights bf16 (129, 257)", weights((129, 257), 2), 128),
         ("weights fp32 (300, 250)", weights((300, 250), 3, torch.float32), 128),
         ("weights bf16 (200, 300) block 96", weights((200, 300), 4), 96),
         ("all finite bf16 patterns", all_bf16_patterns()[:128], 128),
         ("all bf16 patterns", all_bf16_patterns(False)[:64], 32),
         ("corners bf16", corner_blocks(torch.bfloat16), 8), ("corners fp32", corner_blocks(), 8),
         ("non-finite bf16", nonfinite_blocks(torch.bfloat16), 4), ("non-finite fp32", nonfinite_blocks(), 4)]
for name, w, block in cases:
    q, s = kt.fp8_block_quant_triton(w, block)
    q_ref, s_ref = fp8_block_quant_reference(w, block)
    report["mismatches"][name] = [int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()),
                                  int((s.view(torch.int32) != s_ref.view(torch.int32)).sum())]
print(json.dumps(report))
"""


def test_triton_interpreter_matches_reference():
    from triton_helpers import run_interpreted  # not at module level: the script imports this module

    report = run_interpreted(TRITON_SCRIPT)
    assert report["mismatches"] and all(v == [0, 0] for v in report["mismatches"].values()), report["mismatches"]
