"""jlora: LoRA and QLoRA for JAX/Flax, with base and adapter as two pytrees.

The public surface is ``__all__``; everything else is internal.
"""
from jlora.errors import (AdapterError, CheckpointError, ConfigError, FormatError, JloraError,
                          NonFiniteError)
from jlora.config import ALL_LINEAR, LoraConfig
from jlora.lora import LoRA
from jlora.adapter import combine, count_params, delta, merge, negate, scale, unmerge
from jlora.quant import QArray, dequantize, nbytes, quantize
from jlora.flax import apply, init_adapter
from jlora.transform import adapt
from jlora.bank import AdapterBank
from jlora.checkpoint import restore, save
from jlora import interop
from jlora.interop import peft
from jlora import methods

__version__ = "0.1.0"

__all__ = [
    "JloraError", "ConfigError", "AdapterError", "CheckpointError", "FormatError",
    "NonFiniteError",
    "ALL_LINEAR", "LoraConfig", "LoRA",
    "init_adapter", "apply", "adapt", "AdapterBank",
    "merge", "unmerge", "delta", "scale", "negate", "combine", "count_params",
    "QArray", "quantize", "dequantize", "nbytes",
    "save", "restore",
    "interop", "peft", "methods",
]
