"""``flax.nnx`` models with adapters: a functional form and a stateful one.

Both go through ``nnx.split`` / ``nnx.merge`` and the same transformation as
every other model (:func:`jlora.transform.adapt`); no layer is wrapped or
replaced. The model's own state other than its parameters (RNG counters,
batch statistics, caches) goes in and comes back out:

- :func:`apply` (``jlora.apply`` for NNX) runs ``model(*args)`` with the
  adapter and writes the state changes back into ``model``, as calling the
  model does; ``mutable=True`` returns them instead (for ``jax.jit``).
- :func:`with_adapter` returns an ``nnx.Module`` holding the model and the
  adapter as :class:`LoRAParam` variables, for ``nnx.Optimizer(...,
  wrt=LoRAParam)``, ``nnx.jit`` and ``nnx.grad``; :func:`adapter_of` reads the
  adapter back.

Adapters use the paths of ``nnx.state(model)`` (``"up_proj/kernel"``).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora import lora as L
from jlora import paths
from jlora.errors import AdapterError
from jlora.transform import adapt

LoRAParam = nnx.LoRAParam


def _overlay(full: Any, given: Any) -> Any:
  flat = paths.flatten(given)
  known = set(paths.flatten(full))
  unknown = sorted(set(flat) - known)
  if unknown:
    raise AdapterError(f"state paths {unknown[:4]} are not in the model (it has e.g. "
                       f"{sorted(known)[:4]})")
  return paths.map_with_path(lambda p, v: flat.get(p, v), full)


def pure(model: nnx.Module, state: Any = None):
  """``(fn, params, rest)`` for an NNX model, with ``fn(params, rest, *args, **kwargs)
  -> (out, new_rest)`` a pure function.

  ``params`` is the model's ``nnx.Param`` state with ``state``'s values laid
  over it (e.g. quantized weights); ``rest`` is everything else (RNG keys
  and counters, batch statistics) and ``new_rest`` its value after the call.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if state is not None:
    given = paths.flatten(state)
    in_params = {p: v for p, v in given.items() if p in set(paths.flatten(params))}
    params = _overlay(params, paths.unflatten(in_params)) if in_params else params
    others = {p: v for p, v in given.items() if p not in in_params}
    rest = _overlay(rest, paths.unflatten(others)) if others else rest

  def fn(p, r, *args, **kwargs):
    m = nnx.merge(graphdef, p, r)
    out = m(*args, **kwargs)
    return out, nnx.state(m, nnx.Not(nnx.Param))
  return fn, params, rest


def apply(model: nnx.Module, state: Any, adapter: Any, *args, dropout_rng=None,
          mutable: bool = False, **kwargs):
  """``model(*args, **kwargs)`` with ``adapter``; ``jlora.apply`` for NNX models.

  Args:
    model: the ``nnx.Module`` (not changed, except for its own non-parameter
      state, as a call changes it).
    state: an ``nnx.State`` (or nested dict) of values to use instead of the
      model's (a quantized or merged parameter state), or None.
    adapter: the adapter tree (paths of ``nnx.state(model)``) or None.
    *args, **kwargs: the model's call arguments (``rngs=`` included).
    dropout_rng: a PRNG key for LoRA dropout.
    mutable: return ``(out, new_state)`` (the non-parameter state after the
      call) instead of writing it into ``model``; use it inside ``jax.jit``.

  Returns:
    The model's output, or ``(output, new_state)`` with ``mutable``.

  Example:
    >>> import jlora
    >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> ad = jlora.init_adapter(jax.random.key(1), nnx.state(model, nnx.Param),
    ...                         jlora.LoraConfig(rank=2, targets=".*"))
    >>> apply(model, None, ad, jnp.ones((2, 16))).shape
    (2, 8)
  """
  fn, params, rest = pure(model, state)
  out, new_rest = adapt(fn, params, adapter, dropout_rng=dropout_rng)(rest, *args, **kwargs)
  if mutable:
    return out, new_rest
  old = paths.flatten(rest)
  changed = {p: v for p, v in paths.flatten(new_rest).items() if v is not old.get(p)}
  if changed:
    if any(isinstance(v, jax.core.Tracer) for v in changed.values()) and not any(
        isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(rest)):
      raise AdapterError(
          f"jlora.apply: the call changed the model's state at {sorted(changed)[:3]} (RNG "
          "counters, batch statistics) inside a JAX transformation that does not own the "
          "model; use nnx.jit / nnx.grad with the model as an argument, or mutable=True and "
          "keep the returned state")
    nnx.update(model, paths.unflatten(changed) if not isinstance(new_rest, nnx.State)
               else _subset(new_rest, changed))
  return out


