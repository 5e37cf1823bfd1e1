"""Where an adapted weight is used: a matmul, a convolution, a lookup.

Each rule gets the equation's parameters and its operands (one of them a
:class:`~jlora.transform.weight.Weight`) and returns the equation's output
with the low-rank term added, unmerged, as PEFT computes it::

  dot_general   y = x·W + s·(drop(x)·a)·b          (W used transposed: x·Wᵀ + s·(x·bᵀ)·aᵀ)
  conv          y = conv(x, W) + s·conv(drop(x), a → r channels)·b
  gather        y = W[ids] + s·a[ids]·b             (no dropout on a lookup, as PEFT)
  DoRA          y = g·(base + s·lora) with g = m / ‖W + ΔW‖ per output feature
                (with dropout: base + (g-1)·base(drop(x)) + g·s·lora(drop(x)))

The low-rank term is computed in the dtype of the other operand as the
equation sees it (a bf16 layer: bf16 matmuls with the float32 factors cast)
and added in the output's dtype. A use these rules cannot express (a
stacked weight whose layer axis is not a batch axis of the matmul, an input
grouping that mixes roles, a grouped convolution, ...) returns None, and the
interpreter materialises ``W + ΔW`` for it instead.

A quantized weight is dequantized inside ``jax.checkpoint`` where it is used,
so the backward pass recomputes it rather than keeping a full-precision copy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import lora as L
from jlora.transform import weight as W
from jlora.transform.weight import Weight

# stored axes are recorded through this hook while learning (see trace.py)
RECORD: list = []


def record(w: Weight, use: dict) -> None:
  if RECORD:
    RECORD[-1](w, use)


def _stored(w: Weight, axes) -> tuple[int, ...]:
  return tuple(sorted(set(a for d in axes for a in w.roles[d][1])))


def base_call(w: Weight, fn, *args):
  """``fn(view, *args)`` with the plain view of ``w`` (dequantized inside a checkpoint)."""
  if not W.is_quantized(w.base):
    return fn(w.base, *args)
  deq = jax.checkpoint(lambda base, *a: fn(W.plain(w.replace(base=base)), *a),
                       policy=jax.checkpoint_policies.nothing_saveable)
  return deq(w.base, *args)


def _gain(w: Weight):
  return None if w.lora is None or w.lora.magnitude is None else W.dora_gain(w, W.plain(w))


def _combine(w: Weight, y, lora_term, gain_out, base_dropped):
  """``y + s·u``, or DoRA's ``g·(y + s·u)`` / ``y + (g-1)·base(drop(x)) + g·s·u``."""
  u = lora_term.astype(y.dtype)
  if gain_out is None:
    return y + u
  g = gain_out.astype(y.dtype)
  if base_dropped is None:
    return g * (y + u)
  return y + (g - 1) * base_dropped + g * u


def _compute_dtype(x, y):
  return x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else y.dtype


# ----------------------------------------------------------------------------- dot_general

