"""The unmerged LoRA / DoRA forward of one layer call, shared by Linen and NNX.

A supported layer call is described by a :class:`LayerCall`: its kind, its
input, a function that runs the unchanged base layer, and what the low-rank
term needs (the einsum letters of a Dense-like layer, a conv to ``r``
channels). :func:`forward` then returns

  y = base(x) + scale · (drop(x) · a) · b                       (LoRA)
  y = base(x) + (g - 1) · (x·W) + g · scale · (drop(x)·a)·b      (DoRA)

with ``g = m / ‖W + ΔW‖`` (the norm held constant for the gradient), never
forming ``W + ΔW``. Dense, DenseGeneral and Einsum are all written as one
einsum ``x, kernel -> y`` with explicit letters (:class:`Spec`).
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora import lora as L
from jlora import paths

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Spec:
  """A Dense-like layer as ``einsum(f"{x},{k}->{o}", inputs, kernel)``.

  Attributes:
    x / k / o: explicit letters of the input, kernel and output (no ``...``).
    in_axes: kernel axes contracted with the input.
    out_axes: kernel axes that appear in the output.
  """
  x: str
  k: str
  o: str
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]


def _fresh(used: str, n: int) -> str:
  free = [c for c in string.ascii_letters if c not in used]
  return "".join(free[:n])


def _expand(term: str, ndim: int, ell: str) -> str:
  if "..." not in term:
    return term
  n = ndim - (len(term) - 3)
  return term.replace("...", ell[len(ell) - n:] if n else "")


def einsum_spec(equation: str, x_ndim: int, k_ndim: int, path: str) -> Spec:
  """The :class:`Spec` of ``jnp.einsum(equation, x, kernel)`` for given ranks.

  Example:
    >>> einsum_spec("btd,dhk->bthk", 3, 3, "attn/kernel").in_axes
    (0,)
  """
  eq = equation.replace(" ", "")
  lhs, _, out = eq.partition("->")
  xs, _, ks = lhs.partition(",")
  n_ell = max(x_ndim - (len(xs) - 3) if "..." in xs else 0,
              k_ndim - (len(ks) - 3) if "..." in ks else 0)
  ell = _fresh(eq, n_ell)
  xs, ks, out = _expand(xs, x_ndim, ell), _expand(ks, k_ndim, ell), out.replace("...", ell)
  if len(xs) != x_ndim or len(ks) != k_ndim:
    raise ValueError(f"{path}: einsum {equation!r} does not fit an input of {x_ndim} axes "
                     f"and a kernel of {k_ndim} axes")
  both = [c for c in ks if c in xs and c in out]
  none = [c for c in ks if c not in xs and c not in out]
  if both or none:
    raise ValueError(
        f"{path}: einsum {equation!r} has kernel axes {both or none} that are "
        f"{'shared by input and output (batch-like)' if both else 'summed out of the kernel'}; "
        "LoRA needs every kernel axis to be either contracted with the input or kept in the "
        "output. Exclude this layer from LoraConfig.targets")
  ins = tuple(i for i, c in enumerate(ks) if c in xs)
  outs = tuple(i for i, c in enumerate(ks) if c in out)
  return Spec(xs, ks, out, ins, outs)


def dense_spec(x_ndim: int) -> Spec:
  """``nn.Dense``: ``[..., in] · [in, out] -> [..., out]``."""
  b = _fresh("io", x_ndim - 1)
  return Spec(b + "i", "io", b + "o", (0,), (1,))


def dense_general_spec(x_ndim: int, axis, n_features: int, batch_dims, path: str) -> Spec:
  """``nn.DenseGeneral`` (``nnx.LinearGeneral``): contract ``axis`` of x with the
  kernel's leading axes; the output is x's other axes then the features."""
  if tuple(batch_dims):
    raise ValueError(f"{path}: DenseGeneral with batch_dims {tuple(batch_dims)} shares kernel "
                     "axes between input and output; LoRA cannot adapt it. Exclude the layer")
  axis = tuple(a % x_ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
  xs = string.ascii_letters[:x_ndim]
  feats = _fresh(xs, n_features)
  ks = "".join(xs[a] for a in axis) + feats
  out = "".join(c for i, c in enumerate(xs) if i not in axis) + feats
  return Spec(xs, ks, out, tuple(range(len(axis))), tuple(range(len(axis), len(ks))))


@dataclasses.dataclass
class LayerCall:
  """One call of a supported layer, as :func:`forward` needs it.

  Attributes:
    kind: "dense" (Dense, DenseGeneral, Einsum), "conv", "embed" (lookup) or
      "attend" (``Embed.attend``).
    x: the layer input (integer ids for "embed", the query for "attend").
    base: runs the unchanged base layer (bias included) on an input.
    path: the adapted parameter's path, for error messages.
    spec: the einsum letters ("dense" only).
    conv_r: ``(x, a) -> [..., r]``, the layer's own convolution with ``a`` as
      kernel ("conv" only).
    bias: the layer's bias or None (DoRA subtracts it from ``base(x)``).
    dtype: the layer's computation dtype, or None to use the input's.
    precision: the layer's matmul precision.
    layer_kind: the LoRA kind recorded by tracing ("dense" or "einsum" for a
      "dense" call; the others follow ``kind``).
  """
  kind: str
  x: Any
  base: Callable[[Any], jax.Array]
  path: str
  spec: Spec | None = None
  conv_r: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  bias: jax.Array | None = None
  dtype: Any = None
  precision: Any = None
  layer_kind: str = ""


def layer_info(call: LayerCall, weight_ndim: int, stored_ndim: int) -> L.LayerInfo:
  """The :class:`jlora.lora.LayerInfo` of a traced call: kind, axes and stack."""
  if call.kind == "dense":
    in_axes, out_axes = call.spec.in_axes, call.spec.out_axes
    kind = call.layer_kind or "dense"
  elif call.kind == "conv":
    in_axes, out_axes, kind = tuple(range(weight_ndim - 1)), (weight_ndim - 1,), "conv"
  else:
    in_axes, out_axes, kind = (0,), (1,), "embed"
  return L.LayerInfo(kind, in_axes, out_axes, stored_ndim - weight_ndim)


def is_quantized(x: Any) -> bool:
  """A quantized base weight (a jlora node with ``dequantize``, e.g. ``QArray``)."""
  return paths.is_node(x) and not isinstance(x, L.LoRA) and hasattr(x, "dequantize")


def adapter_slots(flat: dict[str, Any], adapter: Any, where: str) -> dict[str, L.LoRA | None]:
  """``{path: LoRA or None}``: each adapted weight of ``flat`` and each quantized one.

  Quantized weights get a slot (None: no adapter) because they must be
  dequantized where they are used. Raises ValueError when an adapter path is
  not in ``flat`` (``where`` names that tree) or its LoRA does not fit the weight.
  """
  from jlora import adapter as adapter_mod
  ads = adapter_mod.loras(adapter) if adapter is not None else {}
  for p, lo in ads.items():
    if p not in flat:
      raise ValueError(f"adapter path {p!r} is not in {where} (it has e.g. {list(flat)[:4]})")
    L.check_weight(tuple(flat[p].shape), lo, p)
  slots: dict[str, L.LoRA | None] = {p: None for p, w in flat.items() if is_quantized(w)}
  slots.update(ads)
  return slots


def plain(weight: Any) -> jax.Array:
  """The weight as an array (a quantized one dequantized)."""
  return weight.dequantize() if is_quantized(weight) else weight


def per_call(lora: L.LoRA, weight_shape, call: LayerCall) -> L.LoRA:
  """The LoRA as the layer sees it in this call, checked against the call.

  Inside ``nn.scan`` / ``nn.vmap`` the node arrives sliced (its static
  ``stack`` still counts the removed axes); this recomputes ``stack`` from
  the arrays and checks shapes and axes.
  """
  path, n_in = call.path, len(lora.in_axes)
  lo = lora.replace(stack=lora.a.ndim - 1 - n_in)
  if lo.stack != 0:
    raise ValueError(f"adapter at {path!r} has a: {list(lora.a.shape)} with {lo.stack} stacked "
                     f"axes left, but the layer uses a kernel of {list(weight_shape)} per call")
  L.check_weight(tuple(weight_shape), lo, path)
  want = _axes_of(call, len(weight_shape))
  got = (lo.in_axes, lo.out_axes)
  same = (set(got[0]), set(got[1])) == (set(want[0]), set(want[1])) if call.kind == "dense" \
      else got == want
  if not same:
    raise ValueError(
        f"adapter at {path!r} groups kernel axes as in={lo.in_axes} out={lo.out_axes}, but the "
        f"layer ({call.kind}) uses in={want[0]} out={want[1]}; create the adapter with "
        "jlora.init_adapter(..., model=model, args=(x,)) so the axes are traced")
  return lo


def _axes_of(call: LayerCall, ndim: int):
  if call.kind == "dense":
    return call.spec.in_axes, call.spec.out_axes
  if call.kind == "conv":
    return tuple(range(ndim - 1)), (ndim - 1,)
  return (0,), (1,)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout on the LoRA input; ``x`` itself when off (no key or rate 0)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def _last(v: jax.Array, ndim: int) -> jax.Array:
  """``v: [n]`` shaped to broadcast on the last axis of an ``ndim``-array."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


