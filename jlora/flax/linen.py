"""Running an unchanged ``flax.linen`` model with an adapter, by interception.

Before ``model.apply`` each adapted (or quantized) weight in the params tree
is replaced by a small pytree node, :class:`Slot` ``(weight, lora)``, so that
lifted transforms (``nn.scan``, ``nn.vmap``, ``nn.remat``) slice the LoRA's
arrays along the same stacked axis as the kernel. A method interceptor
(``nn.intercept_methods``) catches the calls of the standard layers; when a
layer's own parameter is a :class:`Slot` it runs the layer's own code on the
plain (dequantized) weight through a clone and adds the low-rank term
(:func:`jlora.flax.layers.forward`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta

from jlora import lora as L
from jlora import paths
from jlora.flax import layers

# class -> (parameter name, methods that use it)
SUPPORTED: dict[type, tuple[str, tuple[str, ...]]] = {
    nn.Dense: ("kernel", ("__call__",)),
    nn.DenseGeneral: ("kernel", ("__call__",)),
    nn.Einsum: ("kernel", ("__call__",)),
    nn.Conv: ("kernel", ("__call__",)),
    nn.ConvTranspose: ("kernel", ("__call__",)),
    nn.Embed: ("embedding", ("__call__", "attend", "setup")),
}

KINDS = {nn.Dense: "dense", nn.DenseGeneral: "dense", nn.Einsum: "einsum", nn.Conv: "conv",
         nn.ConvTranspose: "conv", nn.Embed: "embed"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slot:
  """A base weight with its LoRA (or None), placed in the params tree.

  Attributes:
    weight: the base weight ``[*stack, *kernel]`` (an array or a ``QArray``).
    lora: the :class:`~jlora.lora.LoRA` or None (a quantized weight alone).
    path: the weight's path in the params tree (static).
  """
  weight: Any
  lora: L.LoRA | None
  path: str = dataclasses.field(default="", metadata=dict(static=True))


def _supported(module: nn.Module, method: str) -> tuple[type, str] | None:
  """``(base class, parameter name)`` when ``method`` is a standard layer's own."""
  for cls, (name, methods) in SUPPORTED.items():
    if isinstance(module, cls) and method in methods:
      if getattr(type(module), method) is getattr(cls, method):
        return cls, name
  return None


def _slot(module: nn.Module, name: str) -> Slot | None:
  scope = module.scope
  if scope is None or not scope.has_variable("params", name):
    return None
  v = meta.unbox(scope.get_variable("params", name))
  return v if isinstance(v, Slot) else None


def _check_no_slot(module: nn.Module, method: str) -> None:
  """Raises when a module jlora does not intercept owns an adapted/quantized weight."""
  if module.scope is None:
    return
  own = module.scope.variables().get("params", {})
  slots = [v.path for v in (meta.unbox(x) for x in own.values()) if isinstance(v, Slot)]
  if slots:
    raise ValueError(
        f"the adapted or quantized weight at {slots} is read by {type(module).__name__}."
        f"{method}, which jlora does not intercept: only the standard layers (nn.Dense, "
        "nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose, nn.Embed) with their own "
        "methods can take an adapter or a quantized weight")


def _input(args, kwargs, method):
  if args:
    return args[0], args[1:], kwargs
  key = "query" if method == "attend" else "inputs"
  kw = dict(kwargs)
  return kw.pop(key), (), kw


def _base_fn(module: nn.Module, method: str, name: str, slot: Slot, rest, kwargs) -> Callable:
  """Runs the layer's own code on ``x`` with the plain weight in place of the slot."""
  clone = module.clone(parent=None)
  own = dict(module.variables)

  def run(weight, x):
    variables = {**own, "params": {**own["params"], name: weight}}
    return clone.apply(variables, x, *rest, method=method, **kwargs)

  if not layers.is_quantized(slot.weight):
    return lambda x: run(slot.weight, x)
  # dequantize inside the checkpoint: the backward pass recomputes it, no copy is kept
  deq = jax.checkpoint(lambda q, x: run(q.dequantize(), x),
                       policy=jax.checkpoint_policies.nothing_saveable)
  return lambda x: deq(slot.weight, x)