def dot_general(params, lhs, rhs, use: int, t_pre=None):
  """``lax.dot_general(lhs, rhs, **params)`` where one operand is a Weight.

  ``t_pre`` is ``x·a`` computed already (with sibling matmuls' ``a`` in one
  product, see :func:`lora_inputs`).
  """
  if isinstance(lhs, Weight) and isinstance(rhs, Weight):
    if rhs.lora is None:
      rhs = W.materialize(rhs)
    else:
      lhs = W.materialize(lhs)
  w_lhs = isinstance(lhs, Weight)
  w, x = (lhs, rhs) if w_lhs else (rhs, lhs)
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  wc, xc, wb, xb = (lc, rc, lb, rb) if w_lhs else (rc, lc, rb, lb)

  def run(view, other):
    a, b = (view, other) if w_lhs else (other, view)
    return lax.dot_general_p.bind(a, b, **params)

  y = base_call(w, run, x)
  if w.recording:
    free = [d for d in range(w.ndim) if d not in wc and d not in wb]
    record(w, dict(op="dot", contract=_stored(w, wc), free=_stored(w, free),
                   batch=_stored(w, wb), dropped=w.dropped))
    return y
  if w.lora is None:
    return y
  if not isinstance(w.lora, L.LoRA):
    hook = getattr(w.lora, "on_dot", None)
    return None if hook is None else hook(DotSite(params, w, x, y, w_lhs, run, use, t_pre))
  kinds_c = {w.roles[d][0] for d in wc}
  if {w.roles[d][0] for d in wb} - {"s"} or w.count("s") != len(wb):
    return None
  if kinds_c == {"i"} and len(wc) == w.count("i"):
    transposed = False
  elif kinds_c == {"o"} and len(wc) == w.count("o"):
    if w.lora.magnitude is not None:
      return None       # DoRA through a transposed use: merged weight, exact
    transposed = True
  else:
    return None
  lo, ns = w.lora, w.count("s")
  dt = _compute_dtype(x, y)
  a, b = lo.a.astype(dt), lo.b.astype(dt)
  first, second = (b, a) if transposed else (a, b)
  # first: [*S, *C, r] (a) or [*S, r, *C] (b); contract x's wc-paired axes with C
  c_off = ns + 1 if transposed else ns
  f_c = tuple(c_off + w.roles[d][1] for d in wc)
  f_b = tuple(w.roles[d][1] for d in wb)
  x_d = _dropout_input(x, w, use, xb, f_b)
  opts = dict(precision=params.get("precision"),
              preferred_element_type=params.get("preferred_element_type"))
  if t_pre is None:
    t_pre = lax.dot_general(x_d, first, ((tuple(xc), f_c), (tuple(xb), f_b)), **opts)
  # t: [*batch, *x_free, r], scaled here (a small array) rather than the output
  r_second = second.ndim - 1 if transposed else ns
  t = (t_pre * jnp.asarray(lo.scale, t_pre.dtype)).astype(dt)
  u = lax.dot_general(t, second, (((t.ndim - 1,), (r_second,)),
                                  (tuple(range(len(xb))), f_b)), **opts)
  # u: [*batch, *x_free, *F] with F the free roles in factor order
  free = [d for d in range(w.ndim) if d not in wc and d not in wb]
  nb, nxf = len(xb), x.ndim - len(xc) - len(xb)
  order = sorted(range(len(free)), key=lambda k: free[k])    # the free axes in view order
  f_numbers = [w.roles[d][1] for d in free]
  perm_f = [nb + nxf + f_numbers[k] for k in order]
  x_free = list(range(nb, nb + nxf))
  perm = list(range(nb)) + (perm_f + x_free if w_lhs else x_free + perm_f)
  u = jnp.transpose(u, perm)
  g = _gain(w)
  gain_out = None if g is None else _gain_on_output(w, g, wb, free, nb, nxf, w_lhs)
  base_dropped = None
  if g is not None and x_d is not x:
    base_dropped = base_call(w, run, x_d)
  return _combine(w, y, u, gain_out, base_dropped)


def fusable(params, w, x) -> bool:
  """A plain LoRA matmul ``x·W`` (one contracted input axis, nothing batched, no
  dropout key) whose ``x·a`` can share one product with its siblings'."""
  if not isinstance(w, Weight) or w.lora is None or w.recording or w.key is not None or \
      w.count("s") or w.count("i") != 1 or isinstance(x, Weight):
    return False
  if not isinstance(w.lora, L.LoRA) and \
      getattr(w.lora, "fused_input", lambda shape: None)(tuple(x.shape)) is None:
    return False
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  return not lb and len(lc) == 1


