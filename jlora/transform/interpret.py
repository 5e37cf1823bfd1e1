"""The jaxpr interpreter: evaluate a traced function with some inputs as Weights.

:func:`run` walks a jaxpr's equations. An equation whose inputs are all
ordinary values is bound unchanged (``pjit``, ``scan``, custom derivatives
and all). An equation that reads a :class:`~jlora.transform.weight.Weight`
goes through a rule: layout operations move the weight's view along
(``weight.py``), ``dot_general``/``conv_general_dilated``/``gather`` add the
low-rank term (``rules.py``), and control flow is re-entered with the
Weight's arrays threaded through it:

  jit / closed_call      inlined
  scan                   a stacked weight whose layer axis is scanned over is
                         sliced with its factors and dropout keys; others are
                         closed over
  cond, while            re-built with ``lax.switch`` / ``lax.while_loop``
  checkpoint (remat)     re-built with ``jax.checkpoint``, its policy kept
  shard_map              re-built with ``jax.shard_map``; the factors get the
                         weight's partition specs on their own axes
  custom_jvp / custom_vjp  the weight is merged (``W + ΔW``) at the boundary,
                         so the function's own derivative rule is kept

Anything else that reads a Weight sees the merged ``W + ΔW`` (a quantized
weight alone: its dequantized value).
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jlora.errors import AdapterError
from jlora.transform import rules
from jlora.transform import weight as W
from jlora.transform.weight import Weight


def run(jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """Evaluates ``jaxpr`` on ``args`` (some of them Weights); returns its outputs."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, x in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
    env[v] = x
  pre: dict[int, Any] = {}            # x·a computed already for a later matmul (siblings)
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    with _context(eqn):
      if eqn.primitive.name == "dot_general" and any(isinstance(x, Weight) for x in invals):
        if i not in pre and FUSE_SIBLINGS:
          pre.update(_siblings(jaxpr.eqns, i, invals, env))
        outs = rules.dot_general(eqn.params, *invals, _next_use(), t_pre=pre.pop(i, None))
        if outs is None:
          outs = _bind(eqn, _materialized(invals))
      elif any(isinstance(x, Weight) for x in invals):
        outs = _apply(eqn, invals)
      else:
        outs = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


FUSE_SIBLINGS = os.environ.get("JLORA_FUSE_SIBLINGS", "1") != "0"
"""LoRA matmuls that share their input (q/k/v, gate/up) compute ``x·[a_1|a_2|...]`` once."""
LOOKAHEAD = 64


def _siblings(eqns, i, invals, env) -> dict[int, Any]:
  """``{eqn index: x·a}`` for the LoRA matmul ``eqns[i]`` and the later ones (within
  :data:`LOOKAHEAD` equations) that multiply the same input by another adapted
  weight, computed as one product (:func:`rules.lora_inputs`)."""
  eqn = eqns[i]
  lhs, rhs = invals
  if rules.fusable(eqn.params, rhs, lhs):
    side, w_lhs = 0, False
  elif rules.fusable(eqn.params, lhs, rhs):
    side, w_lhs = 1, True
  else:
    return {}
  xvar = eqn.invars[side]
  if isinstance(xvar, jcore.Literal):
    return {}
  group = [(i, eqn.params, invals[1 - side])]
  for j in range(i + 1, min(len(eqns), i + 1 + LOOKAHEAD)):
    e = eqns[j]
    if e.primitive.name != "dot_general" or e.invars[side] is not xvar:
      continue
    wv = e.invars[1 - side]
    w = None if isinstance(wv, jcore.Literal) else env.get(wv)
    if rules.fusable(e.params, w, env[xvar]) and e.params == eqn.params:
      group.append((j, e.params, w))
  if len(group) < 2:
    return {}
  ts = rules.lora_inputs([g[1] for g in group], [g[2] for g in group], env[xvar],
                         [w_lhs] * len(group))
  return {} if ts is None else {g[0]: t for g, t in zip(group, ts)}


def _context(eqn):
  ctx = getattr(eqn, "ctx", None)
  manager = getattr(ctx, "manager", None)
  if manager is None:
    import contextlib
    return contextlib.nullcontext()
  return manager


def _bind(eqn, invals):
  got = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = got if isinstance(got, tuple) else ((), got)   # jax < 0.8: (subfuns, params)
  return eqn.primitive.bind(*subfuns, *invals, **params)


def _materialized(invals):
  return [W.materialize(x) for x in invals]


def _plain_outputs(outs):
  return [W.materialize(x) for x in outs]


_USES: list = []     # the current top-level call's use counter (see counting())


def counting():
  """A context in which uses are numbered 0, 1, ... (dropout keys fold the number in),
  so that the same function traced twice draws the same masks."""
  import contextlib

  @contextlib.contextmanager
  def ctx():
    _USES.append(itertools.count())
    try:
      yield
    finally:
      _USES.pop()
  return ctx()


def _next_use() -> int:
  return next(_USES[-1]) if _USES else 0


