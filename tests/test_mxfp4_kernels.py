"""MXFP4 (gpt-oss experts) dequantisation: reference == transformers, every fast path == reference, bit for bit.

The reference is checked against transformers' own ``convert_moe_packed_tensors`` on every
(byte, scale) pair and on gpt-oss-shaped tensors; the one intended difference (E8M0 255 = NaN, as
the OCP MX spec says) is pinned from both sides. The numba path runs in-process in both layouts,
on shapes that reach its fast rule, its general rule (scales 0, 1, 253-255 in a tile), its
8-row transposes and their tails; the Triton kernel under TRITON_INTERPRET=1 in a subprocess.
"""
from __future__ import annotations

import pytest
import torch

from kernels import mxfp4_dequant
from kernels.mxfp4 import DEQUANT_IMPLS
from kernels.mxfp4_reference import BF16_NAN_BITS, mxfp4_dequant_reference

EXTREME_SCALES = [0, 1, 2, 126, 127, 128, 252, 253, 254, 255]


def every_pair(scales=range(256)):
    """blocks [1, S, 16, 16] holding all 256 bytes per row, scales [1, S, 16] = one scale per row."""
    s = torch.tensor(list(scales), dtype=torch.uint8)
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).expand(1, s.numel(), 16, 16).contiguous()
    return blocks, s.view(1, -1, 1).expand(1, s.numel(), 16).contiguous()


