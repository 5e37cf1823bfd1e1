"""jlora: LoRA and QLoRA for JAX/Flax, with base and adapter as two pytrees.

The public surface is ``__all__``; everything else is internal. The
Hugging Face side (``jlora.interop``, ``jlora.peft``) and the reference
models (``jlora.models``) are imported when first used, so ``import jlora``
does not load them (or Flax Linen).
"""
import importlib as _importlib

from jlora.errors import (AdapterError, CheckpointError, ConfigError, FormatError, JloraError,
                          NonFiniteError, UnsavableError)
from jlora.config import ALL_LINEAR, LoraConfig
from jlora.lora import LoRA
from jlora.adapter import combine, count_params, delta, merge, negate, scale, unmerge
from jlora.quant import QArray, dequantize, nbytes, quantize
from jlora.flax import apply, init_adapter
from jlora.transform import adapt
from jlora.bank import AdapterBank
from jlora.checkpoint import restore, save
from jlora.summary import adapted_paths, summary

__version__ = "0.1.0"

__all__ = [
    "JloraError", "ConfigError", "AdapterError", "CheckpointError", "FormatError",
    "NonFiniteError", "UnsavableError",
    "ALL_LINEAR", "LoraConfig", "LoRA",
    "init_adapter", "apply", "adapt", "AdapterBank",
    "merge", "unmerge", "delta", "scale", "negate", "combine", "count_params",
    "QArray", "quantize", "dequantize", "nbytes",
    "save", "restore", "summary", "adapted_paths",
    "interop", "peft", "methods",
]

_LAZY = {"interop": "jlora.interop", "peft": "jlora.interop.peft", "models": "jlora.models",
         "methods": "jlora.methods"}


def __getattr__(name: str):
  """``jlora.interop``, ``jlora.peft`` and ``jlora.models``, imported on first use."""
  if name in _LAZY:
    module = _importlib.import_module(_LAZY[name])
    globals()[name] = module
    return module
  raise AttributeError(f"module 'jlora' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
