"""Plain MXFP4 quantisation, for fabricating gpt-oss-style test checkpoints (``tools.make_tiny``).

``mxfp4_quant(w, layout="transformers") -> (blocks, scales)`` is the inverse direction of
``kernels.mxfp4_dequant``: ``w`` in the layout transformers holds gpt-oss experts in
(``[*P, K, R]``: gate_up_proj ``[E, H, 2I]``, down_proj ``[E, I, H]``) or, with ``layout="rows"``,
in the stored row order ``[*P, R, K]``; the result is what the published checkpoints store,
``*_blocks`` uint8 ``[*P, R, K / 32, 16]`` (two e2m1 codes per byte, low nibble first) and
``*_scales`` uint8 ``[*P, R, K / 32]`` (E8M0, ``2 ** (s - 127)``).

Each group of 32 takes the smallest power-of-two scale that brings its largest magnitude within
the e2m1 range (6), then every element rounds to the nearest e2m1 value (ties to the smaller
magnitude). That is a valid encoding, not the one OpenAI's trainer produced: the truth a test
holds a reader to is what transformers' own dequantisation makes of the bytes
(``tests/test_gpt_oss.py``), never these rounding choices. Plain torch, no speed claims: it
fabricates megabytes.

Leaves out: export of a converted checkpoint back to MXFP4 (``mcore2hf`` writes bf16), NaN and inf
inputs (refused).

Shape legend: P leading (expert) axes, R rows (output features), K input features, G = K / 32.
"""
from __future__ import annotations

import torch

from kernels.mxfp4_reference import E8M0_BIAS, FP4_E2M1_VALUES, MX_GROUP

_MAGNITUDES = torch.tensor(FP4_E2M1_VALUES[:8], dtype=torch.float64)  # codes 0..7; bit 3 is the sign
_FP4_MAX = 6.0


def mxfp4_quant(w: torch.Tensor, layout: str = "transformers") -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks [*P, R, G, 16], scales [*P, R, G])`` (uint8) encoding ``w`` (module docstring)."""
    if layout not in ("transformers", "rows"):
        raise ValueError(f"mxfp4_quant: layout must be 'transformers' or 'rows', got {layout!r}")
    w_RK = (w.transpose(-1, -2) if layout == "transformers" else w).double()
    if w_RK.dim() < 2 or w_RK.shape[-1] % MX_GROUP:
        raise ValueError(f"mxfp4_quant: the input-feature axis must be a multiple of {MX_GROUP}, got shape "
                         f"{tuple(w.shape)} (layout {layout!r})")
    if not torch.isfinite(w_RK).all():
        raise ValueError("mxfp4_quant: NaN or inf in the input; MXFP4 fabrication takes finite values only")
    *P, R, K = w_RK.shape
    g_RGn = w_RK.reshape(*P, R, K // MX_GROUP, MX_GROUP)
    amax_RG = g_RGn.abs().amax(-1)
    exp_RG = torch.where(amax_RG > 0, torch.ceil(torch.log2(amax_RG / _FP4_MAX)), torch.zeros_like(amax_RG))
    exp_RG = exp_RG.clamp(-E8M0_BIAS, 254 - E8M0_BIAS)
    x_RGn = g_RGn / torch.exp2(exp_RG)[..., None]
    codes = (x_RGn.abs()[..., None] - _MAGNITUDES).abs().argmin(-1)  # first minimum: ties go down
    codes = codes | ((x_RGn < 0) & (codes > 0)).long() << 3
    pairs = codes.to(torch.uint8).reshape(*P, R, K // MX_GROUP, MX_GROUP // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.contiguous(), (exp_RG + E8M0_BIAS).to(torch.uint8).contiguous()