def _apply(eqn, invals):
  name = eqn.primitive.name
  rule = _RULES.get(name)
  if rule is not None:
    out = rule(eqn, invals)
    if out is not None:
      return out
  for x in invals:
    if isinstance(x, Weight) and x.recording:
      rules.record(x, dict(op=name, dropped=x.dropped))
  return _bind(eqn, _materialized(invals))


# ----------------------------------------------------------------------------- layout

def _view(fn):
  def rule(eqn, invals):
    w = invals[0]
    if not isinstance(w, Weight) or any(isinstance(x, Weight) for x in invals[1:]):
      return None
    return fn(w, eqn.params, invals[1:])
  return rule


def _convert(w, p, _):
  return W.convert(w, p["new_dtype"])


def _broadcast(w, p, _):
  # only a no-op broadcast (same shape) is followed; anything else is materialized
  if tuple(p["shape"]) == w.shape and tuple(p["broadcast_dimensions"]) == tuple(range(w.ndim)):
    return w
  return None


def _sharding(w, p, _):
  sharding = p.get("sharding")
  if sharding is None:
    return w
  return W.shard(w, lambda x: jax.lax.with_sharding_constraint(x, sharding))


LAYOUT = {
    "convert_element_type": _view(_convert),
    "transpose": _view(lambda w, p, _: W.transpose(w, p["permutation"])),
    "reshape": _view(lambda w, p, _: W.reshape(w, p["new_sizes"])
                     if p.get("dimensions") is None else None),
    "squeeze": _view(lambda w, p, _: W.squeeze(w, p["dimensions"])),
    "slice": _view(lambda w, p, _: W.slice_static(w, p["start_indices"], p["limit_indices"],
                                                   p["strides"])),
    "dynamic_slice": _view(lambda w, p, idx: W.slice_dynamic(w, idx, p["slice_sizes"])),
    "broadcast_in_dim": _view(_broadcast),
    "copy": _view(lambda w, p, _: w),
    "copy_p": _view(lambda w, p, _: w),
    "sharding_constraint": _view(_sharding),
}


# ----------------------------------------------------------------------------- uses

def _dot(eqn, invals):
  return rules.dot_general(eqn.params, *invals, _next_use())


def _conv(eqn, invals):
  return rules.conv(eqn.params, *invals, _next_use())


def _gather(eqn, invals):
  return rules.gather(eqn.params, *invals, _next_use())


# ----------------------------------------------------------------------------- control flow

def _inline(key):
  def rule(eqn, invals):
    closed = eqn.params[key]
    jaxpr, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
    return _plain_outputs(run(jaxpr, consts, invals))
  return rule


