"""A base weight as the transformation carries it through a traced function.

:class:`Weight` stands for one leaf of the base parameter tree wherever the
function uses it. It holds the stored leaf (an array, or a ``QArray`` still
quantized), the LoRA factors if the leaf is adapted, and one *role* per axis
of the weight as the function currently sees it (its *view*)::

  ("s", j)   the j-th stacked-layer axis   a: [*S, *I, r]   b: [*S, r, *O]
  ("i", j)   the j-th input axis           magnitude: [*S, *O]
  ("o", j)   the j-th output axis          dropout key: [*S]

Layout operations the function applies to the weight before using it
(``astype``, ``transpose``, ``reshape`` within one role, ``squeeze``, slicing)
are applied to the view *and* to the factors, so that at a matmul the factors
are still the low-rank factors of the view: ``ΔW_view = scale · a @ b`` read
through the roles. An operation the roles cannot follow ends the weight's
life as a :class:`Weight`: it becomes the plain array ``W + ΔW`` there
(:func:`materialize`), which is always correct.

In *recording* mode (``init_adapter`` learning how a function uses its
weights) there are no factors; each role is ``("r", stored_axes)``, the
stored axes that view axis came from, and ``dropped`` collects stored axes
removed by slicing (a scan over a layer stack, ``w[i]``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import lora as L

Role = tuple  # ("s"|"i"|"o", j) or ("r", stored_axes)
FACTOR_KINDS = ("s", "i", "o")


def is_quantized(x: Any) -> bool:
  """A quantized base leaf: a jlora node that dequantizes (``QArray``)."""
  return getattr(type(x), "_jlora_node", False) and hasattr(x, "dequantize") \
      and not isinstance(x, L.LoRA)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weight:
  """One base leaf, its LoRA (or None) and its view's axis roles.

  Children: ``base`` (array ``[*view]``, or a ``QArray`` in its stored
  layout with ``qops`` still to apply), ``lora`` (a :class:`~jlora.lora.LoRA`
  whose ``a``/``b``/``magnitude`` are the view's factors; its own
  ``in_axes``/``out_axes`` are not used here) and ``key`` (dropout keys
  ``[*S]``). Static: the view's ``shape``/``dtype``, ``roles``, ``qops``,
  the leaf's ``path``, ``dropped`` and ``recording``.
  """
  base: Any
  lora: L.LoRA | None
  key: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: Any = dataclasses.field(metadata=dict(static=True))
  roles: tuple[Role, ...] = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))
  qops: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  dropped: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  recording: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def replace(self, **kw) -> "Weight":
    return dataclasses.replace(self, **kw)

  def count(self, kind: str) -> int:
    return sum(1 for r in self.roles if r[0] == kind)

  def axis_of(self, role: Role) -> int:
    return self.roles.index(role)


def create(base: Any, lora: L.LoRA | None, path: str, key: jax.Array | None = None) -> Weight:
  """The :class:`Weight` of a stored leaf ``[*stack, *kernel]`` and its LoRA.

  ``key`` is a dropout key; it is split into one key per stacked layer.
  """
  shape, dtype = tuple(base.shape), base.dtype
  if lora is None:
    roles = tuple(("o", j) for j in range(len(shape)))   # no factors: roles unused
    return Weight(base, None, None, shape, dtype, roles, path)
  s = lora.stack
  roles = [None] * len(shape)   # lora: a LoRA, or another adapter node with the same axes fields
  for j in range(s):
    roles[j] = ("s", j)
  for j, ax in enumerate(lora.in_axes):
    roles[s + ax] = ("i", j)
  for j, ax in enumerate(lora.out_axes):
    roles[s + ax] = ("o", j)
  if key is not None and getattr(lora, "dropout", 0.0) > 0:
    stack = tuple(shape[:s])
    key = jax.random.split(key, math.prod(stack)).reshape(stack) if stack else key
  else:
    key = None
  return Weight(base, lora, key, shape, dtype, tuple(roles), path)


def probe(base: Any, path: str) -> Weight:
  """A recording :class:`Weight`: each view axis remembers its stored axis."""
  roles = tuple(("r", (k,)) for k in range(len(base.shape)))
  return Weight(base, None, None, tuple(base.shape), base.dtype, roles, path, recording=True)


# ----------------------------------------------------------------------------- plain values

def plain(w: Weight) -> jax.Array:
  """The view of the base weight alone (a ``QArray`` dequantized, ``qops`` applied)."""
  if not is_quantized(w.base):
    return w.base
  x = w.base.dequantize()
  for op, arg in w.qops:
    x = _QOPS[op](x, arg)
  return x


_QOPS = {
    "convert": lambda x, dtype: x.astype(dtype),
    "transpose": lambda x, perm: jnp.transpose(x, perm),
    "reshape": lambda x, shape: x.reshape(shape),
}


def dequantized(w: Weight) -> Weight:
  """``w`` with its base as a plain array (factors and roles unchanged)."""
  if not is_quantized(w.base):
    return w
  return w.replace(base=plain(w), qops=())


def factor_labels(w: Weight) -> list[Role]:
  """Roles of the axes of ``ΔW`` as :func:`delta_factor_order` lays it out: S, I, O."""
  return ([("s", j) for j in range(w.count("s"))] + [("i", j) for j in range(w.count("i"))]
          + [("o", j) for j in range(w.count("o"))])


def delta(w: Weight, dtype=jnp.float32) -> jax.Array:
  """``ΔW = scale · a @ b`` laid out as the view ``[*w.shape]``, in ``dtype``."""
  lo = w.lora
  ns, r = w.count("s"), lo.a.shape[-1]
  a = lo.a.astype(dtype).reshape(lo.a.shape[:ns] + (-1, r))
  b = lo.b.astype(dtype).reshape(lo.b.shape[:ns] + (r, -1))
  d = jnp.matmul(a, b, precision=lax.Precision.HIGHEST) * jnp.asarray(lo.scale, dtype)
  d = d.reshape(lo.a.shape[:-1] + lo.b.shape[ns + 1:])
  labels = factor_labels(w)
  return jnp.transpose(d, [labels.index(role) for role in w.roles])


def dora_gain(w: Weight, view: jax.Array) -> jax.Array:
  """``g = m / ‖W + ΔW‖`` per output feature, broadcast over the view (in axes 1).

  The norm (over the input axes) is held constant for the gradient, as
  PEFT's ``detach``; computed in float32 (float64 for float64 weights).
  """
  f32 = jnp.promote_types(view.dtype, jnp.float32)
  full = lax.stop_gradient(view.astype(f32) + delta(w, f32))
  ins = tuple(k for k, r in enumerate(w.roles) if r[0] == "i")
  norm = jnp.sqrt(jnp.sum(full * full, axis=ins, keepdims=True))
  return magnitude_view(w, f32) / norm


def magnitude_view(w: Weight, dtype) -> jax.Array:
  """The DoRA magnitude ``[*S, *O]`` laid out over the view, 1 on the input axes."""
  m = w.lora.magnitude.astype(dtype)
  ns = w.count("s")
  labels = [("s", j) for j in range(ns)] + [("o", j) for j in range(w.count("o"))]
  have = [r for r in w.roles if r[0] != "i"]
  m = jnp.transpose(m, [labels.index(r) for r in have])
  shape = [1 if r[0] == "i" else n for r, n in zip(w.roles, w.shape)]
  return m.reshape(shape)


def materialize(x: Any) -> Any:
  """A plain array for ``x``: ``W + ΔW`` (DoRA: ``g·(W + ΔW)``) for a :class:`Weight`,
  computed in float32 and cast to the view's dtype; anything else as it is."""
  if not isinstance(x, Weight):
    return x
  view = plain(x)
  if x.lora is None:
    return view
  if not isinstance(x.lora, L.LoRA):
    return x.lora.merged(view, x)         # another adapter kind (see jlora.methods)
  f32 = jnp.promote_types(view.dtype, jnp.float32)
  merged = view.astype(f32) + delta(x, f32)
  if x.lora.magnitude is not None:
    merged = merged * dora_gain(x, view)
  return merged.astype(view.dtype)


