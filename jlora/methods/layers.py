"""Which weights a per-layer adapter kind (IA³, bottleneck) attaches to, and how.

One table of what is adaptable, shared with LoRA: a function traced
abstractly (``jlora.flax.learn_layers``) tells for every weight how it is
used; the kinds here attach to matmul weights (``dense``) only, chosen by
``targets`` with :class:`jlora.LoraConfig`'s matching rules (a list of module
names as PEFT, or a regex on the whole path).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig
from jlora.errors import AdapterError


def learn(params: Any, model=None, args=(), kwargs: Mapping | None = None) -> dict | None:
  """How ``model`` uses each weight (``jlora.flax.learn_layers``), or None without a model."""
  if model is None:
    return None
  from jlora.flax import learn_layers
  return learn_layers(model, params, args, kwargs)


def dense_layers(params: Any, targets, infos: Mapping | None = None,
                 what: str = "adapter") -> dict[str, L.LayerInfo]:
  """``{param_path: LayerInfo}`` of every matmul weight of ``params`` that ``targets`` names.

  ``infos`` is :func:`learn`'s result; without it a 2-D ``kernel`` is read
  as Flax's ``[in, out]``.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"k_proj": {"kernel": jnp.ones((8, 4))}, "norm": {"scale": jnp.ones(8)}}
    >>> dense_layers(p, ["k_proj"])
    {'k_proj/kernel': LayerInfo(kind='dense', in_axes=(0,), out_axes=(1,), stack=0)}
  """
  cfg = LoraConfig(targets=targets)
  flat = paths.flatten(params)
  traced = infos is not None
  if not traced:
    infos = {p: L.LayerInfo("dense", (0,), (1,), 0) for p, w in flat.items()
             if (p.endswith("/kernel") or p == "kernel") and len(getattr(w, "shape", ())) == 2}
  out = {}
  for p, info in infos.items():
    kind = info.kind if isinstance(info, L.LayerInfo) else "none"
    if not cfg.matches(p, len(flat[p].shape), kind if traced else None):
      continue
    if not isinstance(info, L.LayerInfo) or info.kind != "dense":
      why = info if isinstance(info, str) else f"{p!r} is used as a {info.kind} weight"
      raise AdapterError(f"{what}: targets={targets!r} names {why}; it attaches to matmul "
                         "weights only")
    out[p] = info
  if not out:
    raise AdapterError(f"{what}: targets={targets!r} match no matmul weight (paths look like "
                       f"{list(flat)[:5]})")
  return out


def dims(shape, info: L.LayerInfo) -> tuple[tuple, tuple, tuple]:
  """``(stack_dims, in_dims, out_dims)`` of a weight ``[*stack, *kernel]``."""
  s = info.stack
  return (tuple(shape[:s]), tuple(shape[s + a] for a in info.in_axes),
          tuple(shape[s + a] for a in info.out_axes))


def check_kernel(shape, node, path: str, fields: Mapping[str, str]) -> None:
  """Raises an AdapterError naming ``path`` when ``node``'s arrays do not fit ``shape``.

  ``fields`` maps an array name to the kernel axes it carries: "SO", "SI", ...
  (its own axes come last or between and are not checked).
  """
  s = node.stack
  n_kernel = len(node.in_axes) + len(node.out_axes)
  if len(shape) != s + n_kernel:
    raise AdapterError(f"adapter at {path!r} adapts a kernel of {n_kernel} axes after {s} "
                       f"stacked ones, but the base weight is {list(shape)}")
  want = {"S": tuple(shape[:s]), "I": tuple(shape[s + a] for a in node.in_axes),
          "O": tuple(shape[s + a] for a in node.out_axes)}
  for name, template in fields.items():
    v = getattr(node, name)
    if v is None:
      continue
    got, pos = [], 0
    for t in template:
      n = len(want[t]) if t in want else 1
      if t in want:
        got.append((t, tuple(v.shape[pos:pos + n])))
      pos += n
    for t, dims_ in got:
      if dims_ != want[t]:
        raise AdapterError(f"adapter at {path!r} has {name}: {list(v.shape)}, which does not fit "
                           f"the base weight {list(shape)} ({'stacked' if t == 'S' else 'input' if t == 'I' else 'output'} "
                           f"dims {list(want[t])})")


def over_view(w, v: jax.Array, kind: str) -> jax.Array:
  """An array ``v: [*S, *K]`` (K the ``kind`` axes, "i" or "o", in factor order)
  laid out over a transformation Weight's view: 1 on its other axes."""
  ns = w.count("s")
  labels = [("s", j) for j in range(ns)] + [(kind, j) for j in range(w.count(kind))]
  have = [r for r in w.roles if r[0] in ("s", kind)]
  v = jax.numpy.transpose(v, [labels.index(r) for r in have])
  shape = [n if r[0] in ("s", kind) else 1 for r, n in zip(w.roles, w.shape)]
  return v.reshape(shape)


def over_kernel(v: jax.Array, node, kind: str, ndim: int) -> jax.Array:
  """``v: [*S, *K]`` (K = the node's in or out axes) broadcastable over its stored weight."""
  axes = node.in_axes if kind == "i" else node.out_axes
  s = node.stack
  positions = list(range(s)) + [s + a for a in axes]
  order = sorted(range(len(positions)), key=lambda k: positions[k])
  v = jax.numpy.transpose(v, order)
  shape = [1] * ndim
  for k in order:
    shape[positions[k]] = v.shape[order.index(k)]
  return v.reshape(shape)
