"""Hot numeric kernels. FP8 block (de)quantisation for DeepSeek checkpoints:

- ``fp8_block_dequant(weight, scale_inv, block_size=128) -> bf16``: Triton on CUDA, numba on CPU,
  bitwise equal to ``kernels.fp8_reference`` (see ``kernels.fp8``);
- ``fp8_block_quant(w, block_size=128) -> (fp8, scale_inv)``: DeepSeek's scale = amax / 448.

Importing this package pulls in torch only; numba and triton load on first use.
"""
from kernels.fp8 import fp8_block_dequant, fp8_block_quant

__all__ = ["fp8_block_dequant", "fp8_block_quant"]