def _call(module: nn.Module, cls: type, method: str, slot: Slot, args, kwargs) -> layers.LayerCall:
  name = SUPPORTED[cls][0]
  x, rest, kw = _input(args, kwargs, method)
  base = _base_fn(module, method, name, slot, rest, kw)
  common = dict(x=x, base=base, path=slot.path, dtype=getattr(module, "dtype", None),
                precision=getattr(module, "precision", None))
  if cls is nn.Embed:
    return layers.LayerCall(kind="attend" if method == "attend" else "embed", **common)
  bias = _bias(module)
  wnd = slot.weight.ndim
  if cls is nn.Dense:
    return layers.LayerCall(kind="dense", spec=layers.dense_spec(x.ndim), bias=bias,
                            layer_kind="dense", **common)
  if cls is nn.DenseGeneral:
    feats = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
    spec = layers.dense_general_spec(x.ndim, module.axis, len(feats), module.batch_dims, slot.path)
    return layers.LayerCall(kind="dense", spec=spec, bias=bias, layer_kind="dense", **common)
  if cls is nn.Einsum:
    eq = module.einsum_str or (rest[0] if rest else kw.get("einsum_str"))
    spec = layers.einsum_spec(eq, x.ndim, wnd, slot.path)
    return layers.LayerCall(kind="dense", spec=spec, bias=bias, layer_kind="einsum", **common)
  return layers.LayerCall(kind="conv", conv_r=_conv_r(module, cls, slot.path), bias=bias,
                          layer_kind="conv", **common)


def _bias(module: nn.Module):
  b = module.scope.get_variable("params", "bias") if module.scope.has_variable("params", "bias") \
      else None
  return meta.unbox(b) if b is not None else None


def _conv_r(module: nn.Module, cls: type, path: str) -> Callable:
  """The layer's own convolution to ``r`` channels with ``a`` as the kernel."""
  if getattr(module, "feature_group_count", 1) != 1:
    raise ValueError(f"{path}: a grouped convolution (feature_group_count="
                     f"{module.feature_group_count}) cannot take a LoRA; exclude the layer")
  if module.mask is not None:
    raise ValueError(f"{path}: a masked convolution cannot take a LoRA; exclude the layer")
  if cls is nn.ConvTranspose and module.transpose_kernel:
    raise ValueError(f"{path}: ConvTranspose(transpose_kernel=True) cannot take a LoRA")

  def conv_r(x, a):
    clone = module.clone(parent=None, features=a.shape[-1], use_bias=False, dtype=a.dtype)
    return clone.apply({"params": {"kernel": a}}, x)
  return conv_r