def lora_inputs(params_list, ws, x, w_lhs_list):
  """``[x·a_k]`` for several LoRA matmuls of the same input ``x``, as ONE product
  ``x·[a_1 | a_2 | ...]`` (q/k/v and gate/up share their input: the activation
  is read once, forward and backward, instead of once per projection)."""
  cols, sizes = [], []
  for params, w, w_lhs in zip(params_list, ws, w_lhs_list):
    (lc, rc), _ = params["dimension_numbers"]
    wc = lc if w_lhs else rc
    if w.roles[wc[0]][0] != "i":
      return None
    a = w.lora.a if isinstance(w.lora, L.LoRA) else w.lora.fused_input(tuple(x.shape))
    cols.append(a)
    sizes.append(a.shape[-1])
  params = params_list[0]
  (lc, rc), _ = params["dimension_numbers"]
  xc = rc if w_lhs_list[0] else lc
  if any(p["dimension_numbers"] != params["dimension_numbers"] for p in params_list[1:]):
    return None
  dt = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32
  a_all = jnp.concatenate([a.astype(dt) for a in cols], axis=-1)          # [K, Σr]
  t_all = lax.dot_general(x, a_all, ((tuple(xc), (0,)), ((), ())),
                          precision=params.get("precision"),
                          preferred_element_type=params.get("preferred_element_type"))
  return jnp.split(t_all, list(np.cumsum(sizes)[:-1]), axis=-1)


def _gain_on_output(w: Weight, g, wb, free, nb, nxf, w_lhs):
  """DoRA's gain (over the view, 1 on input axes) laid out on a dot's output."""
  keep = list(wb) + sorted(free)
  g = jnp.squeeze(g, tuple(d for d in range(w.ndim) if d not in keep))
  remaining = [d for d in range(w.ndim) if d in keep]
  g = jnp.transpose(g, [remaining.index(d) for d in keep])          # [*batch, *free]
  shape = g.shape[:nb] + (1,) * nxf + g.shape[nb:] if not w_lhs else g.shape + (1,) * nxf
  return g.reshape(shape)


def _dropout_input(x, w: Weight, use: int, x_batch=(), key_axes=()):
  """``x`` with LoRA dropout; stacked keys ``[*S]`` pair with x's batch axes."""
  rate = getattr(w.lora, "dropout", 0.0)
  if w.key is None or rate == 0.0:
    return x
  if not w.key.shape:
    return W.dropout(x, w, use)
  keys = jnp.transpose(w.key, key_axes).reshape(-1)               # x's batch order
  rest = [n for d, n in enumerate(x.shape) if d not in x_batch]
  keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, use), 1.0 - rate,
                                                 rest))(keys)
  keep = keep.reshape([x.shape[d] for d in x_batch] + rest)
  keep = jnp.moveaxis(keep, list(range(len(x_batch))), list(x_batch))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


# ----------------------------------------------------------------------------- conv

def conv(params, lhs, rhs, use: int):
  """``lax.conv_general_dilated`` with the kernel a Weight: conv to r channels, then b."""
  if isinstance(lhs, Weight):
    return None
  w = rhs
  dn = params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec

  def run(view, x):
    return lax.conv_general_dilated_p.bind(x, view, **params)

  y = base_call(w, run, lhs)
  o_axis = rhs_spec[0]
  if w.lora is not None and not isinstance(w.lora, L.LoRA) and not w.recording:
    hook = getattr(w.lora, "on_conv", None)
    return None if hook is None else hook(w, params, lhs, y)
  if w.recording:
    ins = [d for d in range(w.ndim) if d != o_axis]
    record(w, dict(op="conv", contract=_stored(w, ins), free=_stored(w, [o_axis]), batch=(),
                   dropped=w.dropped, grouped=params["feature_group_count"] != 1
                   or params["batch_group_count"] != 1))
    return y
  if w.lora is None:
    return y
  if (w.count("s") or w.roles[o_axis] != ("o", 0) or w.count("o") != 1
      or params["feature_group_count"] != 1 or params["batch_group_count"] != 1):
    return None
  lo = w.lora
  dt = _compute_dtype(lhs, y)
  n_in = w.count("i")
  perm = [n_in if d == o_axis else w.roles[d][1] for d in range(w.ndim)]
  a_kernel = jnp.transpose(lo.a.astype(dt), perm)                   # the kernel with O -> r
  x_d = _dropout_input(lhs, w, use)
  conv_params = dict(params, preferred_element_type=params.get("preferred_element_type"))
  t = lax.conv_general_dilated_p.bind(x_d.astype(dt), a_kernel, **conv_params)
  f = out_spec[1]
  u = jnp.moveaxis(jnp.tensordot(jnp.moveaxis(t, f, -1), lo.b.astype(dt), axes=1), -1, f)
  u = u * jnp.asarray(lo.scale, u.dtype)
  g = _gain(w)
  gain_out = None
  if g is not None:
    shape = [1] * y.ndim
    shape[f] = y.shape[f]
    gain_out = g.reshape(shape)
  base_dropped = run(W.plain(w), x_d) if g is not None and x_d is not lhs else None
  return _combine(w, y, u, gain_out, base_dropped)


