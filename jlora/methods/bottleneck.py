"""Bottleneck adapters: a small residual MLP on a layer's output (Houlsby et al., 2019).

A :class:`Bottleneck` node sits in an adapter tree at a weight's path, like a
``LoRA``. Where the function multiplies by that weight, ``y = x·W`` becomes

  y + up(act(down(y)))       down: [*O, h] (+ bias [h]), up: [h, *O] (+ bias [*O])

with ``h`` the bottleneck width. ``up`` (and its bias) start at zero, so an
untrained adapter changes nothing. Placement as in the papers:

  "houlsby"    after the attention output (``o_proj``) and after the MLP (``down_proj``)
  "pfeiffer"   after the MLP only (``down_proj``)

The adapter acts on ``x·W``, before the layer's bias (the reference models'
projections have none). It is not a linear change of ``W``, so it cannot be
merged: ``jlora.merge`` raises, and so does a use of the weight other than a
matmul whose output axes the adapter can follow.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jlora import paths
from jlora.checkpoint import register_node
from jlora.errors import AdapterError
from jlora.methods import layers as LY

PLACEMENTS = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bottleneck:
  """One bottleneck adapter on the output of the matmul by a weight.

  Attributes:
    down: ``[*stack, *out_dims, h]``; down_bias: ``[*stack, h]``.
    up: ``[*stack, h, *out_dims]``; up_bias: ``[*stack, *out_dims]``.
    in_axes / out_axes: the per-layer kernel's input and output axes (static).
    activation: one of :data:`ACTIVATIONS` (static).

  Example:
    >>> node = Bottleneck(down=jnp.ones((8, 2)), down_bias=jnp.zeros(2),
    ...                   up=jnp.zeros((2, 8)), up_bias=jnp.zeros(8))
    >>> node.width, node.stack
    (2, 0)
  """
  down: jax.Array
  down_bias: jax.Array
  up: jax.Array
  up_bias: jax.Array
  in_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
  out_axes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
  activation: str = dataclasses.field(default="relu", metadata=dict(static=True))
  _jlora_node = True
  _jlora_adapter = True
  FIELDS = {"down": "SOh", "down_bias": "Sh", "up": "ShO", "up_bias": "SO"}
  NONLINEAR = True   # of the whole output: no split input/output axes inside shard_map

  @property
  def width(self) -> int:
    return int(self.down.shape[-1])

  @property
  def stack(self) -> int:
    return len(self.down_bias.shape) - 1

  def replace(self, **kw) -> "Bottleneck":
    return dataclasses.replace(self, **kw)

  def residual(self, f: jax.Array) -> jax.Array:
    """``f + up(act(down(f)))`` for features ``f: [..., ∏out_dims]`` (no stacked axes)."""
    h = self.width
    dt = f.dtype
    down = self.down.reshape(-1, h).astype(dt)
    up = self.up.reshape(h, -1).astype(dt)
    z = ACTIVATIONS[self.activation](f @ down + _lead(self.down_bias.astype(dt), f.ndim))
    return f + (z @ up + _lead(self.up_bias.reshape(-1).astype(dt), f.ndim))

  # -- the transformation's hooks (jlora/transform/rules.py: DotSite)
  def on_dot(self, site):
    """``y + up(act(down(y)))`` at a matmul by the weight; None where it cannot follow."""
    if not site.ok or site.w.count("s"):
      return None
    return site.unfeatures(self.residual(site.features(site.y)))

  def merged(self, view, w):
    raise AdapterError(f"the bottleneck adapter at {w.path!r} cannot be merged into the weight, "
                       "but the function uses the weight other than as the matrix of a matmul "
                       "whose outputs the adapter can follow (or through a vmapped layer stack)")

  def merge_into(self, weight, path: str, subtract: bool = False):
    raise AdapterError(f"the bottleneck adapter at {path!r} adds a nonlinear function of the "
                       "layer's output; it cannot be merged into (or unmerged from) the weight")

  def check_weight(self, shape, path: str) -> None:
    LY.check_kernel(shape, self, path, {"up": "ShO", "up_bias": "SO"})
    s = self.stack
    if self.down.shape[-1] != self.up.shape[s] or self.down_bias.shape[-1] != self.up.shape[s]:
      raise AdapterError(f"bottleneck at {path!r}: down {list(self.down.shape)}, down_bias "
                         f"{list(self.down_bias.shape)} and up {list(self.up.shape)} disagree "
                         "on the width")


def _lead(x: jax.Array, ndim: int) -> jax.Array:
  return x.reshape((1,) * (ndim - x.ndim) + x.shape)


register_node(Bottleneck)


def init_bottleneck(key: jax.Array, params: Any, *, width: int = 16,
                    placement: str | None = "houlsby", targets: str | Sequence[str] | None = None,
                    activation: str = "relu", model=None, args=(),
                    kwargs: Mapping | None = None, dtype=jnp.float32) -> dict:
  """Bottleneck adapters (``up`` zero: no change yet) on the outputs of the targeted layers.

  Args:
    key: PRNG key (``down`` ~ U(±1/sqrt(∏out_dims)), as a Linear layer's).
    params: the base parameter tree (may be quantized).
    width: the bottleneck width ``h``.
    placement: "houlsby" (``o_proj`` and ``down_proj``) or "pfeiffer"
      (``down_proj``); ignored when ``targets`` is given.
    targets: module names or a regex, as ``LoraConfig.targets``.
    activation: one of :data:`ACTIVATIONS`.
    model, args, kwargs: the model and example inputs (traced abstractly to
      learn each weight's axes and stacked layers).
    dtype: the adapter's dtype.

  Returns:
    The adapter tree: a :class:`Bottleneck` at each targeted weight's path.

  Example:
    >>> p = {"o_proj": {"kernel": jnp.ones((8, 6))}, "down_proj": {"kernel": jnp.ones((4, 6))}}
    >>> ad = init_bottleneck(jax.random.key(0), p, width=2)
    >>> ad["o_proj"]["kernel"].down.shape, ad["o_proj"]["kernel"].up.shape
    ((6, 2), (2, 6))
  """
  if targets is None:
    if placement not in PLACEMENTS:
      raise AdapterError(f"init_bottleneck: placement must be one of {sorted(PLACEMENTS)} "
                         f"(or give targets=), got {placement!r}")
    targets = list(PLACEMENTS[placement])
  if activation not in ACTIVATIONS:
    raise AdapterError(f"init_bottleneck: activation must be one of {sorted(ACTIVATIONS)}, "
                       f"got {activation!r}")
  if not isinstance(width, int) or width < 1:
    raise AdapterError(f"init_bottleneck: width must be a positive int, got {width!r}")
  flat = paths.flatten(params)
  found = LY.dense_layers(params, targets, LY.learn(params, model, args, kwargs),
                          what="bottleneck")
  out = {}
  for p, info in found.items():
    stack, _, outs = LY.dims(flat[p].shape, info)
    n = math.prod(outs)
    bound = 1.0 / math.sqrt(n)
    k = jax.random.fold_in(key, paths.path_seed(p))
    out[p] = Bottleneck(
        down=jax.random.uniform(k, stack + outs + (width,), dtype, -bound, bound),
        down_bias=jnp.zeros(stack + (width,), dtype), up=jnp.zeros(stack + (width,) + outs, dtype),
        up_bias=jnp.zeros(stack + outs, dtype), in_axes=info.in_axes, out_axes=info.out_axes,
        activation=activation)
  return paths.unflatten(out)
