"""FP8 block (de)quantisation: every fast path against the plain reference, bit for bit.

Covers the CPU path (numba) in-process and the Triton kernel under TRITON_INTERPRET=1 in a
subprocess: ``triton.jit`` reads that variable when it decorates the kernel (at import of
``kernels.fp8_triton``), so it cannot be switched on inside a pytest process that may already
have imported the module. Hand-computed cases pin round-to-nearest-even, the fp32-then-bf16
double rounding and the NaN contract independently of torch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import fp8_block_dequant, fp8_block_quant
from kernels.fp8 import DEQUANT_IMPLS, default_impl
from kernels.fp8_reference import (BF16_NAN_BITS, fp8_block_dequant_reference, fp8_block_quant_reference,
                                   scale_shape)

SHAPES = [(1, 1), (129, 257), (1000, 700), (7168, 2048), (128, 1000), (5, 3000)]


def random_case(shape, seed, extreme=False, block=128):
    """Random e4m3fn bit patterns (NaN codes included) and random scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    lo, hi = (-160.0, 130.0) if extreme else (-24.0, 2.0)  # extreme: subnormal and inf products
    s = torch.exp2(torch.empty(scale_shape(shape, block)).uniform_(lo, hi, generator=g))
    s *= torch.where(torch.rand(s.shape, generator=g) < 0.2, -1.0, 1.0)
    if extreme and s.numel() >= 6:
        s.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45])
    return w, s


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def assert_bitwise(got, want, what):
    mism = bits(got) != bits(want)
    assert not bool(mism.any()), (f"{what}: {int(mism.sum())} of {mism.numel()} elements differ, first at "
                                  f"{mism.nonzero()[0].tolist()}: {bits(got)[mism][0]:#x} vs {bits(want)[mism][0]:#x}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_cpu_path_matches_reference(shape, extreme):
    w, s = random_case(shape, seed=shape[0] * 7 + shape[1] + extreme, extreme=extreme)
    assert_bitwise(fp8_block_dequant(w, s, impl="cpu"), fp8_block_dequant_reference(w, s), f"cpu {shape}")


@pytest.mark.parametrize("block", [64, 96])
def test_cpu_path_other_block_sizes(block):
    w, s = random_case((300, 250), seed=block, extreme=True, block=block)
    assert_bitwise(fp8_block_dequant(w, s, block, impl="cpu"), fp8_block_dequant_reference(w, s, block), "cpu")


def test_cpu_path_same_bits_on_one_and_two_threads():
    w, s = random_case((128, 4000), seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fp8_block_dequant(w, s, impl="cpu")
        torch.set_num_threads(2)
        two = fp8_block_dequant(w, s, impl="cpu")
    finally:
        torch.set_num_threads(before)
    assert_bitwise(one, two, "1 vs 2 threads")


def test_non_contiguous_weight_and_out_argument():
    w, s = random_case((384, 200), seed=5)
    w_t = w.view(torch.uint8).t().contiguous().t().view(torch.float8_e4m3fn)  # same values, column-major
    assert not w_t.is_contiguous()
    out = torch.empty(384, 200, dtype=torch.bfloat16)
    got = fp8_block_dequant(w_t, s, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_bitwise(out, fp8_block_dequant_reference(w, s), "non-contiguous")


def _hand_cases():
    """(code, scale, expected bf16 bits) worked out by hand; see comments."""
    cases = [
        (0x38, 3.0, 0x4040),            # 1.0 * 3 = 3.0
        (0x01, 1.0, 0x3B00),            # smallest subnormal 2**-9
        (0x7E, 1.0, 0x43E0),            # largest finite 448 = 1.75 * 2**8
        (0xFE, 1.0, 0xC3E0),            # -448
        (0x80, 5.0, 0x8000),            # -0 * 5 = -0
        (0x38, 1 + 2**-8, 0x3F80),      # tie between 0x3F80 and 0x3F81: round to even (down)
        (0x38, 1 + 3 * 2**-8, 0x3F82),  # tie between 0x3F81 and 0x3F82: round to even (up); truncation gives 0x3F81
        (0x38, 1 + 2**-8 + 2**-20, 0x3F81),  # just above the tie: up
        (0x7E, 2.0**120, 0x7F80),       # 448 * 2**120 overflows fp32 -> +inf
        (0x7F, 1.0, BF16_NAN_BITS),     # NaN code
        (0xFF, 1.0, BF16_NAN_BITS),     # NaN code with the sign bit: the sign is not kept
        (0x38, float("nan"), BF16_NAN_BITS),
        (0x00, float("inf"), BF16_NAN_BITS),  # 0 * inf
    ]
    cases.append(_double_rounding_case())
    return cases


def _double_rounding_case():
    """A code and scale whose exact product lies just above the bf16 tie 1 + 2**-8 but rounds onto
    it in fp32: the definition (fp32 product, then RNE to bf16) gives 0x3F80, one rounding 0x3F81."""
    tie = 1 + 2.0**-8
    for mant in range(1, 8):  # codes 0x39..0x3F = 1 + mant / 8
        v = 1 + mant / 8
        s = np.float32(tie / v)
        for _ in range(8):
            exact = float(s) * v  # exact in float64: 24 x 4 significant bits
            if exact > tie and float(np.float32(exact)) == tie:
                return 0x38 | mant, float(s), 0x3F80
            s = np.nextafter(s, np.float32(2), dtype=np.float32)
    raise AssertionError("no double-rounding case found near 1 + 2**-8")


def _hand_tensors():
    cases = _hand_cases()
    codes = torch.tensor([c for c, _, _ in cases], dtype=torch.uint8)
    # one element per 1x1 block, so every element gets its own scale
    return (codes.view(1, -1).view(torch.float8_e4m3fn), torch.tensor([[s for _, s, _ in cases]], dtype=torch.float32),
            torch.tensor([e for _, _, e in cases], dtype=torch.int32))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_hand_computed_values(impl):
    w, s, want = _hand_tensors()
    got = bits(fp8_block_dequant(w, s, block_size=1, impl=impl)).view(-1).int() & 0xFFFF
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_nan_contract_on_all_codes(impl):
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    out = fp8_block_dequant(codes.view(torch.float8_e4m3fn), torch.tensor([[0.5]]), impl=impl)
    nan_codes = (codes & 0x7F) == 0x7F
    assert torch.isnan(out).eq(nan_codes).all()
    assert (bits(out)[nan_codes] == BF16_NAN_BITS).all()
    # every other code: exactly half the code's value (a power-of-two scale is exact)
    want = codes.view(torch.float8_e4m3fn).float() * 0.5
    assert torch.equal(out.float()[~nan_codes], want[~nan_codes])


TRITON_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernels.fp8_triton as kt
from kernels.fp8_reference import fp8_block_dequant_reference
from tests.test_fp8_kernels import random_case, _hand_tensors
report = {"kernel_type": type(kt._fp8_block_dequant_kernel).__name__, "mismatches": {}}
cases = [((1, 1), 128, False), ((129, 257), 128, False), ((1000, 700), 128, True), ((896, 2048), 128, False),
         ((300, 250), 96, True)]
for shape, block, extreme in cases:
    w, s = random_case(shape, seed=11, extreme=extreme, block=block)
    got = kt.fp8_block_dequant_triton(w, s, block)
    want = fp8_block_dequant_reference(w, s, block)
    report["mismatches"][f"{shape} block {block}"] = int((got.view(torch.int16) != want.view(torch.int16)).sum())
w, s, want = _hand_tensors()
got = kt.fp8_block_dequant_triton(w, s, 1).view(torch.int16).view(-1).int() & 0xFFFF
report["hand"] = [got.tolist(), want.tolist()]
print(json.dumps(report))
"""


def test_triton_interpreter_matches_reference():
    from triton_helpers import run_interpreted  # not at module level: the script imports this module

    report = run_interpreted(TRITON_SCRIPT, timeout=300)
    assert report["mismatches"] and all(v == 0 for v in report["mismatches"].values()), report["mismatches"]
    assert report["hand"][0] == report["hand"][1]


def test_dispatch_picks_cpu_path_and_validates():
    assert default_impl(torch.device("cpu")) == "cpu" and set(DEQUANT_IMPLS) == {"reference", "cpu", "triton"}
    w, s = random_case((200, 300), seed=1)
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        fp8_block_dequant(w, s[:, :2])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_block_dequant(w.view(torch.uint8), s)
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_dequant(w.view(1, 200, 300), s)
    with pytest.raises(ValueError, match="unknown impl"):
        fp8_block_dequant(w, s, impl="cuda-graph")


@pytest.mark.parametrize("shape", [(1, 1), (129, 257), (300, 1000)])
def test_quant_matches_reference(shape):
    g = torch.Generator().manual_seed(shape[1])
    w = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 4, shape, generator=g).float()))
    w = w.to(torch.bfloat16)
    q, s = fp8_block_quant(w)
    q_ref, s_ref = fp8_block_quant_reference(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_quant_round_trip_error_bound():
    """|dq(q(x)) - x| <= (2**-4 + 2**-8)|x| + 2**-10 s: e4m3 half-ulp, bf16 half-ulp, subnormal floor."""
    g = torch.Generator().manual_seed(0)
    M, N = 384, 520
    mag = torch.exp2(torch.empty(3, 5).uniform_(-20, 4, generator=g)).repeat_interleave(128, 0).repeat_interleave(128, 1)
    x = (torch.randn(M, N, generator=g) * mag[:M, :N] * torch.exp2(-12 * torch.rand(M, N, generator=g)))
    x[:128, :128] = 0.0  # an all-zero block: scale 1, exact zeros back
    x = x.to(torch.bfloat16)
    q, s = fp8_block_quant(x)
    y = fp8_block_dequant(q, s).double()
    xd = x.double()
    s_MN = s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:M, :N]
    err = (y - xd).abs()
    bound = (2.0**-4 + 2.0**-8) * xd.abs() + 2.0**-10 * s_MN
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3f}"
    assert float((err / bound).max()) > 0.5  # the bound is close to tight, so a worse quantiser fails
    assert s[0, 0] == 1.0 and torch.equal(y[:128, :128], torch.zeros(128, 128, dtype=torch.float64))
    # the element holding each block's amax codes to +-448 and comes back within bf16 rounding
    assert int((q.view(torch.uint8) & 0x7F == 0x7E).sum()) >= s.numel() - 1


def test_quant_rejects_non_finite():
    with pytest.raises(ValueError, match="inf or NaN"):
        fp8_block_quant(torch.tensor([[1.0, float("inf")]]))