# ----------------------------------------------------------------------------- gather

def gather(params, operand, indices, use: int):
  """``lax.gather`` from a Weight (an embedding lookup): ``W[ids] + s·a[ids]·b``."""
  if isinstance(indices, Weight):
    return None
  w = operand
  dn = params["dimension_numbers"]

  def run(view, idx):
    return lax.gather_p.bind(view, idx, **params)

  y = base_call(w, run, indices)
  indexed = tuple(dn.start_index_map)
  if w.recording:
    kept = [d for d in range(w.ndim) if d not in dn.collapsed_slice_dims]
    record(w, dict(op="gather", contract=_stored(w, indexed), free=_stored(w, kept), batch=(),
                   dropped=w.dropped, full=all(params["slice_sizes"][d] == w.shape[d]
                                               for d in kept)))
    return y
  if w.lora is None:
    return y
  if not isinstance(w.lora, L.LoRA):
    hook = getattr(w.lora, "on_gather", None)
    return None if hook is None else hook(w, params, indices, y)
  sizes = params["slice_sizes"]
  ins = [d for d in range(w.ndim) if w.roles[d][0] == "i"]
  outs = [d for d in range(w.ndim) if w.roles[d][0] == "o"]
  if (w.count("s") or set(indexed) != set(ins) or set(dn.collapsed_slice_dims) != set(ins)
      or getattr(dn, "operand_batching_dims", ()) or any(sizes[d] != w.shape[d] for d in outs)):
    return None
  lo = w.lora
  dt = y.dtype
  a = lo.a.astype(dt)                                   # [*I, r]
  n_in = len(ins)
  nbatch = indices.ndim - 1
  dn_a = lax.GatherDimensionNumbers(
      offset_dims=(nbatch,), collapsed_slice_dims=tuple(w.roles[d][1] for d in ins),
      start_index_map=tuple(w.roles[d][1] for d in indexed))
  t = lax.gather(a, indices, dn_a, tuple([1] * n_in + [a.shape[-1]]),
                 indices_are_sorted=params["indices_are_sorted"],
                 unique_indices=params["unique_indices"], mode=params["mode"],
                 fill_value=params.get("fill_value"))
  u = jnp.tensordot(t, lo.b.astype(dt), axes=1)          # [*batch, *O (factor order)]
  o_numbers = [w.roles[d][1] for d in outs]               # outs in view order
  u = jnp.transpose(u, list(range(nbatch)) + [nbatch + j for j in o_numbers])
  u = jnp.moveaxis(u, list(range(nbatch, nbatch + len(outs))), list(dn.offset_dims))
  u = u * jnp.asarray(lo.scale, u.dtype)
  g = _gain(w)
  gain_out = None
  if g is not None:
    gv = jnp.squeeze(g, tuple(ins))                       # [*O in view order]
    shape = [1] * y.ndim
    for k, pos in enumerate(dn.offset_dims):
      shape[pos] = gv.shape[k]
    gain_out = gv.reshape(shape)
  return _combine(w, y, u, gain_out, None)


