"""``jlora.apply`` and ``jlora.init_adapter``: thin front ends over the transformation.

A Linen model becomes ``lambda params, *a: model.apply({"params": params, ...}, *a)``,
an NNX model ``nnx.merge(graphdef, state)(*a)`` (see :mod:`jlora.flax.nnx`),
and any other callable ``fn(params, *a)`` is used as it is; all of them are
then adapted by :func:`jlora.transform.adapt`. See docs/flax.md.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from jlora import adapter as _adapter
from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig
from jlora.errors import AdapterError
from jlora.transform import adapt, learn
from jlora.transform.layers import layer_infos

_LORA_DROPOUT_SALT = 0x4C6F5241   # LoRA dropout keys differ from the model's own


def _is_nnx(model) -> bool:
  from flax import nnx
  return isinstance(model, nnx.Module)


def _is_linen(model) -> bool:
  import flax.linen as nn
  return isinstance(model, nn.Module)


def _linen_fn(model, collections=None, method=None, rngs=None, mutable=False):
  others = dict(collections or {})

  def fn(params, *args, **kwargs):
    return model.apply({**others, "params": params}, *args, rngs=rngs, method=method,
                       mutable=mutable, **kwargs)
  return fn


def _example_args(model, args):
  if args:
    return tuple(args)
  make = getattr(model, "example_args", None)
  if callable(make):
    return tuple(make())
  raise AdapterError(
      f"jlora needs example inputs to see how {type(model).__name__} uses its weights: pass "
      "args=(x, ...) (arrays or jax.ShapeDtypeStruct; nothing is computed)")


def learn_layers(model, params: Any, args=(), kwargs: Mapping | None = None, *,
                 collections: Mapping | None = None, method=None) -> dict[str, Any]:
  """``{path: LayerInfo | message}`` for every weight of ``params`` (two or more axes),
  learnt by tracing ``model`` abstractly (``jax.eval_shape``: no FLOPs).

  A message says why LoRA cannot adapt the weight (how the function uses it).
  """
  args = _example_args(model, args)
  if _is_nnx(model):
    from jlora.flax import nnx as _nnx
    fn, params, rest = _nnx.pure(model, params)
    uses = learn(fn, params, (rest, *args), kwargs)
  else:
    fn = _linen_fn(model, collections, method) if _is_linen(model) else model
    uses = learn(fn, params, args, kwargs)
  shapes = {p: tuple(w.shape) for p, w in paths.flatten(params).items() if p in uses}
  return layer_infos(uses, shapes)


def init_adapter(key: jax.Array, params: Any, cfg: LoraConfig, *, model=None, args=(),
                 kwargs: Mapping | None = None, return_base: bool = False,
                 collections: Mapping | None = None, method=None):
  """Creates an adapter for every weight of ``params`` that ``cfg`` targets.

  Without ``model`` a weight's layout is read from its shape: a 2-D
  ``kernel`` is ``[in, out]`` (Flax), an ``embedding`` ``[vocab, dim]``.
  With ``model`` (a Linen or NNX module, or any function ``fn(params, *args)``)
  and example ``args``, jlora traces it abstractly (``jax.eval_shape``: no
  FLOPs) and learns how each weight is used: as the matrix operand of a
  matmul (``dense``; the contracted axes are its inputs), a convolution
  kernel (``conv``) or an embedding table (``embed``), and which leading axes
  are stacked layers (a scanned or vmapped stack). ``cfg.targets`` then
  picks among them (see :class:`jlora.LoraConfig`).

  Args:
    key: PRNG key.
    params: the base parameter tree (may hold quantized ``QArray`` weights);
      an ``nnx.State`` for an NNX model.
    cfg: the :class:`jlora.LoraConfig`.
    model: a ``flax.linen.Module``, an ``nnx.Module``, a function
      ``fn(params, *args, **kwargs)``, or None.
    args / kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``); a
      model with an ``example_args()`` method (the reference models) needs none.
    return_base: also return the base to train against (for "pissa" the
      residual ``W - scale·a@b``).
    collections: other Linen variable collections the model needs.
    method: the Linen method to trace (default ``__call__``).

  Returns:
    The adapter tree (``a: [*stack, *in_dims, r]``, ``b: [*stack, r, *out_dims]``
    at each adapted path), or ``(adapter, base)``.

  Raises:
    AdapterError: a targeted weight is not used as a matmul operand, conv
      kernel or lookup table (the message says how it is used), or nothing
      matches.

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
  infos = learn_layers(model, params, args, kwargs, collections=collections, method=method)
  return _adapter.init_adapter(key, params, cfg, layers=infos, return_base=return_base)


