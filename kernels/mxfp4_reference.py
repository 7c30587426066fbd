"""Plain reference for MXFP4 (OCP Microscaling FP4) dequantisation, as gpt-oss publishes its experts.

gpt-oss-20b/120b store each MoE expert weight ``W`` (``gate_up_proj``, ``down_proj``) as two
tensors (transformers 5.19: ``integrations/mxfp4.py``, ``_convert_moe_packed_tensors``;
shapes from ``Mxfp4ReverseDeserialize``, which writes them back):

- ``<name>_blocks``: uint8 ``[E, R, G, 16]``, two FP4 (e2m1) codes per byte, the LOW nibble
  first: byte ``b`` of group ``g`` holds elements ``32 g + 2 b`` (low) and ``32 g + 2 b + 1`` (high);
- ``<name>_scales``: uint8 ``[E, R, G]``, one E8M0 exponent per group of 32 elements, value
  ``2 ** (s - 127)``.

For gpt-oss (hidden H = 2880, intermediate I = 2880): ``gate_up_proj_blocks`` is
``[E, 2I, H / 32, 16]`` and ``down_proj_blocks`` ``[E, H, I / 32, 16]``: R is the output feature,
the groups run along the input feature (the reduction axis, as MX requires). transformers'
``convert_moe_packed_tensors`` returns bf16 ``out[E, R, G * 32].transpose(1, 2).contiguous()``,
i.e. ``[E, in, out]`` (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``, the parameter shapes
of ``GptOssExperts``). Here ``layout="transformers"`` gives that (the last two axes swapped, so
any leading shape works), and ``layout="rows"`` gives ``[..., R, G * 32]`` = ``[E, out, in]``:
the stored order, what a Linear/Megatron weight wants, without two transposes.

The value, per element: ``FP4[code] * 2 ** (s - 127)`` where FP4 is the e2m1 table
``[+0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6]`` (code bit 3 = sign).
Every such product is exact in bf16 (at most 2 significant bits, exponent -128 .. 129; bf16
has fp32's exponent range and subnormals down to 2**-133) except that ``|value| >= 2**128``
overflows to +-inf: this happens for ``s = 254`` (codes with |v| >= 2) and ``s = 255``. So the
definition needs no rounding rule at all: exact value, overflow to inf, signed zeros kept.
transformers computes ``torch.ldexp(lut_bf16[code], s - 127)``, which gives exactly that for
every code and ``s <= 254`` (tested exhaustively against transformers' own function).

The one departure, on purpose: ``s = 255`` is NaN in the OCP MX spec (v1.0, E8M0 has no inf and
one NaN encoding, 0xFF); here every element of such a group dequantises to the bf16 NaN
``0x7FC0`` (the FP8 paths' canonical NaN). transformers instead gives ``ldexp(v, 128)``:
``+-2**127`` for +-0.5, +-inf for the rest, +-0 for zero codes, so a corrupt scale would pass
silently as finite numbers in a quarter of the group. The tests pin both behaviours.

What this module leaves out: MXFP4 quantisation (export back to gpt-oss), other MX element
types (FP6, FP8, INT8), swizzled layouts of GPU kernels (triton_kernels' ``convert_layout``),
and economy: its temporaries peak at ~18 bytes per element (one 2880 x 5760 expert:
~0.3 GB), so run it on slices.
Without it the fast paths (``kernels.mxfp4``) would have nothing plain to be checked against.

Shape legend: P = leading (expert) axes, R = rows (output features), G = groups of 32 along
the input features, K = G * 32 input features.
"""
from __future__ import annotations

import torch

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32  # elements per E8M0 scale
E8M0_BIAS = 127
E8M0_NAN = 255  # the one NaN encoding of E8M0
BF16_NAN_BITS = 0x7FC0  # as kernels.fp8_reference
LAYOUTS = ("transformers", "rows")


def mxfp4_out_shape(blocks_shape: tuple[int, ...], layout: str = "transformers") -> tuple[int, ...]:
    """Shape of the bf16 result for ``blocks`` of ``blocks_shape`` ([*P, R, G, 16])."""
    *P, R, G, _ = blocks_shape
    return (*P, G * MX_GROUP, R) if layout == "transformers" else (*P, R, G * MX_GROUP)


def check_mxfp4_args(blocks: torch.Tensor, scales: torch.Tensor, layout: str, who: str = "mxfp4_dequant") -> None:
    """Raise with the expected shapes/dtypes if ``blocks``/``scales`` are not a gpt-oss MXFP4 pair."""
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {LAYOUTS}, got {layout!r}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"{who}: blocks and scales must be uint8 (as stored in the checkpoint), "
                        f"got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[-1] != MX_GROUP // 2:
        raise ValueError(f"{who}: blocks must be [..., rows, groups, 16] (16 bytes = 32 FP4 codes per group), "
                         f"got {tuple(blocks.shape)}; pass the *_blocks tensor as stored, not reshaped")
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"{who}: scales shape {tuple(scales.shape)} does not match blocks {tuple(blocks.shape)}: "
                         f"expected {tuple(blocks.shape[:-1])} (one E8M0 byte per 32-element group)")


def mxfp4_dequant_reference(blocks: torch.Tensor, scales: torch.Tensor, layout: str = "transformers") -> torch.Tensor:
    """bf16 ``FP4[code] * 2**(s - 127)``, exact, NaN for ``s = 255`` (module docstring)."""
    check_mxfp4_args(blocks, scales, layout, "mxfp4_dequant_reference")
    *P, R, G, B = blocks.shape
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float64, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*P, R, G, 2 * B)  # low nibble first
    value = lut[codes.long()] * torch.exp2(scales.double() - E8M0_BIAS)[..., None]  # exact in float64
    out = value.to(torch.bfloat16)  # exact, or +-inf where |value| >= 2**128
    out.view(torch.int16).masked_fill_((scales == E8M0_NAN)[..., None], BF16_NAN_BITS)
    out = out.reshape(*P, R, G * 2 * B)
    return out.transpose(-1, -2).contiguous() if layout == "transformers" else out
