"""jlora's exceptions: one base class, a few kinds, all ``ValueError``s.

Every message names the field, file, path or tensor concerned and what was
expected. Callers that caught ``ValueError`` before these existed keep working.
"""
from __future__ import annotations


class JloraError(ValueError):
  """Base class of every error jlora raises for bad input."""


class ConfigError(JloraError):
  """A configuration (``LoraConfig``, a PEFT ``adapter_config.json``, a model
  config) holds a value jlora cannot use."""


class AdapterError(JloraError):
  """An adapter does not fit the base parameters or the function it is applied to
  (a path missing, shapes that disagree, a weight used in a way LoRA cannot adapt)."""


class CheckpointError(JloraError):
  """A checkpoint cannot be written or read (a path, a missing or corrupt file)."""


class FormatError(CheckpointError):
  """A file is malformed: a safetensors header, a PEFT or bitsandbytes tensor,
  JSON metadata that does not hold what it must."""


def short(text: object, limit: int = 200) -> str:
  """``repr(text)`` cut to ``limit`` characters, for echoing untrusted names in messages.

  Example:
    >>> short("x" * 500, 12)
    "'xxxxxxxxxx…"
  """
  r = repr(text)
  return r if len(r) <= limit else r[: limit - 1] + "…"