def dropout(x: jax.Array, w: Weight, use: int) -> jax.Array:
  """Inverted dropout on a LoRA input (``x`` itself without a key).

  The key of the ``use``-th use of the weight (a weight used twice gets two
  masks); for a stacked weight that a matmul batches over, the caller uses
  :func:`dropout_batched`.
  """
  rate = getattr(w.lora, "dropout", 0.0)
  if w.key is None or rate == 0.0:
    return x
  if w.key.shape:
    raise NotImplementedError("stacked dropout keys need dropout_batched")
  keep = jax.random.bernoulli(jax.random.fold_in(w.key, use), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


# ----------------------------------------------------------------------------- view ops
# Each returns the new Weight, or None when the roles cannot follow (the caller
# then materializes W + ΔW and applies the operation to that).

def _after_removal(roles, kind, removed: int):
  return tuple((k, j - 1) if k == kind and j > removed else (k, j) for k, j in roles)


def field_axis(template: str, counts: dict, role: Role) -> int | None:
  """Position of ``role`` in an adapter array laid out by ``template``.

  A node class declares its arrays' layouts in ``FIELDS``: "S", "I", "O" stand
  for all stacked, input and output axes (in the node's order), any other
  letter for one axis of its own (LoRA: ``{"a": "SIr", "b": "SrO",
  "magnitude": "SO"}``).

  Example:
    >>> field_axis("SrO", {"S": 1, "I": 2, "O": 1}, ("o", 0))
    2
  """
  pos = 0
  want = role[0].upper()
  for t in template:
    n = counts.get(t, 1)
    if t == want:
      return pos + role[1]
    pos += n
  return None


def _counts(w: Weight) -> dict:
  return {"S": w.count("s"), "I": w.count("i"), "O": w.count("o")}


def _fields(node) -> dict:
  return getattr(type(node), "FIELDS", {})


def _map_factors(w: Weight, role: Role, fn) -> tuple[Any, Any]:
  """Applies ``fn(array, axis)`` to every adapter array (and dropout key) carrying ``role``."""
  node, key = w.lora, w.key
  if node is None:
    return node, key
  counts = _counts(w)
  new = {}
  for name, template in _fields(node).items():
    v = getattr(node, name)
    ax = field_axis(template, counts, role)
    if v is not None and ax is not None:
      new[name] = fn(v, ax)
  node = node.replace(**new)
  if key is not None and role[0] == "s":
    key = fn(key, role[1])
  return node, key


def convert(w: Weight, new_dtype) -> Weight | None:
  """``astype`` between floating dtypes: the factors keep their own dtype."""
  if not (jnp.issubdtype(w.dtype, jnp.floating) and jnp.issubdtype(new_dtype, jnp.floating)):
    return None
  if is_quantized(w.base):
    return w.replace(qops=w.qops + (("convert", new_dtype),), dtype=new_dtype)
  return w.replace(base=w.base.astype(new_dtype), dtype=new_dtype)


def transpose(w: Weight, perm) -> Weight:
  perm = tuple(int(p) for p in perm)
  shape = tuple(w.shape[p] for p in perm)
  roles = tuple(w.roles[p] for p in perm)
  if is_quantized(w.base):
    return w.replace(qops=w.qops + (("transpose", perm),), shape=shape, roles=roles)
  return w.replace(base=jnp.transpose(w.base, perm), shape=shape, roles=roles)


def squeeze(w: Weight, dims) -> Weight | None:
  """Removes size-1 axes; a removed stacked axis drops that layer axis from the factors."""
  dims = sorted(int(d) % w.ndim for d in dims)
  base = w
  if is_quantized(w.base):
    base = dequantized(w)
  for d in reversed(dims):
    base = _drop_axis(base, d, lambda v, ax: lax.squeeze(v, (ax,)))
    if base is None:
      return None
  return base


def _drop_axis(w: Weight, d: int, take) -> Weight | None:
  """``w`` without its view axis ``d`` (size 1, or indexed by ``take``)."""
  role = w.roles[d]
  dropped = w.dropped
  roles = w.roles[:d] + w.roles[d + 1:]
  if w.recording:
    dropped = dropped + role[1]
  elif w.lora is not None:
    if role[0] in ("i", "o") and w.count(role[0]) == 1:
      return None      # the last input/output axis: not a matrix any more
    lora, key = _map_factors(w, role, take)
    roles = _after_removal(roles, role[0], role[1])
    w = w.replace(lora=lora, key=key)
  base = take(w.base, d) if not is_quantized(w.base) else None
  if base is None:
    return None
  return w.replace(base=base, shape=w.shape[:d] + w.shape[d + 1:], roles=roles, dropped=dropped)


def slice_static(w: Weight, start, limit, strides) -> Weight:
  """``lax.slice``: each factor is sliced like the view axis carrying its role."""
  w = dequantized(w)
  strides = strides or (1,) * w.ndim
  for d in range(w.ndim):
    lo, hi, st = int(start[d]), int(limit[d]), int(strides[d])
    if (lo, hi, st) == (0, w.shape[d], 1):
      continue
    w = _slice_axis(w, d, lambda v, ax: lax.slice_in_dim(v, lo, hi, st, axis=ax),
                    len(range(lo, hi, st)))
  return w


def slice_dynamic(w: Weight, starts, sizes) -> Weight:
  """``lax.dynamic_slice``: the factors are sliced at the same (clamped) starts."""
  w = dequantized(w)
  for d in range(w.ndim):
    size = int(sizes[d])
    if size == w.shape[d]:
      continue
    start = starts[d]
    w = _slice_axis(w, d, lambda v, ax: lax.dynamic_slice_in_dim(v, start, size, axis=ax), size)
  return w


def _slice_axis(w: Weight, d: int, cut, size: int) -> Weight:
  role = w.roles[d]
  base = cut(w.base, d)
  shape = w.shape[:d] + (size,) + w.shape[d + 1:]
  if w.recording or w.lora is None:
    return w.replace(base=base, shape=shape)
  lora, key = _map_factors(w, role, cut)
  return w.replace(base=base, shape=shape, lora=lora, key=key)


def reshape(w: Weight, new_shape) -> Weight | None:
  """A reshape that splits or merges axes of one role, in the factors' order."""
  new_shape = tuple(int(n) for n in new_shape)
  if new_shape == w.shape:
    return w
  ones = [d for d, n in enumerate(w.shape) if n == 1]
  if ones:
    w = squeeze(w, ones)
    if w is None:
      return None
  if 1 in new_shape:
    return None
  groups = _reshape_groups(w.shape, new_shape)
  if groups is None:
    return None
  roles: list = []        # (kind, old number, position in a split run) until renumbered
  lora, key = w.lora, w.key
  for old, new in groups:
    old_roles = [w.roles[d] for d in old]
    if w.recording:
      axes = tuple(sorted(set(a for r in old_roles for a in r[1])))
      roles += [("r", axes)] * len(new)
      continue
    if len(old) == 1 and len(new) == 1:
      roles.append(old_roles[0] + (0,))
      continue
    kind, first = old_roles[0]
    if kind == "s" or any(r != (kind, first + i) for i, r in enumerate(old_roles)):
      return None
    roles += [(kind, first, i) for i in range(len(new))]
    if lora is not None:
      sizes = [new_shape[d] for d in new]
      lora = _reshape_factor_run(lora, w, kind, first, len(old), sizes)
  if not w.recording:
    roles = _renumber(roles)
  if is_quantized(w.base):
    return w.replace(qops=w.qops + (("reshape", new_shape),), shape=new_shape,
                     roles=tuple(roles), lora=lora)
  return w.replace(base=w.base.reshape(new_shape), shape=new_shape, roles=tuple(roles),
                   lora=lora, key=key)


def _reshape_groups(old, new):
  """Pairs of (old axes, new axes) with equal products, in order (no size-1 axes)."""
  groups, i, j = [], 0, 0
  while i < len(old) and j < len(new):
    oi, nj = [i], [j]
    po, pn = old[i], new[j]
    while po != pn:
      if po < pn:
        i += 1
        if i >= len(old):
          return None
        oi.append(i)
        po *= old[i]
      else:
        j += 1
        if j >= len(new):
          return None
        nj.append(j)
        pn *= new[j]
    groups.append((oi, nj))
    i, j = i + 1, j + 1
  return groups if i == len(old) and j == len(new) else None


def _reshape_factor_run(node, w: Weight, kind: str, first: int, n_old: int, sizes):
  """The adapter arrays with the run of ``kind`` axes ``first..first+n_old`` reshaped."""
  counts = _counts(w)
  new = {}
  for name, template in _fields(node).items():
    v = getattr(node, name)
    at = field_axis(template, counts, (kind, first))
    if v is not None and at is not None:
      new[name] = v.reshape(v.shape[:at] + tuple(sizes) + v.shape[at + n_old:])
  return node.replace(**new)


def _renumber(roles):
  """``(kind, number, sub)`` triples renumbered 0.. per kind in the factors' order."""
  out = [None] * len(roles)
  for kind in set(r[0] for r in roles):
    ds = sorted((d for d in range(len(roles)) if roles[d][0] == kind), key=lambda d: roles[d][1:])
    for n, d in enumerate(ds):
      out[d] = (kind, n)
  return out


def shard(w: Weight, fn) -> Weight:
  """A sharding annotation on the view: applied to a plain base, skipped for a QArray."""
  if is_quantized(w.base):
    return w
  return w.replace(base=fn(w.base))


def size_of(w: Weight) -> int:
  return int(np.prod(w.shape))
