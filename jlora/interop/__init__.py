"""Hugging Face interop: safetensors checkpoints (:mod:`.hf`), PEFT adapters (:mod:`.peft`),
Hub names through the local cache (:mod:`.hub`).

Submodules load when first used, so ``import jlora`` stays light; nothing here
imports :mod:`jlora.models` until a reference model is built (``from_hf``).
"""
import importlib

__all__ = ["from_hf", "to_hf", "hf", "peft", "hub", "hf_names", "safetensors_io"]


def __getattr__(name: str):
  if name in ("from_hf", "to_hf"):
    from jlora.interop import hf
    return getattr(hf, name)
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
