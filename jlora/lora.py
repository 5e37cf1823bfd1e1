"""The LoRA node, its initialisers, and the pure LoRA / DoRA weight math.

A base kernel ``W`` of any rank is viewed as a matrix by grouping its axes:
``in_axes`` (contracted with the layer input) and ``out_axes`` (the rest).
Leading ``stack`` axes (a scanned or vmapped layer stack ``[L, ...]``) are
batch axes: each layer has its own ``a`` and ``b``.

  a: [*stack, *in_dims, r]        b: [*stack, r, *out_dims]
  magnitude (DoRA): [*stack, *out_dims]
  ΔW = scale · a @ b, laid out like W.

For a Flax Dense kernel ``[in, out]`` this is ``a: [in, r]``, ``b: [r, out]``;
for a Conv kernel ``[kh, kw, cin, cout]`` it is ``a: [kh, kw, cin, r]`` (a conv
to r channels) and ``b: [r, cout]`` (a 1×1 conv), PEFT's convention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("dense", "einsum", "embed", "conv")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """One adapted weight: low-rank factors plus static metadata.

  A registered pytree whose children are ``a``, ``b`` and ``magnitude`` (None
  unless DoRA); everything else is static, so swapping one adapter for
  another of the same shapes does not recompile. What the arrays already say
  is not repeated: the rank is ``a.shape[-1]`` and the number of stacked
  layer axes is ``a.ndim - 1 - len(in_axes)``.

  Attributes:
    a: ``[*stack, *in_dims, r]``.
    b: ``[*stack, r, *out_dims]``.
    magnitude: DoRA magnitude ``[*stack, *out_dims]`` or None.
    alpha: scaling numerator.
    rank: the rank the scale is computed from; None (the default) means
      ``a.shape[-1]``. Only a rank-padded adapter (an ``AdapterBank`` slot)
      sets it.
    in_axes / out_axes: axes of the per-layer base kernel grouped as input /
      output (together a permutation of ``range(kernel.ndim)``).
    kind: "dense" (used as a matmul operand), "embed" (looked up) or "conv"
      (a convolution kernel): how the function uses W ("einsum" is read as
      "dense").
    rslora: scale ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    dropout: dropout rate on the LoRA input while training.

  Example:
    >>> lo = LoRA(a=jnp.ones((16, 4)), b=jnp.zeros((4, 8)), alpha=8.0)
    >>> lo.rank, lo.stack, lo.scale
    (4, 0, 2.0)
  """
  a: jax.Array
  b: jax.Array
  magnitude: jax.Array | None = None
  _jlora_node = True  # a leaf for jlora's tree functions (see paths.is_node)
  FIELDS = {"a": "SIr", "b": "SrO", "magnitude": "SO"}   # array layouts (transform/weight.py)
  alpha: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  rank: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  in_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
  out_axes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
  kind: str = dataclasses.field(default="dense", metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

  def __post_init__(self):
    if self.rank is None and hasattr(self.a, "shape") and len(self.a.shape):
      object.__setattr__(self, "rank", int(self.a.shape[-1]))

  @property
  def stack(self) -> int:
    """Number of leading stacked-layer axes (``a.ndim - 1 - len(in_axes)``)."""
    return len(self.a.shape) - 1 - len(self.in_axes)

  @property
  def scale(self) -> float:
    return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def use_dora(self) -> bool:
    return self.magnitude is not None

  @property
  def in_dims(self) -> tuple[int, ...]:
    return tuple(self.a.shape[self.stack:-1])

  @property
  def out_dims(self) -> tuple[int, ...]:
    return tuple(self.b.shape[self.stack + 1:])

  @property
  def stack_dims(self) -> tuple[int, ...]:
    return tuple(self.a.shape[:self.stack])

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """Shape of the base weight this adapts, ``[*stack, *kernel]``."""
    dims = dict(zip(self.in_axes + self.out_axes, self.in_dims + self.out_dims))
    return self.stack_dims + tuple(dims[i] for i in range(len(dims)))

  def replace(self, **kw) -> "LoRA":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """How a layer uses its weight, as learnt by tracing the model.

  ``kind`` is one of :data:`KINDS`; ``in_axes``/``out_axes`` group the
  per-layer kernel's axes; ``stack`` counts leading stacked-layer axes.
  """
  kind: str
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  stack: int = 0


def kernel_axes(shape: Sequence[int], kind: str, stack: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Default ``(in_axes, out_axes)`` of a per-layer kernel by kind.

  dense/embed: first axis in, the rest out (Flax ``Dense``/``DenseGeneral``
  with one contracting axis, ``Embed`` ``[vocab, dim]``); conv: all but the
  last axis in (``[*window, cin, cout]``).

  Example:
    >>> kernel_axes((3, 3, 8, 16), "conv")
    ((0, 1, 2), (3,))
  """
  n = len(shape) - stack
  if kind == "conv":
    return tuple(range(n - 1)), (n - 1,)
  return (0,), tuple(range(1, n))