def _subset(state: nnx.State, changed: dict) -> nnx.State:
  flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else None
  if flat is None:
    return state
  keep = [(k, v) for k, v in flat if paths.SEP.join(map(str, k)) in changed]
  return nnx.from_flat_state(keep)


class _Factors(nnx.Module):
  """One weight's LoRA factors as :class:`LoRAParam` variables (its metadata static)."""

  def __init__(self, lora: L.LoRA):
    self.a = LoRAParam(lora.a)
    self.b = LoRAParam(lora.b)
    self.magnitude = None if lora.magnitude is None else LoRAParam(lora.magnitude)
    self.meta = lora.replace(a=None, b=None, magnitude=None)

  def lora(self) -> L.LoRA:
    mag = None if self.magnitude is None else self.magnitude.get_value()
    return self.meta.replace(a=self.a.get_value(), b=self.b.get_value(), magnitude=mag)


class LoRAModel(nnx.Module):
  """An NNX model and its adapter, trained as one stateful module.

  Attributes:
    model: the base model (a structural copy of the one given; the arrays
      are shared, not copied).
    factors: one :class:`_Factors` per adapted weight, in ``paths`` order.
    paths: the adapted weights' paths in the model's state (static).
    rngs: an ``nnx.Rngs`` with a ``lora_dropout`` stream, or None.
  """

  def __init__(self, model: nnx.Module, adapter: Any, *, state: Any = None, dropout_rng=None):
    from jlora.adapter import loras
    self.model = nnx.merge(*nnx.split(model))
    if state is not None:
      nnx.update(self.model, state)
    found = loras(adapter)
    self.paths = tuple(found)
    self.factors = nnx.List([_Factors(found[p]) for p in self.paths])
    self.rngs = None if dropout_rng is None else nnx.Rngs(lora_dropout=dropout_rng)

  def adapter(self) -> dict:
    return paths.unflatten({p: f.lora() for p, f in zip(self.paths, self.factors)})

  def __call__(self, *args, **kwargs):
    key = None if self.rngs is None else self.rngs.lora_dropout()
    return apply(self.model, None, self.adapter(), *args, dropout_rng=key, **kwargs)


def with_adapter(model: nnx.Module, adapter: Any, *, state: Any = None,
                 dropout_rng=None) -> LoRAModel:
  """The stateful form: ``model`` and ``adapter`` in one :class:`LoRAModel`.

  Train it with ``nnx.Optimizer(wrapped, tx, wrt=LoRAParam)`` (any optax
  optimizer) and ``nnx.grad(..., argnums=nnx.DiffState(0, LoRAParam))``;
  the model's own state (dropout RNGs, batch statistics) advances as it runs.

  Args:
    model: an ``nnx.Module``.
    adapter: the adapter tree (paths as in ``nnx.state(model)``).
    state: optional values to lay over the model's (e.g. a quantized state).
    dropout_rng: a PRNG key seeding LoRA dropout (a new mask every call).

  Example:
    >>> import jlora, optax
    >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> ad = jlora.init_adapter(jax.random.key(1), nnx.state(model, nnx.Param),
    ...                         jlora.LoraConfig(rank=2, targets=".*"))
    >>> wrapped = with_adapter(model, ad)
    >>> opt = nnx.Optimizer(wrapped, optax.adamw(1e-3), wrt=LoRAParam)
    >>> wrapped(jnp.ones((2, 16))).shape
    (2, 8)
  """
  return LoRAModel(model, adapter, state=state, dropout_rng=dropout_rng)


