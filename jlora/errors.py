"""jlora's exceptions: one base class, a few kinds, all ``ValueError``s.

Every message names the field, file, path or tensor concerned and what was
expected. Callers that caught ``ValueError`` before these existed keep working.
"""
from __future__ import annotations


MAX_MESSAGE = 2000
"""Longest message an error carries; longer ones keep their start and end."""


class JloraError(ValueError):
  """Base class of every error jlora raises for bad input.

  The message is cut to :data:`MAX_MESSAGE` characters (start and end kept),
  so no file can make an error message arbitrarily long.
  """

  def __init__(self, message: str = "", *args):
    message = str(message)
    if len(message) > MAX_MESSAGE:
      message = message[:MAX_MESSAGE * 2 // 3] + " … " + message[-(MAX_MESSAGE // 3 - 3):]
    super().__init__(message, *args)


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


class UnsavableError(CheckpointError, TypeError):
  """A tree holds a leaf jlora cannot save (an object, a PRNG key, a dtype that
  would not come back bit for bit); the message names its path. Also a
  ``TypeError``, as before it existed."""


class NonFiniteError(JloraError):
  """A training step produced a NaN or Inf loss or gradient (``nonfinite="raise"``).

  Attributes:
    step: the step number (``TrainState.step``, or the call count of a plain step).
    path: the first offending leaf: ``"loss"`` or an adapter path such as
      ``"layers_0/attn/q_proj/kernel/a"``.
    state: what the step returns unchanged (the update was not applied): a
      ``TrainState``, or ``(adapter, opt_state)`` for a plain step; the buffers
      passed in may have been donated, so continue from these.
  """

  def __init__(self, message: str, *, step: int, path: str, state):
    super().__init__(message)
    self.step, self.path, self.state = step, path, state


def short(text: object, limit: int = 200) -> str:
  """``repr(text)`` cut to ``limit`` characters, for echoing untrusted names in messages.

  Example:
    >>> short("x" * 500, 12)
    "'xxxxxxxxxx…"
  """
  r = repr(text)
  return r if len(r) <= limit else r[: limit - 1] + "…"