def lora_term(call: LayerCall, lo: L.LoRA, x: jax.Array, dtype) -> jax.Array:
  """``scale · (x·a)·b`` in the layer's output layout, computed in ``dtype``."""
  a, b, p = lo.a.astype(dtype), lo.b.astype(dtype), call.precision
  if call.kind == "embed":
    t = jnp.take(a, x, axis=0)
    return jnp.matmul(t, b, precision=p) * jnp.asarray(lo.scale, dtype)
  x = x.astype(dtype)
  if call.kind == "conv":
    t = call.conv_r(x, a)
    return jnp.einsum("...r,ro->...o", t, b, precision=p) * jnp.asarray(lo.scale, dtype)
  s = call.spec
  r = _fresh(s.x + s.k + s.o, 1)
  ins = "".join(s.k[i] for i in lo.in_axes)
  t_letters = "".join(c for c in s.x if c not in ins) + r
  t = jnp.einsum(f"{s.x},{ins + r}->{t_letters}", x, a, precision=p)
  outs = "".join(s.k[i] for i in lo.out_axes)
  u = jnp.einsum(f"{t_letters},{r + outs}->{s.o}", t, b, precision=p)
  return u * jnp.asarray(lo.scale, dtype)


def _out_mul(call: LayerCall, lo: L.LoRA, v: jax.Array, g: jax.Array) -> jax.Array:
  """``v * g`` with ``g: [*out_dims]`` broadcast on the output features."""
  if call.kind == "dense":
    s = call.spec
    return jnp.einsum(f"{s.o},{''.join(s.k[i] for i in lo.out_axes)}->{s.o}", v, g)
  return v * _last(g, v.ndim)


