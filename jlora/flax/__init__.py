"""Running Flax models (Linen and NNX) with adapters.

``jlora.apply`` runs a model whose code is untouched, adding each adapted
layer's low-rank term unmerged; ``jlora.init_adapter`` with ``model=`` learns
how each layer uses its weight. See docs/flax.md.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from jlora import adapter as _adapter
from jlora.config import LoraConfig
from jlora.flax import linen as _linen
from jlora.flax import trace as _trace


def init_adapter(key: jax.Array, params: Any, cfg: LoraConfig, *, model=None, args=(),
                 kwargs: Mapping | None = None, return_base: bool = False,
                 collections: Mapping | None = None, method=None):
  """Creates an adapter for every weight of ``params`` that ``cfg`` targets.

  Without ``model`` this is :func:`jlora.adapter.init_adapter` (a ``kernel``
  must be 2-D). With a Linen ``model`` and example ``args``, jlora traces
  ``model.apply({"params": params, **collections}, *args, **kwargs)``
  abstractly (``jax.eval_shape``: no FLOPs, no memory for activations) to learn
  each layer's kind (dense, einsum, conv, embed), which kernel axes are its
  input and output, and how many leading stacked axes its kernel carries
  (``nn.scan`` / ``nn.vmap`` stacks). With an NNX ``model`` the layer objects
  say it (``params`` is then its ``nnx.State``; ``args`` are not needed).

  Args:
    key: PRNG key.
    params: the base parameter tree (may hold quantized ``QArray`` weights).
    cfg: the :class:`jlora.LoraConfig`.
    model: a ``flax.linen.Module`` or ``flax.nnx.Module``, or None.
    args / kwargs: example inputs of the Linen model's call (arrays or
      ``jax.ShapeDtypeStruct``).
    return_base: also return the base to train against (see
      :func:`jlora.adapter.init_adapter`).
    collections: other Linen variable collections the model needs (e.g.
      ``{"batch_stats": ...}``).
    method: the Linen method to trace (default ``__call__``).

  Returns:
    The adapter tree (``a: [*stack, *in_dims, r]``, ``b: [*stack, r, *out_dims]``
    at each adapted path), or ``(adapter, base)``.

  Raises:
    ValueError: a targeted weight is used by no supported layer, or by one
      LoRA cannot adapt (an Einsum kernel axis shared by input and output, a
      grouped or masked Conv), naming the path.

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> model = nn.DenseGeneral((4, 8), axis=-1)
    >>> x = jnp.ones((2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> ad = init_adapter(jax.random.key(1), params, LoraConfig(rank=2, targets=".*"),
    ...                   model=model, args=(x,))
    >>> ad["kernel"].a.shape, ad["kernel"].b.shape
    ((16, 2), (2, 4, 8))
  """
  if model is None:
    return _adapter.init_adapter(key, params, cfg, return_base=return_base)
  return _trace.init_adapter(key, params, cfg, model=model, args=args, kwargs=kwargs,
                             return_base=return_base, collections=collections, method=method)


def apply(model, variables, adapter, *args, rngs=None, **kwargs):
  """Runs a Flax model with ``adapter`` added to its standard layers, unmerged.

  Each adapted layer computes ``base(x) + scale · (drop(x) · a) · b`` (DoRA:
  PEFT's ``base(x) + (g-1)·x·W + g·scale·(drop(x)·a)·b`` with
  ``g = m/‖W+ΔW‖`` held constant for the gradient); ``W + ΔW`` is never
  formed. Supported layers: ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
  ``ConvTranspose`` (Linen only), ``Embed`` (lookup and ``attend``), also
  inside ``nn.scan``, ``nn.vmap``, ``nn.remat`` and when shared. A quantized
  weight (``QArray``) in the base is dequantized inside ``jax.checkpoint``
  where the layer runs (recomputed in the backward pass, not stored).

  LoRA dropout (``lora.dropout``) is applied to the LoRA input only when a
  ``"dropout"`` rng is given (``rngs={"dropout": key}``); an ``Embed`` lookup
  takes none (as PEFT). The LoRA term is computed in the layer's ``dtype`` if
  set, else in the input's (bf16 inputs: bf16 matmuls), and added to the base
  output in its dtype.

  Args:
    model: a ``flax.linen.Module``, or a ``flax.nnx.Module`` (see
      :func:`jlora.flax.nnx.apply`; then ``variables`` is an ``nnx.State`` or
      None for the model's own).
    variables: Linen variables, ``{"params": params, ...}``; params may hold
      ``QArray`` weights.
    adapter: the adapter tree (``LoRA`` nodes at weight paths) or None.
    *args: the model's inputs.
    rngs: Linen rngs; ``"dropout"`` also drives LoRA dropout.
    **kwargs: passed to ``model.apply`` (``method``, ``mutable`` included).

  Returns:
    What ``model.apply`` returns.

  Raises:
    ValueError: an adapter path is missing from the params or its shapes do not
      fit, or an adapted / quantized weight was not used by a supported layer.

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> ad = init_adapter(jax.random.key(1), params, LoraConfig(rank=2, targets=".*"))
    >>> apply(model, {"params": params}, ad, x).shape
    (2, 8)
  """
  from flax import nnx
  if isinstance(model, nnx.Module):
    from jlora.flax import nnx as _nnx
    return _nnx.apply(model, variables, adapter, *args, rngs=rngs, **kwargs)
  return _linen.apply(model, variables, adapter, *args, rngs=rngs, **kwargs)


__all__ = ["init_adapter", "apply"]
