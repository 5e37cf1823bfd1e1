"""LoraConfig and how a config resolves per parameter path.

Paths are "/"-joined parameter paths such as ``"layers_0/attn/q_proj/kernel"``;
the *module path* is the same without the last name (``"layers_0/attn/q_proj"``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.errors import ConfigError, short

ALL_LINEAR = "all-linear"
"""``targets=ALL_LINEAR`` (the default) adapts every weight used as the matrix
operand of a matmul, except output heads and embedding tables.

With ``init_adapter(..., model=, args=)`` that is every weight the traced
function multiplies (``nn.Dense``, ``DenseGeneral``, ``Einsum``, ``x @ w``,
``jnp.einsum`` in your own code, fused ``qkv`` projections...), but not one
whose module or name is a head (``lm_head``, ``head``, ``output``,
``classifier``, ``logits``) and not one looked up as an embedding (a tied
embedding is looked up, so it is skipped too). Without a model it is every
``kernel`` leaf, read as ``[in, out]``; a kernel of more than two axes then
raises, asking for ``model=`` and ``args=``.
"""

INITS = ("default", "gaussian", "pissa", "zeros")
ADAPTABLE_NAMES = ("kernel", "embedding")
HEAD_NAMES = ("lm_head", "head", "output", "classifier", "logits")


def _compile(pattern: str, what: str) -> re.Pattern:
  if not isinstance(pattern, str):
    raise ConfigError(f"LoraConfig.{what}: a pattern must be a string, got {short(pattern, 60)}")
  try:
    return re.compile(pattern)
  except (re.error, RecursionError, OverflowError) as e:
    raise ConfigError(f"LoraConfig.{what}: pattern {short(pattern, 120)} does not compile: "
                      f"{short(str(e), 120)}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    rank: LoRA rank ``r``; ``a: [in, r]``, ``b: [r, out]``.
    alpha: scaling numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    targets: which weights to adapt. A string is a regular expression that must
      match the whole module path (``"a/q_proj"``) or parameter path
      (``"a/q_proj/kernel"``); a sequence of names matches a weight whose
      module path or parameter path equals a name or ends with ``"/" + name``
      (PEFT's list semantics); :data:`ALL_LINEAR` (the default) adapts every
      weight used as a matmul operand but heads and embeddings. When
      ``init_adapter`` traces the model (``model=``), any leaf of two or more
      axes the function multiplies, convolves with or looks up in can be a
      target; untraced, only ``kernel`` and ``embedding`` leaves (and leaves
      a regex names by their full path). 1-D leaves (biases, norm scales)
      never are.
    exclude: optional regex (full match on module or parameter path) or names,
      removed from the targets.
    dropout: dropout rate on the LoRA input during training.
    use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA).
    use_dora: weight-decomposed LoRA (DoRA), PEFT's formulation.
    init: "default" (A Kaiming-uniform as PEFT, B zero), "gaussian"
      (A ~ N(0, std=1/r), B zero; embeddings: A zero, B ~ N(0, 1) for both,
      as PEFT), "pissa" (A, B from the top-r SVD of W; train against the
      residual base ``unmerge(params, adapter)``) or "zeros".
    rank_pattern / alpha_pattern: per-module overrides; a key matches a module
      path when ``re.match(rf"(.*/)?({key})$", module_path)`` does (PEFT's rule
      with "/" for "."); the first matching key wins.
    dtype: dtype of the adapter's arrays (the base may differ, e.g. bf16/NF4).

  Example:
    >>> cfg = LoraConfig(rank=8, alpha=16, targets=r".*(q|v)_proj")
    >>> cfg.resolve("layers_0/attn/q_proj/kernel")
    (8, 16.0)
  """
  rank: int = 8
  alpha: float = 8.0
  targets: str | Sequence[str] = ALL_LINEAR
  exclude: str | Sequence[str] | None = None
  dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  init: str = "default"
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    _check_rank(self.rank, "rank")
    _check_alpha(self.alpha, "alpha")
    for field in ("rank_pattern", "alpha_pattern"):
      if not isinstance(getattr(self, field), Mapping):
        raise ConfigError(f"LoraConfig.{field} must be a mapping of pattern -> value, got "
                          f"{short(getattr(self, field), 60)}")
    for k, r in self.rank_pattern.items():
      _compile(k, "rank_pattern"); _check_rank(r, f"rank_pattern[{short(k, 60)}]")
    for k, a in self.alpha_pattern.items():
      _compile(k, "alpha_pattern"); _check_alpha(a, f"alpha_pattern[{short(k, 60)}]")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or \
        not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"LoraConfig.dropout must be in [0, 1), got "
                        f"{short(self.dropout, 40)}")
    for flag in ("use_rslora", "use_dora"):
      if not isinstance(getattr(self, flag), (bool, np.bool_)):
        raise ConfigError(f"LoraConfig.{flag} must be True or False, got "
                          f"{short(getattr(self, flag), 40)}")
    if not isinstance(self.init, str) or self.init not in INITS:
      raise ConfigError(f"LoraConfig.init must be one of {INITS}, got {short(self.init, 40)}")
    _check_names(self.targets, "targets", allow_empty=False)
    if self.exclude is not None:
      _check_names(self.exclude, "exclude", allow_empty=True)
    try:
      if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
        raise TypeError
    except TypeError:
      raise ConfigError(f"LoraConfig.dtype must be a floating-point dtype, got "
                        f"{short(self.dtype, 40)}") from None

  def __hash__(self):
    # hashable although patterns are dicts and targets may be a list, so a
    # config can be a static argument of jax.jit.
    return hash(tuple((f.name, _frozen(getattr(self, f.name))) for f in dataclasses.fields(self)))

  def scale(self, rank: int, alpha: float) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``)."""
    return scale_of(rank, alpha, self.use_rslora)

  def resolve(self, param_path: str) -> tuple[int, float]:
    """Returns ``(rank, alpha)`` for the parameter at ``param_path``.

    Example:
      >>> cfg = LoraConfig(rank=8, alpha=16, rank_pattern={"layers_1/.*": 4})
      >>> cfg.resolve("layers_1/attn/q_proj/kernel"), cfg.resolve("layers_0/mlp/kernel")
      ((4, 16.0), (8, 16.0))
    """
    mod = paths.module_path(param_path)
    rank, alpha = self.rank, float(self.alpha)
    for key, r in self.rank_pattern.items():
      if re.match(rf"(.*/)?({key})$", mod):
        rank = r
        break
    for key, a in self.alpha_pattern.items():
      if re.match(rf"(.*/)?({key})$", mod):
        alpha = float(a)
        break
    return rank, alpha

  def matches(self, param_path: str, ndim: int, kind: str | None = None) -> bool:
    """Whether the leaf at ``param_path`` (with ``ndim`` axes) is a target.

    ``kind`` is how a traced function uses the leaf ("dense": a matmul
    operand, "conv", "embed", or "none": none of these) or None when the
    function was not traced. Untraced, only ``kernel`` and ``embedding``
    leaves are candidates, unless a regex names another leaf's full path;
    traced, every leaf of two or more axes is (and a target that selects a
    "none" leaf is an error, raised by ``init_adapter``).

    Example:
      >>> cfg = LoraConfig(targets=["q_proj"])
      >>> cfg.matches("attn/q_proj/kernel", 2), cfg.matches("attn/q_proj/bias", 1)
      (True, False)
      >>> cfg.matches("attn/q_proj/w", 3, kind="dense")     # a weight read by einsum
      True
    """
    if ndim < 2:
      return False
    mod, _, leaf = param_path.rpartition(paths.SEP)
    if self.exclude is not None and _match(self.exclude, mod, param_path):
      return False
    if self.targets == ALL_LINEAR:
      if mod.rpartition(paths.SEP)[2] in HEAD_NAMES or leaf in HEAD_NAMES:
        return False
      return kind == "dense" if kind is not None else leaf == "kernel"
    if isinstance(self.targets, str):
      rx = re.compile(self.targets)
      if kind is not None or leaf in ADAPTABLE_NAMES:
        return bool(rx.fullmatch(mod) or rx.fullmatch(param_path))
      # untraced, another leaf is adapted only when its full parameter path is named.
      return bool(rx.fullmatch(param_path)) and not rx.fullmatch(mod)
    return (kind is not None or leaf in ADAPTABLE_NAMES) and _match(self.targets, mod, param_path)


def names_leaf(spec, param_path: str) -> bool:
  """Whether ``spec`` (a regex or names) selects the leaf at ``param_path`` by its own
  name or path rather than through its module.

  Example:
    >>> names_leaf(r".*bias", "heads/bias"), names_leaf(".*", "heads/bias")
    (True, False)
  """
  mod = param_path.rpartition(paths.SEP)[0]
  if spec == ALL_LINEAR:
    return False
  if isinstance(spec, str):
    rx = re.compile(spec)
    return bool(rx.fullmatch(param_path)) and not rx.fullmatch(mod)
  return _match(spec, "\0", param_path) and not _match(spec, mod, "\0")


def _match(spec, mod: str, param_path: str) -> bool:
  """A regex: full match on the module or parameter path. Names (PEFT's list
  semantics): the module path or the parameter path equals a name or ends
  with ``"/" + name``."""
  if isinstance(spec, str):
    rx = re.compile(spec)
    return bool(rx.fullmatch(mod) or rx.fullmatch(param_path))
  return any(p == n or p.endswith(paths.SEP + n) for n in spec for p in (mod, param_path))


def scale_of(rank: int, alpha: float, use_rslora: bool) -> float:
  """LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (PEFT).

  Example:
    >>> scale_of(16, 32, False), scale_of(16, 32, True)
    (2.0, 8.0)
  """
  return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _frozen(x):
  if isinstance(x, Mapping):
    return tuple((k, _frozen(v)) for k, v in x.items())
  if isinstance(x, (list, tuple)):
    return tuple(_frozen(v) for v in x)
  return x


def _check_rank(r, what):
  if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0:
    raise ConfigError(f"LoraConfig.{what} must be a positive int, got {short(r, 40)}")


def _check_alpha(a, what):
  if not isinstance(a, numbers.Real) or isinstance(a, bool) or not a > 0:
    raise ConfigError(f"LoraConfig.{what} must be positive, got {short(a, 40)}")
  if not math.isfinite(a):
    raise ConfigError(f"LoraConfig.{what} must be finite, got {short(a, 40)}")


def _check_names(spec, what: str, allow_empty: bool) -> None:
  """A regex string (compiled here) or a non-empty sequence of name strings."""
  if isinstance(spec, str):
    if spec != ALL_LINEAR or what != "targets":
      _compile(spec, what)
    return
  if isinstance(spec, Mapping) or not isinstance(spec, Sequence) or \
      not all(isinstance(n, str) for n in spec):
    raise ConfigError(f"LoraConfig.{what} must be a regex string or a list of module names, "
                      f"got {short(spec, 80)}")
  if not spec and not allow_empty:
    raise ConfigError(f"LoraConfig.{what} is empty: nothing would be adapted")