def _strip_bias(call: LayerCall, y: jax.Array) -> jax.Array:
  if call.bias is None:
    return y
  bias = call.bias.astype(y.dtype)
  if call.kind == "dense":
    s = call.spec
    return y - bias.reshape([y.shape[i] if c in s.k else 1 for i, c in enumerate(s.o)])
  return y - _last(bias, y.ndim)


def dora_scale(weight: jax.Array, lo: L.LoRA) -> jax.Array:
  """``g = m / ‖W + ΔW‖`` per output feature, ``[*out_dims]``.

  The norm is a constant for the gradient (``stop_gradient``, as PEFT's
  ``detach``) and is computed without forming ``W + ΔW``:
  ``‖w + s·A b‖² = ‖w‖² + 2s·(Aᵀw)·b + s²·bᵀ(AᵀA)b`` column by column
  (in float32, or float64 for float64 weights).
  """
  f32 = jnp.promote_types(weight.dtype, jnp.float32)
  w = jax.lax.stop_gradient(L.as_matrix(weight.astype(f32), lo))            # [in, out]
  a = jax.lax.stop_gradient(lo.a.astype(f32).reshape(-1, lo.a.shape[-1]))  # [in, r]
  b = jax.lax.stop_gradient(lo.b.astype(f32).reshape(lo.b.shape[0], -1))   # [r, out]
  s = lo.scale
  atw = jnp.matmul(a.T, w, precision=HIGHEST)                               # [r, out]
  ata = jnp.matmul(a.T, a, precision=HIGHEST)                               # [r, r]
  sq = (jnp.sum(w * w, axis=0) + 2.0 * s * jnp.sum(atw * b, axis=0)
        + s * s * jnp.sum(jnp.matmul(ata, b, precision=HIGHEST) * b, axis=0))
  norm = jnp.sqrt(jnp.maximum(sq, 0.0)).reshape(lo.out_dims)
  return lo.magnitude.astype(f32) / norm


def _compute_dtype(call: LayerCall, x: jax.Array, y: jax.Array):
  if call.dtype is not None:
    return call.dtype
  return x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else y.dtype


def forward(call: LayerCall, lora: L.LoRA | None, weight: Any, key: jax.Array | None) -> jax.Array:
  """The layer's output with its adapter added, unmerged (see the module docstring).

  Args:
    call: the layer call.
    lora: the layer's LoRA (possibly sliced by a lifted transform) or None.
    weight: the per-call base weight (an array or a quantized node), read only
      for shapes and, with DoRA, the norm.
    key: PRNG key for dropout on the LoRA input, or None (no dropout).

  Returns:
    ``y`` of the base layer's shape and dtype.
  """
  if lora is None:
    return call.base(call.x)
  lo = per_call(lora, weight.shape, call)
  if call.kind == "attend":
    return _attend(call, lo, weight, key)
  x = call.x
  x_d = x if call.kind == "embed" else dropout(x, lo.dropout, key)
  y = call.base(x)
  u = lora_term(call, lo, x_d, _compute_dtype(call, x, y)).astype(y.dtype)
  if lo.magnitude is None:
    return y + u
  g = dora_scale(plain(weight), lo).astype(y.dtype)
  y_nb = _strip_bias(call, y if x_d is x else call.base(x_d))
  return y + _out_mul(call, lo, y_nb, g - 1) + _out_mul(call, lo, u, g)


def _attend(call: LayerCall, lo: L.LoRA, weight: Any, key) -> jax.Array:
  """``Embed.attend``: ``q · (W + ΔW)ᵀ``; DoRA scales the columns of W, i.e. the query."""
  q = call.x
  if lo.magnitude is not None:
    q = q * _last(dora_scale(plain(weight), lo).astype(q.dtype), q.ndim)
  y = call.base(q)
  dtype = call.dtype or q.dtype
  q_d = dropout(q, lo.dropout, key).astype(dtype)
  a, b, p = lo.a.astype(dtype), lo.b.astype(dtype), call.precision
  t = jnp.einsum("...d,rd->...r", q_d, b, precision=p)
  u = jnp.einsum("...r,vr->...v", t, a, precision=p) * jnp.asarray(lo.scale, dtype)
  return y + u.astype(y.dtype)