def _check_axes(shape, in_axes, out_axes, stack, path):
  n = len(shape) - stack
  if sorted(in_axes + out_axes) != list(range(n)) or not in_axes or not out_axes:
    raise ValueError(f"{path}: in_axes {in_axes} and out_axes {out_axes} must split the "
                     f"{n} kernel axes of {list(shape)} (after {stack} stacked axes)")


def _dims(shape, axes, stack):
  return tuple(shape[stack + i] for i in axes)


def init(key: jax.Array, weight: jax.Array, *, rank: int, alpha: float, kind: str = "dense",
         in_axes: tuple[int, ...] | None = None, out_axes: tuple[int, ...] | None = None,
         stack: int = 0, init: str = "default", use_dora: bool = False, rslora: bool = False,
         dropout: float = 0.0, dtype=jnp.float32, path: str = "weight") -> LoRA:
  """Initialises a LoRA for ``weight`` (``[*stack, *kernel]``).

  Inits follow PEFT: "default": A Kaiming-uniform(a=√5), i.e. U(±1/√fan_in)
  with fan_in = ∏in_dims, and B = 0; "gaussian": A ~ N(0, std=1/r), B = 0.
  For embeddings (``kind="embed"``) both are the other way round, as PEFT's
  ``lora_embedding_A/B``: A = 0, B ~ N(0, 1). "pissa": A and B from the top-r
  SVD of the kernel viewed as ``[in, out]`` (PEFT's ``pissa_init`` in our
  layout: ``a = lora_A.T``, ``b = lora_B.T``), so that ``W - scale·a@b`` is the
  residual base to train against (PEFT applies PiSSA to Linear layers only and
  falls back to its default for embeddings; jlora applies it to any kind).
  "zeros": both 0. With ``use_dora`` the magnitude is ``‖W_base + scale·a@b‖``
  per output feature, where ``W_base`` is the base trained against (for PiSSA
  the residual, so the magnitude is ``‖W‖``), as PEFT.

  Args:
    key: PRNG key.
    weight: the base kernel ``[*stack, *kernel]`` (only its shape is read,
      except for "pissa" and DoRA).
    rank: ``r``; at most ``min(∏in_dims, ∏out_dims)``.
    alpha: scaling numerator (positive).
    kind: how the layer uses the weight, one of :data:`KINDS`.
    in_axes / out_axes: grouping of the per-layer kernel axes (default by
      kind, see :func:`kernel_axes`).
    stack: number of leading stacked-layer axes of ``weight``.
    init: "default", "gaussian", "pissa" or "zeros".
    use_dora / rslora / dropout: as :class:`LoRA`.
    dtype: dtype of ``a``, ``b`` and ``magnitude``.
    path: the parameter path, used in error messages.

  Example:
    >>> w = jnp.ones((16, 32))
    >>> lo = init(jax.random.key(0), w, rank=4, alpha=8)
    >>> lo.a.shape, lo.b.shape, lo.scale
    ((16, 4), (4, 32), 2.0)
  """
  if kind not in KINDS:
    raise ValueError(f"{path}: unknown layer kind {kind!r}; expected one of {KINDS}")
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"{path}: rank must be a positive int, got {rank!r}")
  if not float(alpha) > 0:
    raise ValueError(f"{path}: alpha must be positive, got {alpha!r}")
  rank = int(rank)
  shape = tuple(weight.shape)
  if in_axes is None or out_axes is None:
    in_axes, out_axes = kernel_axes(shape, kind, stack)
  in_axes, out_axes = tuple(in_axes), tuple(out_axes)
  _check_axes(shape, in_axes, out_axes, stack, path)
  lead = shape[:stack]
  in_dims, out_dims = _dims(shape, in_axes, stack), _dims(shape, out_axes, stack)
  n_in, n_out = math.prod(in_dims), math.prod(out_dims)
  if rank > min(n_in, n_out):
    raise ValueError(f"{path}: rank {rank} is larger than the weight allows: kernel "
                     f"{list(shape[stack:])} is a [{n_in}, {n_out}] matrix (in × out)")
  node = LoRA(a=None, b=None, alpha=float(alpha), rank=rank, in_axes=in_axes,
              out_axes=out_axes, kind=kind, rslora=rslora, dropout=dropout)
  ka, kb = jax.random.split(key)
  a_shape, b_shape = lead + in_dims + (rank,), lead + (rank,) + out_dims
  if init == "pissa":
    a, b = _pissa(as_matrix(weight, node, stack), rank, node.scale)
    a, b = a.reshape(a_shape).astype(dtype), b.reshape(b_shape).astype(dtype)
  elif init == "zeros":
    a, b = jnp.zeros(a_shape, dtype), jnp.zeros(b_shape, dtype)
  elif kind == "embed" and init in ("default", "gaussian"):
    a, b = jnp.zeros(a_shape, dtype), jax.random.normal(kb, b_shape, dtype)
  elif init == "default":
    bound = 1.0 / math.sqrt(n_in)
    a, b = jax.random.uniform(ka, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype)
  elif init == "gaussian":
    a, b = jax.random.normal(ka, a_shape, dtype) / rank, jnp.zeros(b_shape, dtype)
  else:
    raise ValueError(f"{path}: unknown init {init!r}")
  node = node.replace(a=a, b=b)
  if use_dora:
    # PEFT computes the magnitude after PiSSA has replaced W by the residual
    # W - scale·a@b, so it is ‖residual + scale·a@b‖ = ‖W‖ there.
    base = weight if init != "pissa" else unmerge_weight(weight, node, path)
    node = node.replace(magnitude=dora_norm(base, node).astype(dtype))
  return node