class Interceptor:
  """The method interceptor: adds adapters, or records layers while tracing.

  Attributes:
    seen: paths of the slots a supported layer has used.
    record: when a dict, tracing mode: ``{path: LayerInfo | (kind, error)}`` is
      filled for every supported layer call (the plain weight's path is its
      scope path) and no low-rank term is added.
    stored_ndim: ``{path: ndim}`` of the stored weights (tracing mode).
  """

  def __init__(self, record: dict | None = None, stored_ndim: Mapping[str, int] | None = None):
    self.seen: set[str] = set()
    self.record = record
    self.stored_ndim = dict(stored_ndim or {})

  def __call__(self, next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    found = _supported(module, method)
    if found is None:
      _check_no_slot(module, method)
      return next_fun(*args, **kwargs)
    cls, name = found
    slot = _slot(module, name)
    if slot is None:
      if self.record is not None and method != "setup":
        self._record_plain(module, cls, name, method, args, kwargs)
      return next_fun(*args, **kwargs)
    if method == "setup":    # Embed: the slot stands in for `self.embedding`
      return None
    self.seen.add(slot.path)
    if self.record is not None:
      self._record(module, cls, method, slot, args, kwargs)
    call = _call(module, cls, method, slot, args, kwargs)
    rate = slot.lora.dropout if slot.lora is not None else 0.0
    key = module.make_rng("dropout") if rate > 0 and module.scope.has_rng("dropout") else None
    return layers.forward(call, slot.lora, slot.weight, key)

  def _record_plain(self, module, cls, name, method, args, kwargs):
    if module.scope is None or not module.scope.has_variable("params", name):
      return
    weight = meta.unbox(module.scope.get_variable("params", name))
    path = paths.SEP.join((*module.scope.path, name))
    if path in self.stored_ndim:
      self._record(module, cls, method, Slot(weight, None, path), args, kwargs)

  def _record(self, module, cls, method, slot, args, kwargs):
    try:
      call = _call(module, cls, method, slot, args, kwargs)
      info = layers.layer_info(call, slot.weight.ndim, self.stored_ndim[slot.path])
    except ValueError as e:
      self.record[slot.path] = (KINDS[cls], str(e))
      return
    old = self.record.get(slot.path)
    if isinstance(old, L.LayerInfo) and old != info:
      self.record[slot.path] = (info.kind, f"{slot.path}: the weight is used by two layers in "
                                           f"different ways ({old} and {info})")
    elif old is None:
      self.record[slot.path] = info


def inject(params: Any, slots: Mapping[str, L.LoRA | None]) -> Any:
  """``params`` with a :class:`Slot` at each path of ``slots``."""
  return paths.map_with_path(
      lambda p, w: Slot(w, slots[p], p) if p in slots else w, params)


def check_seen(wanted, seen, what: str) -> None:
  missing = sorted(set(wanted) - set(seen))
  if missing:
    raise ValueError(
        f"{what} at {missing} {'was' if len(missing) == 1 else 'were'} not used by a supported "
        "layer (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose, nn.Embed and "
        "its attend) while the model ran: the weight is read by other code, or the method "
        "called does not use it")


def apply(model: nn.Module, variables: Mapping, adapter: Any, *args, rngs=None,
          method=None, mutable=False, **kwargs):
  """``model.apply(variables, *args, ...)`` with ``adapter`` added (Linen); see
  :func:`jlora.apply`."""
  if "params" not in variables:
    raise ValueError(f"variables must hold a 'params' collection; got {list(variables)}")
  cols = [mutable] if isinstance(mutable, str) else mutable
  if cols is True or (isinstance(cols, (list, tuple)) and "params" in cols):
    raise ValueError("jlora.apply: the 'params' collection cannot be mutable")
  params = variables["params"]
  flat = paths.flatten(params)
  slots = layers.adapter_slots(flat, adapter, "the params tree")
  run_vars = {**variables, "params": inject(params, slots)}
  icpt = Interceptor()
  with nn.intercept_methods(icpt):
    out = model.apply(run_vars, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
  check_seen(slots, icpt.seen, "the adapted or quantized weight")
  return out


def trace(model: nn.Module, params: Any, args, kwargs=None, *, collections=None,
          method=None) -> dict[str, Any]:
  """Traces ``model.apply`` abstractly (``jax.eval_shape``) and returns, for each
  weight a supported layer uses, its :class:`~jlora.lora.LayerInfo` (or
  ``(kind, error message)`` where LoRA cannot fit). Quantized weights are
  placed in slots (so the layers dequantize them); the others are read in place."""
  flat = paths.flatten(params)
  record: dict[str, Any] = {}
  icpt = Interceptor(record, {p: len(w.shape) for p, w in flat.items() if len(w.shape) >= 2})
  run_params = inject(params, {p: None for p, w in flat.items() if layers.is_quantized(w)})

  leaves, tree = jax.tree.flatten((tuple(args), dict(kwargs or {})))
  dynamic = [isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for v in leaves]

  def run(p, dyn):
    it = iter(dyn)
    a, kw = jax.tree.unflatten(tree, [next(it) if d else v for v, d in zip(leaves, dynamic)])
    with nn.intercept_methods(icpt):
      return model.apply({**(collections or {}), "params": p}, *a, method=method, **kw)
  jax.eval_shape(run, run_params, [v for v, d in zip(leaves, dynamic) if d])
  return record
