"""Adapting a function of a parameter tree, and learning how it uses its weights.

``adapt(fn, params, adapter)(*args)`` traces ``fn(params, *args)`` to a
jaxpr with the base parameters as inputs and evaluates it with every adapted
(or quantized) leaf carried as a :class:`~jlora.transform.weight.Weight`, so
each use of the weight gets its low-rank term (see ``interpret.py``).
``learn(fn, params, args)`` runs the same interpreter abstractly
(``jax.eval_shape``: no FLOPs) and records every use of every weight.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

from jlora import lora as L
from jlora import paths
from jlora.errors import AdapterError
from jlora.transform import interpret, rules
from jlora.transform import weight as W


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or \
      isinstance(x, jax.core.Tracer)


def _stand_in(x):
  """What ``fn`` sees in place of a base leaf while it is traced: its abstract value.

  Inside ``shard_map`` a quantized leaf whose codes vary over manual axes
  (a pipeline stage's own layers) gets a stand-in of that type too, so the
  traced function does not cast it as if it were replicated; the stand-in's
  value is never used (XLA drops it).
  """
  if not W.is_quantized(x):
    return x
  varying = _varying_axes(x.codes)
  if not varying:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
  return jax.lax.pcast(jax.numpy.zeros(tuple(x.shape), x.dtype), tuple(sorted(varying)),
                       to="varying")


def _varying_axes(x) -> frozenset:
  """The shard_map axes a traced value varies over (empty outside ``shard_map``)."""
  if not isinstance(x, jax.core.Tracer):
    return frozenset()
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:   # jax 0.10 keeps them in manual_axis_type
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma or ())


def _loras(adapter) -> dict[str, L.LoRA]:
  from jlora.adapter import loras
  return loras(adapter) if adapter is not None else {}


def _check_fits(shape, node, path):
  from jlora.adapter import _check_fits as check
  check(shape, node, path)


def slots(flat: Mapping[str, Any], adapter: Any, where: str = "the params tree"):
  """``{path: LoRA or None}``: each adapted leaf of ``flat`` and each quantized one.

  Raises an AdapterError naming the path when an adapter path is not in
  ``flat`` or its LoRA does not fit the weight.
  """
  ads = _loras(adapter)
  for p, lo in ads.items():
    if p not in flat:
      some = ", ".join(list(flat)[:4])
      raise AdapterError(f"adapter path {p!r} is not in {where} (it has e.g. {some})")
    _check_fits(tuple(flat[p].shape), lo, p)
  out: dict[str, L.LoRA | None] = {p: None for p, w in flat.items() if W.is_quantized(w)}
  out.update(ads)
  return out


class _Traced:
  """``fn(params, *args, **kwargs)`` traced with stand-ins for the chosen leaves."""

  def __init__(self, fn: Callable, params: Any, args, kwargs, chosen):
    self.params = params
    p_tree = paths.map_with_path(lambda p, w: _stand_in(w) if p in chosen else w, params)
    leaves_kp, self.p_def = jax.tree_util.tree_flatten_with_path(p_tree)
    self.p_paths = [paths.path_str(kp) for kp, _ in leaves_kp]
    p_leaves = [x for _, x in leaves_kp]
    self.p_dyn = [_is_dynamic(x) for x in p_leaves]
    self.p_static = p_leaves
    a_leaves, self.a_def = jax.tree.flatten((tuple(args), dict(kwargs or {})))
    self.a_dyn = [_is_dynamic(x) for x in a_leaves]
    self.a_static = a_leaves

    def flat_fn(p_in, a_in):
      p_it, a_it = iter(p_in), iter(a_in)
      p = [next(p_it) if d else x for x, d in zip(self.p_static, self.p_dyn)]
      a = [next(a_it) if d else x for x, d in zip(self.a_static, self.a_dyn)]
      fargs, fkwargs = jax.tree.unflatten(self.a_def, a)
      return fn(jax.tree.unflatten(self.p_def, p), *fargs, **fkwargs)

    p_in = [x for x, d in zip(p_leaves, self.p_dyn) if d]
    a_in = [x for x, d in zip(a_leaves, self.a_dyn) if d]
    self.closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(p_in, a_in)
    self.out_def = jax.tree.structure(out_shape)
    self.dyn_paths = [p for p, d in zip(self.p_paths, self.p_dyn) if d]
    self.a_in = a_in

  def run(self, p_values: list, a_values: list):
    outs = interpret.run(self.closed.jaxpr, self.closed.consts, [*p_values, *a_values])
    return jax.tree.unflatten(self.out_def, [W.materialize(o) for o in outs])


def adapt(fn: Callable, params: Any, adapter: Any = None, *,
          dropout_rng: jax.Array | None = None) -> Callable:
  """``fn`` with ``adapter`` added to every use of each adapted weight, unmerged.

  ``fn(params, *args, **kwargs)`` is any JAX function of a parameter tree:
  a Flax ``apply``, an Equinox model call, plain ``jnp`` code. The returned
  function takes ``*args, **kwargs`` and returns what ``fn`` returns, with
  each matmul on an adapted weight computed as ``x·W + s·(x·a)·b`` (see
  :mod:`jlora.transform`); ``params`` may hold quantized ``QArray`` leaves,
  which ``fn`` sees as arrays, dequantized where they are used.

  Args:
    fn: ``fn(params, *args, **kwargs)``.
    params: the base parameter tree.
    adapter: the adapter tree (``LoRA`` nodes at weight paths) or None.
    dropout_rng: a PRNG key for LoRA dropout (``LoraConfig.dropout``); none
      without it.

  Returns:
    A function of ``fn``'s remaining arguments.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((16, 8))}
    >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
    >>> ad = jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(rank=2),
    ...                         model=fn, args=(jnp.ones((4, 16)),))
    >>> adapt(fn, params, ad)(jnp.ones((4, 16))).shape
    (4, 8)
  """
  flat = paths.flatten(params)
  chosen = slots(flat, adapter)

  def call(*args, **kwargs):
    traced = _Traced(fn, params, args, kwargs, chosen)
    values = []
    for p, x in zip(traced.p_paths, traced.p_static):
      if p in chosen:
        key = None
        if dropout_rng is not None and chosen[p] is not None and chosen[p].dropout > 0:
          key = jax.random.fold_in(dropout_rng, paths.path_seed(p))
        x = W.create(flat[p], chosen[p], p, key)
      values.append(x)
    p_vals = [v for v, d in zip(values, traced.p_dyn) if d]
    with interpret.counting():
      return traced.run(p_vals, traced.a_in)
  return call


def learn(fn: Callable, params: Any, args=(), kwargs: Mapping | None = None,
          candidates=None) -> dict[str, list[dict]]:
  """Every use of each weight (leaves of two or more axes) when ``fn(params, *args)`` runs.

  Traced abstractly: no FLOPs, no memory for activations. Each use is a dict
  with ``op`` ("dot", "conv", "gather" or a primitive's name), the stored axes
  the op ``contract``\\ s, keeps (``free``) and batches over (``batch``), and
  the stored axes ``dropped`` by slicing before it (a scanned layer stack).
  """
  flat = paths.flatten(params)
  if candidates is None:
    candidates = [p for p, w in flat.items() if len(getattr(w, "shape", ())) >= 2]
  candidates = set(candidates)
  traced = _Traced(fn, params, args, kwargs, candidates)
  uses: dict[str, list[dict]] = {p: [] for p in flat if p in candidates}   # params order

  def note(w, use):
    uses[w.path].append(use)

  def go(p_vals, a_vals):
    vals = [W.probe(v, p) if p in candidates else v for p, v in zip(traced.dyn_paths, p_vals)]
    with interpret.counting():
      outs = interpret.run(traced.closed.jaxpr, traced.closed.consts, [*vals, *a_vals])
    return [W.materialize(o) for o in outs]

  dyn_values = [x for x, d in zip(traced.p_static, traced.p_dyn) if d]
  p_vals = [flat[p] if p in candidates else x for p, x in zip(traced.dyn_paths, dyn_values)]
  rules.RECORD.append(note)
  try:
    jax.eval_shape(go, p_vals, traced.a_in)
  finally:
    rules.RECORD.pop()
  return uses
