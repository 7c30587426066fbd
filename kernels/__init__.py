"""Hot numeric kernels for checkpoint conversion, each a fast path beside a plain reference:

- ``fp8_block_dequant(weight, scale_inv, block_size=128) -> bf16``: DeepSeek FP8; Triton on CUDA,
  numba on CPU, bitwise equal to ``kernels.fp8_reference`` (see ``kernels.fp8``);
- ``fp8_block_quant(w, block_size=128) -> (fp8, scale_inv)``: DeepSeek's scale = amax / 448,
  same dispatch, bitwise equal to the reference's codes and scales;
- ``mxfp4_dequant(blocks, scales, layout="transformers") -> bf16``: gpt-oss MXFP4 experts,
  bitwise equal to ``kernels.mxfp4_reference`` (= transformers' own dequantisation, see ``kernels.mxfp4``).

Importing this package pulls in torch only; numba and triton load on first use.
"""
from kernels.fp8 import fp8_block_dequant, fp8_block_quant
from kernels.mxfp4 import mxfp4_dequant

__all__ = ["fp8_block_dequant", "fp8_block_quant", "mxfp4_dequant"]
