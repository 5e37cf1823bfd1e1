"""``init_adapter`` with a model: learn each layer's kind and axes, then init.

A kernel's shape alone does not say how a layer uses it: ``[L, in, out]`` may
be a scanned stack of Dense layers or a DenseGeneral, a 4-D kernel a Conv or
a DenseGeneral. Given the model, jlora looks: a Linen model is traced
abstractly (``jax.eval_shape`` of ``model.apply`` under an interceptor, no
FLOPs), an NNX model is read from its layer objects.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from jlora import adapter as _adapter
from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig
from jlora.flax import layers


def learn_layers(model, params, args=(), kwargs=None, *, collections=None,
                 method=None) -> dict[str, Any]:
  """``{path: LayerInfo | (kind, error)}`` for the weights the model's standard
  layers use."""
  from flax import nnx
  if isinstance(model, nnx.Module):
    from jlora.flax import nnx as jnnx
    return jnnx.learn_layers(model, params)
  from jlora.flax import linen
  return linen.trace(model, params, args, kwargs, collections=collections, method=method)


def init_adapter(key: jax.Array, params: Any, cfg: LoraConfig, *, model, args=(),
                 kwargs: Mapping | None = None, return_base: bool = False,
                 collections: Mapping | None = None, method=None):
  """:func:`jlora.adapter.init_adapter` with each layer's kind and axes learnt
  from ``model``; see :func:`jlora.init_adapter`."""
  record = learn_layers(model, params, args, kwargs, collections=collections, method=method)
  flat = paths.flatten(params)
  out = {}
  for p, w in flat.items():
    shape = tuple(getattr(w, "shape", ()))
    found = record.get(p)
    if isinstance(found, L.LayerInfo):
      if cfg.matches(p, len(shape), found.kind):
        out.update(_init_one(key, p, w, cfg, found))
    elif isinstance(found, tuple):
      if cfg.matches(p, len(shape), found[0]):
        raise ValueError(found[1])
    elif cfg.matches(p, len(shape), None):
      raise ValueError(
          f"LoraConfig.targets matches {p!r} (shape {list(shape)}), but no supported layer "
          "(Dense, DenseGeneral, Einsum, Conv, ConvTranspose, Embed) used it when the model "
          "was traced; exclude it with LoraConfig(exclude=...) or target it by name")
  if not out:
    raise ValueError(f"LoraConfig.targets={cfg.targets!r} matches no weight that a supported "
                     f"layer uses (layers found: {sorted(record)[:8]})")
  adapter = paths.unflatten(out)
  if return_base:
    return adapter, (_adapter.unmerge(params, adapter) if cfg.init == "pissa" else params)
  return adapter


def _init_one(key, path, weight, cfg, info) -> dict[str, L.LoRA]:
  """One weight's LoRA (``jlora.adapter.init_adapter`` on a one-leaf tree, so the
  key folded from the path is the same; a quantized weight is dequantized only
  when the init reads values: PiSSA, DoRA)."""
  if layers.is_quantized(weight):
    needs_values = cfg.use_dora or cfg.init == "pissa"
    weight = weight.dequantize() if needs_values else jax.ShapeDtypeStruct(weight.shape,
                                                                             weight.dtype)
  one = _adapter.init_adapter(key, paths.unflatten({path: weight}), cfg, layers={path: info})
  return _adapter.loras(one)