def random_case(shape, seed, extreme=False):
    """Random bytes; scales like published ones (112..131), or with every extreme value mixed in."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(112, 132, shape, dtype=torch.uint8, generator=g)
    if extreme:
        pick = torch.randint(0, len(EXTREME_SCALES), shape, generator=g)
        mask = torch.rand(shape, generator=g) < 0.3
        scales = torch.where(mask, torch.tensor(EXTREME_SCALES, dtype=torch.uint8)[pick], scales)
    return blocks, scales


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def assert_bitwise(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    mism = bits(got) != bits(want)
    assert not bool(mism.any()), (f"{what}: {int(mism.sum())} of {mism.numel()} elements differ, first at "
                                  f"{mism.nonzero()[0].tolist()}: {int(bits(got)[mism][0]) & 0xFFFF:#x} vs "
                                  f"{int(bits(want)[mism][0]) & 0xFFFF:#x}")


def transformers_dequant(blocks, scales):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    return convert_moe_packed_tensors(blocks, scales)


def test_reference_equals_transformers_on_every_byte_and_scale():
    blocks, scales = every_pair(range(255))
    assert_bitwise(mxfp4_dequant_reference(blocks, scales), transformers_dequant(blocks, scales), "all pairs, s < 255")


@pytest.mark.parametrize("shape", [(2, 64, 90), (3, 17, 5), (1, 1, 1)])
def test_reference_equals_transformers_on_expert_shapes(shape):
    blocks, scales = random_case(shape, seed=sum(shape))
    want = transformers_dequant(blocks, scales)
    E, R, G = shape
    assert want.shape == (E, 32 * G, R)  # [E, in, out]: gpt-oss gate_up_proj [E, H, 2I]
    assert_bitwise(mxfp4_dequant_reference(blocks, scales), want, f"random {shape}")
    assert_bitwise(mxfp4_dequant_reference(blocks, scales, "rows"), want.transpose(1, 2), f"rows {shape}")


def test_scale_255_is_nan_here_and_finite_or_inf_in_transformers():
    blocks, scales = every_pair([255])
    ours = bits(mxfp4_dequant_reference(blocks, scales, "rows")).flatten() & 0xFFFF
    assert (ours == BF16_NAN_BITS).all()
    theirs = transformers_dequant(blocks, scales)[0, :32, 0].float()  # byte 0..15, low nibble first
    codes = torch.tensor([(b >> (4 * h)) & 15 for b in range(16) for h in (0, 1)])  # group 0 holds bytes 0..15
    mag = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    want = torch.where(mag.abs() == 0.5, mag.sign() * 2.0**127, torch.where(mag == 0, mag, mag * float("inf")))
    assert torch.equal(theirs, want)  # ldexp(v, 128): +-2**127 for +-0.5, +-inf above, +-0 kept


def test_hand_computed_values():
    cases = [(1, 127, 0x3F00), (7, 127, 0x40C0), (15, 127, 0xC0C0), (8, 127, 0x8000), (0, 200, 0x0000),
             (1, 0, 0x0020), (3, 0, 0x0060), (4, 0, 0x0080), (1, 1, 0x0040), (2, 1, 0x0080), (11, 0, 0x8060),
             (3, 254, 0x7F40), (4, 254, 0x7F80), (15, 254, 0xFF80), (1, 255, BF16_NAN_BITS), (0, 255, BF16_NAN_BITS)]
    blocks = torch.tensor([c for c, _, _ in cases], dtype=torch.uint8).view(1, -1, 1, 1).expand(1, len(cases), 1, 16)
    scales = torch.tensor([s for _, s, _ in cases], dtype=torch.uint8).view(1, -1, 1)
    for impl in DEQUANT_IMPLS:
        if impl == "triton":
            continue  # runs in the interpreter test below
        got = bits(mxfp4_dequant(blocks.contiguous(), scales, "rows", impl=impl))[0, :, 0].int() & 0xFFFF
        assert got.tolist() == [want for _, _, want in cases], impl


@pytest.mark.parametrize("layout", ["transformers", "rows"])
@pytest.mark.parametrize("shape,extreme", [((3, 100, 7), False), ((3, 100, 7), True), ((2, 5760 // 8, 90), False),
                                            ((1, 2053, 3), True), ((2, 3, 13, 2), True), ((9, 1), True),
                                            ((4, 8, 33), False)])
def test_cpu_matches_reference(layout, shape, extreme):
    blocks, scales = random_case(shape, seed=len(shape) * 100 + shape[-1], extreme=extreme)
    assert_bitwise(mxfp4_dequant(blocks, scales, layout, impl="cpu"), mxfp4_dequant_reference(blocks, scales, layout),
                   f"cpu {layout} {shape}")


@pytest.mark.parametrize("layout", ["transformers", "rows"])
def test_cpu_on_every_byte_and_scale(layout):
    blocks, scales = every_pair()
    assert_bitwise(mxfp4_dequant(blocks, scales, layout, impl="cpu"), mxfp4_dequant_reference(blocks, scales, layout),
                   f"all pairs {layout}")


def test_threads_out_argument_and_non_contiguous_input():
    blocks, scales = random_case((4, 300, 12), seed=9, extreme=True)
    want = mxfp4_dequant_reference(blocks, scales)
    out = torch.empty(4, 384, 300, dtype=torch.bfloat16)
    assert mxfp4_dequant(blocks, scales, out=out).data_ptr() == out.data_ptr()
    assert_bitwise(out, want, "out=")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_bitwise(mxfp4_dequant(blocks, scales), want, "1 thread")
    finally:
        torch.set_num_threads(before)
    b_nc = blocks.transpose(0, 1).contiguous().transpose(0, 1)
    assert not b_nc.is_contiguous()
    assert_bitwise(mxfp4_dequant(b_nc, scales), want, "non-contiguous blocks")


def test_errors_name_the_problem():
    blocks, scales = random_case((2, 8, 3), seed=1)
    with pytest.raises(ValueError, match=r"scales shape \(2, 8, 2\) does not match blocks \(2, 8, 3, 16\)"):
        mxfp4_dequant(blocks, scales[..., :2])
    with pytest.raises(ValueError, match=r"\[\.\.\., rows, groups, 16\]"):
        mxfp4_dequant(blocks.view(2, 8, 6, 8), scales)
    with pytest.raises(TypeError, match="uint8"):
        mxfp4_dequant(blocks.view(torch.int8), scales)
    with pytest.raises(ValueError, match="layout must be one of"):
        mxfp4_dequant(blocks, scales, "columns")
    with pytest.raises(ValueError, match=r"out must be a contiguous bf16 tensor of shape \(2, 96, 8\)"):
        mxfp4_dequant(blocks, scales, out=torch.empty(2, 8, 96, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown impl"):
        mxfp4_dequant(blocks, scales, impl="gpu")


TRITON_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import kernels.mxfp4_triton as kt
from kernels.mxfp4_reference import mxfp4_dequant_reference
from tests.test_mxfp4_kernels import every_pair, random_case
report = {"kernel_type": type(kt._mxfp4_dequant_kernel).__name__, "mismatches": {}}
cases = [("all pairs", every_pair()), ("(3, 100, 7)", random_case((3, 100, 7), 1)),
         ("(3, 100, 7) extreme", random_case((3, 100, 7), 2, True)),
         ("(2, 3, 13, 2)", random_case((2, 3, 13, 2), 3, True)),
         ("(9, 1)", random_case((9, 1), 4, True)), ("(1, 70, 90)", random_case((1, 70, 90), 5))]
for name, (blocks, scales) in cases:
    for layout in ("transformers", "rows"):
        got = kt.mxfp4_dequant_triton(blocks, scales, layout)
        want = mxfp4_dequant_reference(blocks, scales, layout)
        if tuple(got.shape) != tuple(want.shape):
            report["mismatches"][f"{name} {layout}"] = f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
            continue
        report["mismatches"][f"{name} {layout}"] = int((got.view(torch.int16) != want.view(torch.int16)).sum())
print(json.dumps(report))
"""


def test_triton_interpreter_matches_reference():
    from triton_helpers import run_interpreted  # not at module level: the script imports this module

    report = run_interpreted(TRITON_SCRIPT)
    assert report["mismatches"] and all(v == 0 for v in report["mismatches"].values()), report["mismatches"]