def apply(model, variables, adapter, *args, rngs=None, dropout_rng=None, adapter_ids=None,
          **kwargs):
  """Runs ``model`` with ``adapter`` added to every use of each adapted weight, unmerged.

  Each matmul on an adapted weight computes ``x·W + scale · (drop(x)·a)·b``
  (DoRA: PEFT's ``g·(x·W + scale·(x·a)·b)``, ``g = m/‖W+ΔW‖`` held constant
  for the gradient); convolutions and embedding lookups their own forms, and
  any other use of the weight sees ``W + ΔW`` (docs/flax.md has the table).
  A quantized weight (``QArray``) is dequantized where it is used, inside
  ``jax.checkpoint``.

  Args:
    model: a ``flax.linen.Module``; an ``nnx.Module`` (then ``variables`` is an
      ``nnx.State`` of values to use, or None for the model's own, see
      :func:`jlora.flax.nnx.apply`); or any function ``fn(params, *args)``
      (then ``variables`` is ``params``).
    variables: Linen variables ``{"params": params, ...}``.
    adapter: the adapter tree (``LoRA`` nodes at weight paths), a
      :class:`jlora.AdapterBank` (with ``adapter_ids``), or None.
    *args: the model's inputs.
    rngs: the model's own rngs (Linen ``model.apply(rngs=...)``); a
      ``"dropout"`` key there also drives LoRA dropout unless ``dropout_rng``
      is given. For an NNX model it is passed to the model's call.
    dropout_rng: a PRNG key for LoRA dropout (``LoraConfig.dropout``).
    adapter_ids: with a bank, each example's slot ``[batch]`` (or each
      token's, ``[batch, seq]``); ``-1`` (``jlora.bank.BASE``) is the base alone.
    **kwargs: passed to ``model.apply`` (``method``, ``mutable`` included) or
      to the model's call.

  Returns:
    What the model returns.

  Raises:
    AdapterError: an adapter path is missing from the params or its shapes
      do not fit.

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> ad = init_adapter(jax.random.key(1), params, LoraConfig(rank=2, targets=".*"))
    >>> apply(model, {"params": params}, ad, x).shape
    (2, 8)
  """
  adapter = _bound(adapter, adapter_ids)
  if _is_nnx(model):
    from jlora.flax import nnx as _nnx
    if rngs is not None:
      kwargs["rngs"] = rngs
    return _nnx.apply(model, variables, adapter, *args, dropout_rng=dropout_rng, **kwargs)
  if not _is_linen(model):
    if not callable(model):
      raise AdapterError(f"jlora.apply: model must be a Flax module or a function of the "
                         f"params, got {type(model).__name__}")
    return adapt(model, variables, adapter, dropout_rng=dropout_rng)(*args, **kwargs)
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise AdapterError(f"jlora.apply: variables must hold a 'params' collection; got "
                       f"{list(variables) if isinstance(variables, Mapping) else type(variables)}")
  method, mutable = kwargs.pop("method", None), kwargs.pop("mutable", False)
  cols = [mutable] if isinstance(mutable, str) else mutable
  if cols is True or (isinstance(cols, (list, tuple)) and "params" in cols):
    raise AdapterError("jlora.apply: the 'params' collection cannot be mutable")
  if dropout_rng is None and isinstance(rngs, Mapping) and "dropout" in rngs:
    dropout_rng = jax.random.fold_in(rngs["dropout"], _LORA_DROPOUT_SALT)
  others = {k: v for k, v in variables.items() if k != "params"}
  fn = _linen_fn(model, others, method, rngs, mutable)
  return adapt(fn, variables["params"], adapter, dropout_rng=dropout_rng)(*args, **kwargs)


def _bound(adapter, adapter_ids):
  from jlora.bank import AdapterBank
  if isinstance(adapter, AdapterBank):
    if adapter_ids is None:
      raise AdapterError("jlora.apply: an AdapterBank needs adapter_ids (each example's slot)")
    return adapter.bind(adapter_ids)
  if adapter_ids is not None:
    raise AdapterError("jlora.apply: adapter_ids need an AdapterBank as the adapter")
  return adapter


__all__ = ["init_adapter", "apply", "learn_layers"]
