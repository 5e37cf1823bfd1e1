"""Quantized base weights: QArray, NF4/FP4 (bitsandbytes-compatible), int4, int8.

``quantize`` turns the large kernels of a parameter tree into :class:`QArray`
nodes; ``QArray.dequantize(dtype)`` gives the kernel back where a layer uses
it, inside ``jit``, so a QLoRA step never holds a full-precision base.
"""
from jlora.quant.codebooks import SCHEMES
from jlora.quant.qarray import QArray, partition_specs
from jlora.quant.tree import dequantize, nbytes, quantize, quantize_array

__all__ = ["QArray", "SCHEMES", "quantize", "quantize_array", "dequantize", "nbytes",
           "partition_specs"]