def adapter_of(model: LoRAModel) -> dict:
  """The adapter tree held by a :class:`LoRAModel` (the model's own paths).

  Example:
    >>> import jlora
    >>> model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> ad = jlora.init_adapter(jax.random.key(1), nnx.state(model, nnx.Param),
    ...                         jlora.LoraConfig(rank=2, targets=".*"))
    >>> adapter_of(with_adapter(model, ad))["kernel"].a.shape
    (16, 2)
  """
  if not isinstance(model, LoRAModel):
    raise AdapterError(f"adapter_of: expected a jlora LoRAModel (from with_adapter), got "
                       f"{type(model).__name__}")
  return model.adapter()


def from_flax_lora(model: nnx.Module) -> tuple[dict, nnx.State]:
  """Reads the LoRA weights of ``nnx.LoRALinear`` / ``nnx.LoRA`` layers into a jlora adapter.

  flax's LoRA adds ``x @ lora_a @ lora_b`` (scale 1) to its base layer; the
  adapter holds ``a = lora_a``, ``b = lora_b`` with ``alpha = rank`` at the
  base ``kernel``'s path. Also returned: the model's state with every flax
  ``lora_b`` set to zero, so that ``jlora.apply(model, state, adapter, x)``
  equals ``model(x)`` (the flax LoRA then adds nothing).

  Raises:
    AdapterError: the model has no flax LoRA layer, or one whose base is not
      an ``nnx.Linear`` kernel (then adapt the model with jlora directly).

  Example:
    >>> layer = nnx.LoRALinear(4, 6, lora_rank=2, rngs=nnx.Rngs(0))
    >>> ad, state = from_flax_lora(layer)
    >>> ad["kernel"].a.shape, ad["kernel"].scale
    ((4, 2), 1.0)
  """
  found, zeroed = {}, []
  for parts, m in nnx.iter_modules(model):
    if not isinstance(m, nnx.LoRA):
      continue
    prefix = paths.SEP.join(map(str, parts))
    owner_path = prefix.rpartition(paths.SEP)[0] if isinstance(m, nnx.LoRA) else prefix
    base = m.base_module
    a, b = m.lora_a.get_value(), m.lora_b.get_value()
    if isinstance(model, nnx.LoRALinear) or isinstance(_parent(model, parts), nnx.LoRALinear):
      kernel_path = (owner_path + paths.SEP if owner_path else "") + "kernel"
    elif isinstance(base, nnx.Linear):
      kernel_path = prefix + paths.SEP + "base_module" + paths.SEP + "kernel"
    else:
      raise AdapterError(f"{prefix!r}: an nnx.LoRA whose base is a {type(base).__name__}, "
                         "not an nnx.Linear; adapt that layer with jlora.init_adapter instead")
    found[kernel_path] = L.LoRA(a=jnp.asarray(a), b=jnp.asarray(b), alpha=float(a.shape[-1]))
    zeroed.append(prefix + paths.SEP + "lora_b")
  if not found:
    raise AdapterError("from_flax_lora: the model has no nnx.LoRA / nnx.LoRALinear layer")
  state = paths.map_with_path(lambda p, v: jnp.zeros_like(v) if p in zeroed else v,
                              nnx.state(model))
  return paths.unflatten(found), state


def _parent(root, parts):
  obj = root
  for part in parts[:-1]:
    obj = obj[part] if isinstance(obj, (nnx.List, nnx.Dict, list, dict)) else getattr(obj, part)
  return obj