class DotSite:
  """One matmul use of a weight, as an adapter node other than LoRA sees it.

  A node class with ``on_dot(site) -> y`` changes the matmul's output (IA³
  scales it, a bottleneck adapter adds a function of it; see
  ``jlora.methods``). The site lays the node's per-feature arrays onto the
  output or the input of this use:

    site.y, site.x           the base output and the other operand
    site.on_output(v)        v: [*S, *O] broadcast onto y (1 elsewhere)
    site.on_input(v)         v: [*S, *I] broadcast onto x
    site.features(z)         z (shaped like y) as [..., ∏O] with the output axes last
    site.unfeatures(f)       the inverse of ``features``
    site.base(x2)            the base matmul of another input (x2 shaped like x)
    site.t_pre               x·(node.fused_input()) made with the siblings', or None
  """

  def __init__(self, params, w: Weight, x, y, w_lhs: bool, run, use: int, t_pre=None):
    self.params, self.w, self.x, self.y, self.w_lhs, self._run, self.use = (
        params, w, x, y, w_lhs, run, use)
    self.t_pre = t_pre          # x times the node's fused input factor (siblings), or None
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    self.wc, self.xc, self.wb, self.xb = (lc, rc, lb, rb) if w_lhs else (rc, lc, rb, lb)
    self.free = [d for d in range(w.ndim) if d not in self.wc and d not in self.wb]
    self.nb = len(self.xb)
    self.nxf = x.ndim - len(self.xc) - len(self.xb)
    self.ok = (all(w.roles[d][0] == "o" for d in self.free)
               and all(w.roles[d][0] == "i" for d in self.wc)
               and all(w.roles[d][0] == "s" for d in self.wb) and w.count("s") == len(self.wb))

  def _y_positions(self):
    """The positions on y of (W's batch axes in S order, W's free axes in O order)."""
    nb, nxf = self.nb, self.nxf
    s_pos = {self.w.roles[d][1]: k for k, d in enumerate(self.wb)}
    start = nb if self.w_lhs else nb + nxf
    o_pos = {self.w.roles[d][1]: start + k for k, d in enumerate(self.free)}
    return [s_pos[j] for j in range(len(s_pos))], [o_pos[j] for j in range(len(o_pos))]

  def on_output(self, v):
    s_pos, o_pos = self._y_positions()
    return _place(v, s_pos + o_pos, self.y.shape)

  def on_input(self, v):
    s_pos = [self.xb[[self.w.roles[d][1] for d in self.wb].index(j)] for j in range(len(self.wb))]
    i_of = {self.w.roles[d][1]: self.xc[k] for k, d in enumerate(self.wc)}
    return _place(v, s_pos + [i_of[j] for j in range(len(i_of))], self.x.shape)

  def features(self, z):
    _, o_pos = self._y_positions()
    moved = jnp.moveaxis(z, o_pos, list(range(z.ndim - len(o_pos), z.ndim)))
    self._moved_shape = moved.shape
    return moved.reshape(moved.shape[:z.ndim - len(o_pos)] + (-1,))

  def unfeatures(self, f):
    _, o_pos = self._y_positions()
    n = len(o_pos)
    z = f.reshape(self._moved_shape)
    return jnp.moveaxis(z, list(range(z.ndim - n, z.ndim)), o_pos)

  def base(self, x2):
    return base_call(self.w, self._run, x2)


def _place(v, positions, shape):
  """``v`` (its axes going to ``positions`` of an array of ``shape``) broadcastable there."""
  order = sorted(range(len(positions)), key=lambda k: positions[k])
  v = jnp.transpose(v, order)
  out = [1] * len(shape)
  for k in order:
    out[positions[k]] = shape[positions[k]]
  return v.reshape(out)