def _pissa(w2: jax.Array, rank: int, scale: float):
  """Top-r SVD split of ``w2: [*stack, in, out]`` as PEFT's PiSSA (in our layout)."""
  u, s, vt = jnp.linalg.svd(w2.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[..., :rank] / scale)
  a = u[..., :, :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  return a, b


def as_matrix(weight: jax.Array, lora: LoRA, stack: int | None = None) -> jax.Array:
  """``weight [*stack, *kernel]`` as ``[*stack, ∏in_dims, ∏out_dims]``.

  ``stack`` defaults to ``lora.stack`` (give it when ``lora`` has no arrays yet).

  Example:
    >>> w = jnp.zeros((4, 2, 3))   # DenseGeneral [in, heads, head_dim]
    >>> lo = init(jax.random.key(0), w, rank=2, alpha=2)
    >>> as_matrix(w, lo).shape
    (4, 6)
  """
  s = lora.stack if stack is None else stack
  perm = tuple(range(s)) + tuple(s + i for i in lora.in_axes + lora.out_axes)
  w = jnp.transpose(weight, perm)
  n_in = math.prod(_dims(weight.shape, lora.in_axes, s))
  return w.reshape(w.shape[:s] + (n_in, -1))


def from_matrix(m: jax.Array, lora: LoRA) -> jax.Array:
  """Inverse of :func:`as_matrix`: ``[*stack, in, out]`` back to the kernel layout.

  Example:
    >>> w = jnp.arange(24.0).reshape(2, 3, 4)   # [heads, head_dim, out]
    >>> lo = init(jax.random.key(0), w, rank=2, alpha=2, in_axes=(0, 1), out_axes=(2,))
    >>> bool((from_matrix(as_matrix(w, lo), lo) == w).all())
    True
  """
  s = lora.stack
  m = m.reshape(m.shape[:s] + lora.in_dims + lora.out_dims)
  order = lora.in_axes + lora.out_axes
  inv = tuple(range(s)) + tuple(s + order.index(i) for i in range(len(order)))
  return jnp.transpose(m, inv)


def delta_matrix(lora: LoRA, dtype=None) -> jax.Array:
  """``scale · a @ b`` as a ``[*stack, in, out]`` matrix."""
  r = lora.a.shape[-1]
  a = lora.a.reshape(lora.stack_dims + (-1, r))
  b = lora.b.reshape(lora.stack_dims + (r, -1))
  d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * lora.scale
  return d if dtype is None else d.astype(dtype)


# The weight functions below are jitted so that eager use (a merge outside
# jax.jit) compiles once per shape instead of dispatching every primitive;
# inside jax.jit they inline.
@functools.partial(jax.jit, static_argnames=("dtype",))
def delta(lora: LoRA, dtype=None) -> jax.Array:
  """The dense update ``ΔW = scale · a @ b`` in the base kernel's layout.

  Returns ``[*stack, *kernel]`` (e.g. ``[in, out]`` for a Dense kernel).

  Example:
    >>> lo = LoRA(a=jnp.ones((3, 1)), b=jnp.ones((1, 2)), alpha=2.0, rank=1)
    >>> delta(lo)
    Array([[2., 2.],
           [2., 2.],
           [2., 2.]], dtype=float32)
  """
  return from_matrix(delta_matrix(lora, dtype), lora)


def check_weight(weight_shape, lora: LoRA, path: str) -> None:
  """Raises a ValueError naming ``path`` when ``lora`` does not fit the weight."""
  if tuple(weight_shape) != lora.kernel_shape:
    raise ValueError(f"adapter at {path!r} has a: {list(lora.a.shape)}, b: {list(lora.b.shape)} "
                     f"(a kernel of {list(lora.kernel_shape)}) but the base weight is "
                     f"{list(weight_shape)}")
  if lora.a.shape[-1] != lora.b.shape[lora.stack]:
    raise ValueError(f"adapter at {path!r}: rank of a {list(lora.a.shape)} and b "
                     f"{list(lora.b.shape)} disagree")
  want = lora.stack_dims + lora.out_dims
  if lora.magnitude is not None and tuple(lora.magnitude.shape) != want:
    raise ValueError(f"adapter at {path!r} has a DoRA magnitude of {list(lora.magnitude.shape)} "
                     f"but the base weight {list(weight_shape)} needs {list(want)}")


@jax.jit
def dora_norm(weight: jax.Array, lora: LoRA) -> jax.Array:
  """``‖W + ΔW‖`` over the input axes, one per output feature: ``[*stack, *out_dims]``.

  PEFT's DoRA weight norm (rows of the PyTorch ``[out, in]`` weight; for an
  embedding ``[vocab, dim]``, one norm per ``dim`` over the vocabulary, as
  PEFT's ``fan_in_fan_out=True`` there; for a conv, one per output channel over
  window and input channels), computed in float32.

  Example:
    >>> lo = LoRA(a=jnp.zeros((2, 1)), b=jnp.zeros((1, 2)))
    >>> dora_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), lo)
    Array([5., 1.], dtype=float32)
  """
  w = as_matrix(weight.astype(jnp.float32), lora) + delta_matrix(lora, jnp.float32)
  return jnp.linalg.norm(w, axis=-2).reshape(lora.stack_dims + lora.out_dims)


@jax.jit
def merge_weight(weight: jax.Array, lora: LoRA) -> jax.Array:
  """``W + ΔW`` (DoRA: ``m / ‖W + ΔW‖ · (W + ΔW)``), in ``weight``'s dtype.

  Computed in float32; ``weight: [*stack, *kernel]`` like ``lora.kernel_shape``.

  Example:
    >>> lo = LoRA(a=jnp.ones((2, 1)), b=jnp.ones((1, 3)), alpha=1.0, rank=1)
    >>> merge_weight(jnp.zeros((2, 3)), lo)
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  w = weight.astype(jnp.float32)
  merged = as_matrix(w, lora) + delta_matrix(lora, jnp.float32)
  if lora.magnitude is not None:
    norm = jnp.linalg.norm(merged, axis=-2, keepdims=True)
    mag = lora.magnitude.astype(jnp.float32).reshape(lora.stack_dims + (1, -1))
    merged = merged * (mag / norm)
  return from_matrix(merged, lora).astype(weight.dtype)


@functools.partial(jax.jit, static_argnames=("path",))
def unmerge_weight(merged: jax.Array, lora: LoRA, path: str = "weight") -> jax.Array:
  """Inverse of :func:`merge_weight`: ``merged - ΔW``, up to rounding.

  A DoRA merge is not invertible from the merged weight alone: each output
  column of ``merged`` is ``m · (W + ΔW) / ‖W + ΔW‖``, and the norm it was
  divided by is lost (PEFT keeps it in a cache). Unmerging a DoRA adapter
  therefore raises; keep the base tree instead.

  Example:
    >>> lo = LoRA(a=jnp.ones((2, 1)), b=jnp.ones((1, 3)), alpha=1.0, rank=1)
    >>> unmerge_weight(merge_weight(jnp.ones((2, 3)), lo), lo)
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  if lora.magnitude is not None:
    raise ValueError(f"{path}: a DoRA merge cannot be undone from the merged weight alone "
                     "(the norm ‖W + ΔW‖ it divided by is lost); keep the unmerged base instead")
  m = as_matrix(merged.astype(jnp.float32), lora)
  return from_matrix(m - delta_matrix(lora, jnp.float32), lora).astype(merged.dtype)