def _scan_counts(eqn) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a scan equation (read from the avals where a
  JAX version names its parameters otherwise)."""
  p = eqn.params
  if "num_consts" in p and "num_carry" in p:
    return p["num_consts"], p["num_carry"]
  body = p["jaxpr"].jaxpr
  length = p["length"]
  stacked = lambda outer, inner: tuple(outer.aval.shape) == (length,) + tuple(inner.aval.shape)
  n_ys = 0
  for o, i in zip(reversed(eqn.outvars), reversed(body.outvars)):
    if not stacked(o, i):
      break
    n_ys += 1
  nk = p.get("num_carry", len(body.outvars) - n_ys)
  n_xs = 0
  for o, i in zip(reversed(eqn.invars), reversed(body.invars)):
    if not stacked(o, i):
      break
    n_xs += 1
  return p.get("num_consts", len(body.invars) - nk - n_xs), nk


def _scan(eqn, invals):
  p = eqn.params
  nc, nk = _scan_counts(eqn)
  consts, init, xs = invals[:nc], _materialized(invals[nc:nc + nk]), invals[nc + nk:]
  closed = p["jaxpr"]
  sliced, rebuild = [], []
  for x in xs:
    if isinstance(x, Weight):
      x = _scannable(x)
    if isinstance(x, Weight):
      parts, again = _scan_parts(x)
      sliced.append(parts)
      rebuild.append(again)
    else:
      sliced.append(x)
      rebuild.append(None)

  def body(carry, xs_slice):
    xs_vals = [r(v) if r is not None else v for r, v in zip(rebuild, xs_slice)]
    outs = _plain_outputs(run(closed.jaxpr, closed.consts, [*consts, *carry, *xs_vals]))
    return outs[:nk], outs[nk:]

  carry, ys = lax.scan(body, list(init), sliced, length=p["length"], reverse=p.get("reverse", False),
                       unroll=p.get("unroll", 1))
  return [*carry, *ys]


def _scannable(w: Weight) -> Weight | Any:
  """``w`` ready to be sliced along view axis 0 by a scan, or its merged value."""
  if W.is_quantized(w.base) and w.qops:
    w = W.dequantized(w)
  if w.recording or w.lora is None:
    if W.is_quantized(w.base) and w.base.ndim < 3:
      return W.materialize(w)     # a QArray's matrix axes cannot be scanned over
    return w
  if w.roles[0] != ("s", 0):
    return W.materialize(w)
  return w


def _scan_parts(w: Weight):
  """``(arrays to slice, rebuild)``: the base, the adapter arrays that carry the
  first stacked axis (moved to the front) and the dropout keys go through the
  scan; arrays without a stacked axis (a bank's per-slot scales, its ids) stay
  in ``w`` and are closed over."""
  role = w.roles[0]
  roles = w.roles[1:]
  dropped = w.dropped
  fields = {}
  if w.recording:
    dropped = dropped + role[1]
  elif w.lora is not None:
    roles = tuple((k, j - 1) if k == "s" else (k, j) for k, j in roles)
    counts = W._counts(w)
    for name, template in getattr(type(w.lora), "FIELDS", {}).items():
      v = getattr(w.lora, name)
      ax = W.field_axis(template, counts, ("s", 0))
      if v is not None and ax is not None:
        fields[name] = jnp.moveaxis(v, ax, 0)
  shape = w.shape[1:]

  def rebuild(parts):
    base, arrays, key = parts
    node = w.lora
    if node is not None and arrays:
      # each array had its first stacked axis moved to the front and sliced
      # away, so its other axes are in the node's layout again
      node = node.replace(**arrays)
    return w.replace(base=base, lora=node, key=key, shape=shape, roles=roles, dropped=dropped)
  return (w.base, fields, w.key), rebuild


def _cond(eqn, invals):
  index, ops = invals[0], invals[1:]
  if isinstance(index, Weight):
    return None
  branches = [
      (lambda *a, br=br: _plain_outputs(run(br.jaxpr, br.consts, a))) for br in eqn.params["branches"]]
  return lax.switch(index, branches, *ops)


def _while(eqn, invals):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], _materialized(invals[cn + bn:])
  cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
  out = lax.while_loop(lambda c: run(cj.jaxpr, cj.consts, [*cconsts, *c])[0],
                       lambda c: _plain_outputs(run(bj.jaxpr, bj.consts, [*bconsts, *c])),
                       list(init))
  return out


def _remat(eqn, invals):
  p = eqn.params
  jaxpr = p["jaxpr"]
  fun = lambda *a: _plain_outputs(run(jaxpr, (), a))
  return jax.checkpoint(fun, prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))(
      *invals)


def _shard_map(eqn, invals):
  p = eqn.params
  specs = []
  args = []
  for x, spec in zip(invals, p["in_specs"]):
    if isinstance(x, Weight):
      x = W.dequantized(x)
      spec = _weight_specs(x, spec)
    args.append(x)
    specs.append(spec)
  fun = lambda *a: tuple(_plain_outputs(run(p["jaxpr"], (), a)))
  kw = dict(mesh=p["mesh"], in_specs=tuple(specs), out_specs=tuple(p["out_specs"]))
  if "check_vma" in p:
    kw["check_vma"] = p["check_vma"]
  manual = p.get("manual_axes", p.get("newly_manual_axes"))
  if manual is not None and frozenset(manual) != frozenset(p["mesh"].axis_names):
    kw["axis_names"] = frozenset(manual)
  return list(jax.shard_map(fun, **kw)(*args))


def _weight_specs(w: Weight, spec):
  """Partition specs for a Weight's arrays: each adapter array's axis (by its
  node's ``FIELDS`` layout) takes the spec of the weight axis it stands for."""
  from jax.sharding import PartitionSpec as P
  entries = tuple(spec) + (None,) * (w.ndim - len(tuple(spec)))

  def of(role):
    return entries[w.roles.index(role)] if role in w.roles else None
  node = w.lora
  if node is not None:
    counts = W._counts(w)
    by_letter = {k: [of((k.lower(), j)) for j in range(n)] for k, n in counts.items()}
    split = [e for e in by_letter["I"] + by_letter["O"] if e is not None]
    if getattr(type(node), "NONLINEAR", False) and split:
      raise AdapterError(
          f"{w.path!r}: a {type(node).__name__} adapter is a nonlinear function of the whole "
          f"matmul output, but inside this shard_map the weight's input/output axes are split "
          f"over {split} (in_specs {spec}), so each shard holds a partial product; keep those "
          "axes whole there, or use LoRA or IA3, which are linear")
    node = node.replace(**{
        name: P(*[e for t in template for e in by_letter.get(t, [None])])
        for name, template in W._fields(node).items() if getattr(node, name) is not None})
  key = None if w.key is None else P(*[of(("s", j)) for j in range(w.count("s"))])
  return w.replace(base=P(*entries), lora=node, key=key)


def _custom(eqn, invals):
  """The merged weight at the boundary keeps the function's own derivative rule;
  while learning, the uses inside are recorded."""
  if any(isinstance(x, Weight) and x.recording for x in invals):
    closed = eqn.params["call_jaxpr"]
    return _plain_outputs(run(getattr(closed, "jaxpr", closed), getattr(closed, "consts", ()),
                              invals))
  return _bind(eqn, _materialized(invals))


_RULES = {
    **LAYOUT,
    "dot_general": _dot,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "scan": _scan,
    "cond": _cond,
    "while": _while,
    "remat2": _remat,
    "checkpoint": _remat,
    "shard_map": _shard_map,
    "custom_jvp_call": _custom,
    "custom_vjp_call": _custom,
    "custom_vjp_call_jaxpr": _custom,
}
