"""IA³: learned per-feature rescaling of a layer's outputs or inputs (Liu et al., 2022).

An :class:`IA3` node sits in an adapter tree at a weight's path, like a
``LoRA``. As PEFT implements it, a targeted layer ``y = x·W`` becomes

  y = (x·W) · l_out        l_out: [*S, *out_dims]   (keys, values: ``k_proj``, ``v_proj``)
  y = (x · l_in)·W         l_in:  [*S, *in_dims]    (feed-forward layers: ``down_proj``)

with ``l`` initialised to ones, so an untrained IA³ adapter changes nothing.
Both are a diagonal rescaling of ``W``, so IA³ merges exactly:
``W' = W · l_out`` (per output column) or ``l_in · W`` (per input row).

The transformation (``jlora.apply``/``jlora.adapt``) applies it at every
matmul use of the weight through the node's ``on_dot``; any other use sees
the merged weight. The scaling is of ``x·W`` only: on a layer with a bias,
PEFT's output scaling also scales the bias (its forward scales the whole
layer output); jlora's leaves the bias alone (``jlora.interop.peft_ia3``
refuses such layers rather than load them inexactly).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jlora import paths
from jlora.checkpoint import register_node
from jlora.errors import AdapterError
from jlora.methods import layers as LY
from jlora.quant.qarray import QArray

TARGETS = ("k_proj", "v_proj", "down_proj")
"""PEFT's default IA³ targets for Llama-family models."""
FEEDFORWARD = ("down_proj",)
"""PEFT's default IA³ feed-forward modules (scaled on their input) for Llama."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IA3:
  """One IA³-scaled weight: a vector on its output features, or on its input features.

  Exactly one of ``out`` and ``inp`` is set. The number of leading stacked
  layer axes is derived from the array.

  Attributes:
    out: ``[*stack, *out_dims]`` scales of the layer's outputs, or None.
    inp: ``[*stack, *in_dims]`` scales of the layer's inputs (PEFT's
      feed-forward layers), or None.
    in_axes / out_axes: the per-layer kernel's input and output axes (static).

  Example:
    >>> node = IA3(out=jnp.ones((4,)))
    >>> node.stack, node.feedforward
    (0, False)
  """
  out: jax.Array | None = None
  inp: jax.Array | None = None
  in_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
  out_axes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
  _jlora_node = True
  _jlora_adapter = True
  FIELDS = {"out": "SO", "inp": "SI"}

  @property
  def feedforward(self) -> bool:
    """Scales the inputs (PEFT's ``is_feedforward``)."""
    return self.inp is not None

  @property
  def vector(self) -> jax.Array:
    return self.inp if self.feedforward else self.out

  @property
  def stack(self) -> int:
    axes = self.in_axes if self.feedforward else self.out_axes
    return len(self.vector.shape) - len(axes)

  def replace(self, **kw) -> "IA3":
    return dataclasses.replace(self, **kw)

  # -- the transformation's hooks (jlora/transform/rules.py: DotSite)
  def on_dot(self, site):
    """``y · l_out`` or ``(x · l_in)·W`` at a matmul; None where the axes do not line up."""
    if not site.ok:
      return None
    if self.feedforward:
      x = site.x
      scale = site.on_input(self.inp)
      f = jnp.promote_types(x.dtype, scale.dtype)
      return site.base((x.astype(f) * scale.astype(f)).astype(x.dtype))
    y = site.y
    scale = site.on_output(self.out)
    f = jnp.promote_types(y.dtype, scale.dtype)
    return (y.astype(f) * scale.astype(f)).astype(y.dtype)

  def merged(self, view, w):
    """The merged view ``W · l`` for a use other than a matmul."""
    kind = "i" if self.feedforward else "o"
    scale = LY.over_view(w, self.vector, kind)
    f = jnp.promote_types(view.dtype, jnp.float32)
    return (view.astype(f) * scale.astype(f)).astype(view.dtype)

  def merge_into(self, weight, path: str, subtract: bool = False):
    """``W · l`` (``W / l`` with ``subtract``) in the stored layout; a quantized
    weight is dequantized, scaled and quantized again with its own scheme."""
    q = weight if isinstance(weight, QArray) else None
    w = q.dequantize(jnp.float32) if q is not None else weight
    kind = "i" if self.feedforward else "o"
    scale = over_kernel_f32(self, kind, len(w.shape))
    f = jnp.promote_types(w.dtype, jnp.float32)
    new = w.astype(f) / scale if subtract else w.astype(f) * scale
    if q is None:
      return new.astype(weight.dtype)
    from jlora.quant.merge import requantize
    return requantize(new, q, path)

  def check_weight(self, shape, path: str) -> None:
    if (self.out is None) == (self.inp is None):
      raise AdapterError(f"IA³ at {path!r} must scale either the outputs (out=) or the inputs "
                         "(inp=), not both or neither")
    LY.check_kernel(shape, self, path, {"inp": "SI"} if self.feedforward else {"out": "SO"})


def over_kernel_f32(node: IA3, kind: str, ndim: int) -> jax.Array:
  return LY.over_kernel(node.vector.astype(jnp.float32), node, kind, ndim)


register_node(IA3)


def init_ia3(params: Any, *, targets: str | Sequence[str] = TARGETS,
             feedforward: str | Sequence[str] = FEEDFORWARD, model=None, args=(),
             kwargs: Mapping | None = None, dtype=jnp.float32) -> dict:
  """An IA³ adapter (all ones: no change) for the matmul weights ``targets`` names.

  Args:
    params: the base parameter tree (may be quantized).
    targets: module names (PEFT's list rule) or a regex on the whole path.
    feedforward: those of the targets whose inputs are scaled (PEFT's
      ``feedforward_modules``); the others' outputs are.
    model, args, kwargs: the model and example inputs, traced abstractly to
      learn each weight's input/output axes and stacked layers (needed for a
      scanned stack or kernels of more than two axes); without them a 2-D
      ``kernel`` is ``[in, out]``.
    dtype: dtype of the vectors.

  Returns:
    The adapter tree: an :class:`IA3` at each targeted weight's path.

  Example:
    >>> p = {"k_proj": {"kernel": jnp.ones((8, 4))}, "down_proj": {"kernel": jnp.ones((6, 8))}}
    >>> ad = init_ia3(p)
    >>> ad["k_proj"]["kernel"].out.shape, ad["down_proj"]["kernel"].inp.shape
    ((4,), (6,))
  """
  flat = paths.flatten(params)
  infos = LY.learn(params, model, args, kwargs)
  found = LY.dense_layers(params, targets, infos, what="IA³")
  ff = LY.dense_layers(params, feedforward, infos, what="IA³ feedforward") if feedforward else {}
  extra = sorted(set(ff) - set(found))
  if extra:
    raise AdapterError(f"IA³: feedforward={feedforward!r} names {extra[:3]}, which targets="
                       f"{targets!r} does not (PEFT requires feedforward modules to be targets)")
  out = {}
  for p, info in found.items():
    stack, ins, outs = LY.dims(flat[p].shape, info)
    meta = dict(in_axes=info.in_axes, out_axes=info.out_axes)
    if p in ff:
      out[p] = IA3(inp=jnp.ones(stack + ins, dtype), **meta)
    else:
      out[p] = IA3(out=jnp.ones(stack + outs, dtype), **meta)
  return paths.unflatten(out)
