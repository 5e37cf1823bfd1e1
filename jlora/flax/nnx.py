"""Running ``flax.nnx`` models with adapters, by module surgery on a copy.

:func:`with_adapter` returns a new model (the user's model is not touched:
its graph is split and merged into a copy) in which each adapted layer is
wrapped by a :class:`LoRALayer` holding the layer and a :class:`LoRAParam`
(flax's ``nnx.LoRAParam``) with the :class:`~jlora.lora.LoRA` node. Train that
state alone (``nnx.Optimizer(model, tx, wrt=LoRAParam)``, ``nnx.DiffState``)
and read it back with :func:`adapter_of`. :func:`apply` is the functional
form behind ``jlora.apply``: copy, wrap, call.

Inside the wrapped model the base weight's state path gains a ``base`` step
(``layers/q/kernel`` becomes ``layers/q/base/kernel``); adapters and
:func:`adapter_of` always use the original paths.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jlora import lora as L
from jlora import paths
from jlora.flax import layers

LoRAParam = nnx.LoRAParam

SUPPORTED: dict[type, tuple[str, str]] = {
    nnx.Linear: ("kernel", "dense"),
    nnx.LinearGeneral: ("kernel", "dense"),
    nnx.Einsum: ("kernel", "einsum"),
    nnx.Conv: ("kernel", "conv"),
    nnx.Embed: ("embedding", "embed"),
}


class LoRARng(nnx.Variable):
  """PRNG keys for LoRA dropout, one per stacked layer (``[*stack]``)."""


_active = threading.local()


def _supported(module) -> type | None:
  for cls in SUPPORTED:
    if isinstance(module, cls) and type(module).__call__ is cls.__call__:
      return cls
  return None


class LoRALayer(nnx.Module):
  """A standard NNX layer with its adapter: ``base(x) + scale · (x·a)·b``.

  Attributes:
    base: the wrapped layer (``nnx.Linear``, ``LinearGeneral``, ``Einsum``,
      ``Conv`` or ``Embed``), unchanged; its weight may be a ``QArray``.
    lora: a :class:`LoRAParam` holding the LoRA node, or None.
    rng: a :class:`LoRARng` of dropout keys, or None (no dropout).
    path: the weight's path in the original model (static).
  """

  def __init__(self, base: nnx.Module, lora: L.LoRA | None, path: str, keys=None):
    self.base = base
    self.lora = LoRAParam(lora) if lora is not None else None
    self.rng = LoRARng(keys) if keys is not None else None
    self.path = path

  def __call__(self, *args, **kwargs):
    return self._run("__call__", args, kwargs)

  def attend(self, query):
    """``Embed.attend`` with the adapter."""
    return self._run("attend", (query,), {})

  def _run(self, method, args, kwargs):
    seen = getattr(_active, "seen", None)
    if seen is not None:
      seen.add(self.path)
    cls = _supported(self.base)
    weight = getattr(self.base, SUPPORTED[cls][0]).get_value()
    call = _call(self.base, cls, method, weight, self.path, args, kwargs)
    lora = self.lora.get_value() if self.lora is not None else None
    key = None
    if self.rng is not None:
      key = self.rng.get_value()
      key = key.reshape(-1)[0] if key.ndim else key
    return layers.forward(call, lora, weight, key)


def _base_fn(base, method, name, weight, rest, kwargs):
  if not layers.is_quantized(weight):
    return lambda x: getattr(base, method)(x, *rest, **kwargs)
  graphdef, state = nnx.split(base)

  def run(q, x):   # dequantized inside the checkpoint: recomputed, never stored
    st = paths.map_with_path(lambda p, v: q.dequantize() if p == name else v, state)
    return getattr(nnx.merge(graphdef, st), method)(x, *rest, **kwargs)
  deq = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
  return lambda x: deq(weight, x)


def _call(base, cls, method, weight, path, args, kwargs) -> layers.LayerCall:
  x, rest = args[0], args[1:]
  common = dict(x=x, base=_base_fn(base, method, SUPPORTED[cls][0], weight, rest, kwargs),
                path=path, dtype=getattr(base, "dtype", None),
                precision=getattr(base, "precision", None), layer_kind=SUPPORTED[cls][1])
  if cls is nnx.Embed:
    return layers.LayerCall(kind="attend" if method == "attend" else "embed", **common)
  bias = base.bias.get_value() if base.bias is not None else None
  if cls is nnx.Linear:
    return layers.LayerCall(kind="dense", spec=layers.dense_spec(x.ndim), bias=bias, **common)
  if cls is nnx.LinearGeneral:
    spec = layers.dense_general_spec(x.ndim, base.axis, len(base.out_features),
                                     tuple(base.batch_axis), path)
    return layers.LayerCall(kind="dense", spec=spec, bias=bias, **common)
  if cls is nnx.Einsum:
    eq = (rest[0] if rest else None) or kwargs.get("einsum_str") or base.einsum_str
    spec = layers.einsum_spec(eq, x.ndim, weight.ndim, path)
    return layers.LayerCall(kind="dense", spec=spec, bias=bias, **common)
  return layers.LayerCall(kind="conv", conv_r=_conv_r(base, path), bias=bias, **common)


def _conv_problem(base) -> str | None:
  if base.feature_group_count != 1:
    return f"a grouped convolution (feature_group_count={base.feature_group_count})"
  if base.mask is not None:
    return "a masked convolution"
  return None


def _conv_r(base, path):
  problem = _conv_problem(base)
  if problem:
    raise ValueError(f"{path}: {problem} cannot take a LoRA; exclude the layer")

  def conv_r(x, a):   # the same convolution to r channels (flax's Linen Conv, same options)
    conv = nn.Conv(features=a.shape[-1], kernel_size=tuple(base.kernel_size),
                   strides=base.strides, padding=base.padding,
                   input_dilation=base.input_dilation, kernel_dilation=base.kernel_dilation,
                   use_bias=False, dtype=a.dtype, precision=base.precision)
    return conv.apply({"params": {"kernel": a}}, x)
  return conv_r


def _overlay(full: Any, state: Any) -> Any:
  given = paths.flatten(state)
  known = paths.flatten(full)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"state paths {unknown[:4]} are not in the model (it has e.g. "
                     f"{list(known)[:4]})")
  return paths.map_with_path(lambda p, v: given.get(p, v), full)


def _find(root, module_path: str):
  obj = root
  for part in module_path.split(paths.SEP) if module_path else ():
    obj = obj[int(part)] if isinstance(obj, (nnx.List, list, tuple)) else (
        obj[part] if isinstance(obj, (nnx.Dict, dict)) else getattr(obj, part))
  return obj


def _replace(root, old, new) -> None:
  refs = [(m, name) for _, m in nnx.iter_modules(root) if not isinstance(m, LoRALayer)
          for name, child in nnx.iter_children(m) if child is old]
  for m, name in refs:
    if isinstance(m, nnx.List):
      m[int(name)] = new
    elif isinstance(m, nnx.Dict):
      m[name] = new
    else:
      setattr(m, name, new)


def _dropout_keys(rngs, lora: L.LoRA, path: str):
  if rngs is None or lora is None or lora.dropout == 0.0:
    return None
  key = rngs["dropout"] if isinstance(rngs, dict) else rngs
  key = jax.random.fold_in(key, _path_seed(path))
  stack = lora.stack_dims
  return jax.random.split(key, max(1, int(_prod(stack)))).reshape(stack) if stack else key


def _prod(xs):
  out = 1
  for v in xs:
    out *= v
  return out


def _path_seed(path: str) -> int:
  return sum((i + 1) * ord(c) for i, c in enumerate(path)) % (2**31 - 1)


def with_adapter(model: nnx.Module, adapter: Any, *, state: Any = None, rngs=None) -> nnx.Module:
  """A copy of ``model`` whose adapted layers run with ``adapter`` (the model is unchanged).

  Args:
    model: an ``nnx.Module`` built from standard layers.
    adapter: the adapter tree (paths as in ``nnx.state(model)``) or None.
    state: optional ``nnx.State`` (or nested dict) overriding some of the
      model's values, e.g. a quantized or merged params state.
    rngs: a PRNG key or ``{"dropout": key}`` for LoRA dropout; without it there
      is none.

  Returns:
    The wrapped copy; its adapter state is of type :class:`LoRAParam`.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, jlora
    >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> ad = jlora.init_adapter(jax.random.key(1), nnx.state(model),
    ...                         jlora.LoraConfig(rank=2, targets=".*"))
    >>> wrapped = with_adapter(model, ad)
    >>> wrapped(jnp.ones((2, 16))).shape
    (2, 8)
  """
  graphdef, full = nnx.split(model)
  if state is not None:
    full = _overlay(full, state)
  targets = layers.adapter_slots(paths.flatten(full), adapter, "the model's state")
  copy = nnx.merge(graphdef, full, copy=True)
  for p, lo in targets.items():
    mod_path, _, leaf = p.rpartition(paths.SEP)
    owner = _find(copy, mod_path)
    cls = _supported(owner)
    if cls is None or SUPPORTED[cls][0] != leaf:
      raise ValueError(f"{p!r} belongs to a {type(owner).__name__}, not a supported layer "
                       "(nnx.Linear, LinearGeneral, Einsum, Conv, Embed)")
    wrapper = LoRALayer(owner, lo, p, _dropout_keys(rngs, lo, p))
    if owner is copy:
      copy = wrapper
    else:
      _replace(copy, owner, wrapper)
  return copy


def adapter_of(model: nnx.Module) -> dict:
  """The adapter tree held by a model from :func:`with_adapter` (original paths).

  Example:
    >>> from flax import nnx
    >>> import jlora
    >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> ad = jlora.init_adapter(jax.random.key(1), nnx.state(model),
    ...                         jlora.LoraConfig(rank=2, targets=".*"))
    >>> adapter_of(with_adapter(model, ad))["kernel"].a.shape
    (16, 2)
  """
  found = {m.path: m.lora.get_value() for _, m in nnx.iter_modules(model)
           if isinstance(m, LoRALayer) and m.lora is not None}
  return paths.unflatten(found)


@contextlib.contextmanager
def _seen():
  prev = getattr(_active, "seen", None)
  _active.seen = set()
  try:
    yield _active.seen
  finally:
    _active.seen = prev


def apply(model: nnx.Module, state: Any, adapter: Any, *args, rngs=None, **kwargs):
  """Calls ``model(*args, **kwargs)`` with ``adapter`` on a wrapped copy (see
  :func:`with_adapter`); ``jlora.apply`` for NNX models. State updates the
  model makes while running (batch statistics, rng counters) stay in the copy.
  """
  from jlora import adapter as adapter_mod
  wrapped = with_adapter(model, adapter, state=state, rngs=rngs)
  with _seen() as seen:
    out = wrapped(*args, **kwargs)
  wanted = set(adapter_mod.loras(adapter)) if adapter is not None else set()
  missing = sorted(wanted - seen)
  if missing:
    raise ValueError(f"the adapted weight at {missing} was not used by its layer while the "
                     "model ran (the layer is not called, or its weight is read directly)")
  return out


def learn_layers(model: nnx.Module, state: Any = None) -> dict[str, Any]:
  """``{path: LayerInfo | (kind, error)}`` for the standard layers of an NNX model,
  read from the layer objects (stack = stored kernel rank - the layer's own)."""
  stored = paths.flatten(state) if state is not None else {}
  out: dict[str, Any] = {}
  for parts, m in nnx.iter_modules(model):
    cls = _supported(m)
    if cls is None:
      continue
    name, kind = SUPPORTED[cls]
    p = paths.SEP.join([*map(str, parts), name])
    w = stored.get(p, getattr(m, name).get_value())
    out[p] = _info(m, cls, kind, len(w.shape), p)
  return out


def _info(m, cls, kind, ndim, path):
  if cls is nnx.LinearGeneral:
    if m.batch_axis:
      return kind, f"{path}: LinearGeneral with batch_axis cannot take a LoRA; exclude it"
    n_in = len(m.in_features)
    n = n_in + len(m.out_features)
    return L.LayerInfo(kind, tuple(range(n_in)), tuple(range(n_in, n)), ndim - n)
  if cls is nnx.Einsum:
    eq = m.einsum_str
    ks = eq.replace(" ", "").partition("->")[0].partition(",")[2] if eq else "..."
    if "..." in ks:
      return kind, f"{path}: set einsum_str (without '...' in the kernel) to adapt this Einsum"
    try:
      xs = eq.replace(" ", "").partition(",")[0].replace("...", "")
      spec = layers.einsum_spec(eq.replace("...", ""), len(xs), len(ks), path)
    except ValueError as e:
      return kind, str(e)
    return L.LayerInfo(kind, spec.in_axes, spec.out_axes, ndim - len(ks))
  if cls is nnx.Conv:
    problem = _conv_problem(m)
    if problem:
      return kind, f"{path}: {problem} cannot take a LoRA; exclude it"
    n = len(m.kernel_shape)
    return L.LayerInfo(kind, tuple(range(n - 1)), (n - 1,), ndim - n)
  return L.LayerInfo(kind, (0,), (1,), ndim - 2)
