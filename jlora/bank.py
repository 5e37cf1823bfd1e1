"""Many adapters, one base: an :class:`AdapterBank` and mixed batches.

A bank stacks N adapters of one base along a leading *slot* axis, at a fixed
capacity, so functions compiled for it never change shape: adding, replacing
or removing an adapter writes arrays, it does not recompile. At each adapted
weight it holds one :class:`BankLoRA`::

  a: [N, *stack, *in_dims, R]      b: [N, *stack, R, *out_dims]      scale: [N]

with every adapter's rank zero-padded to R (its own ``alpha / r`` kept in
``scale``) and zeros where an adapter does not target that weight. The
slot names are data too (``[N, 64]`` UTF-8 bytes), so they survive ``jit``.

A mixed batch names a slot per example (or per token, for packed
sequences): ``bank.bind(ids)`` gives an adapter tree that the
transformation applies like any other (``jlora.apply(..., bank, x,
adapter_ids=ids)`` does it for you). At a matmul each row gets its own
slot's low-rank term, computed one of two ways:

  slots     ``x·[a_1 | ... | a_N]`` for every slot, each row's own block kept
            (a one-hot mask), then one matmul with ``[b_1; ...; b_N]``: each
            factor read once, nothing per row (decoding: one row per id)
  gather    each id's ``a`` and ``b`` gathered, a matmul batched over the ids
            (one id per example and many rows each: prefill, training)
  grouped   rows sorted by slot, ``jax.lax.ragged_dot`` over the slots
            (one id per token: packed sequences)

q/k/v (and gate/up), which share their input, compute the ``slots`` product
for all three at once.

Id ``-1`` (:data:`BASE`) means "the base alone".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import lora as L
from jlora import paths
from jlora.errors import AdapterError

BASE = -1
"""The id of "no adapter" in a mixed batch."""

NAME_BYTES = 64
METHODS = ("auto", "slots", "gather", "grouped")
GATHER_IDS = 256
SLOT_ROWS = 16
"""``method="auto"``: with few rows per id (decoding) and a bank not much larger
than the batch, ``slots``; else up to :data:`GATHER_IDS` ids (one per example)
``gather``; more (one per token of packed sequences) ``grouped``."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BankLoRA:
  """One weight's LoRA for every slot of a bank (an adapter node of the transformation).

  Attributes:
    a: ``[N, *stack, *in_dims, R]``.
    b: ``[N, *stack, R, *out_dims]``.
    scale: ``[N]`` float32 per-slot scale (0 for an empty slot).
    ranks: ``[N]`` int32, each slot's own rank (before padding to R).
    ids: the slot of each example ``[*batch]`` int32 (:data:`BASE`: none), or None.
    in_axes / out_axes / kind: as :class:`jlora.LoRA`.
    method: "auto", "gather" or "grouped".
  """
  a: jax.Array
  b: jax.Array
  scale: jax.Array
  ranks: jax.Array
  ids: jax.Array | None = None
  _jlora_node = True
  _jlora_adapter = True
  FIELDS = {"a": "nSIr", "b": "nSrO", "scale": "n", "ranks": "n", "ids": "q"}
  in_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
  out_axes: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
  kind: str = dataclasses.field(default="dense", metadata=dict(static=True))
  method: str = dataclasses.field(default="auto", metadata=dict(static=True))

  @property
  def stack(self) -> int:
    return len(self.a.shape) - 2 - len(self.in_axes)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    s = self.stack
    ins, outs = self.a.shape[1 + s:-1], self.b.shape[2 + s:]
    dims = dict(zip(self.in_axes + self.out_axes, ins + outs))
    return tuple(self.a.shape[1:1 + s]) + tuple(dims[i] for i in range(len(dims)))

  def replace(self, **kw) -> "BankLoRA":
    return dataclasses.replace(self, **kw)

  def check_weight(self, shape, path: str) -> None:
    if tuple(shape) != self.kernel_shape:
      raise AdapterError(f"bank at {path!r} has a: {list(self.a.shape)}, b: {list(self.b.shape)}"
                         f" (a kernel of {list(self.kernel_shape)}) but the base weight is "
                         f"{list(shape)}")

  def merged(self, view, w):
    raise AdapterError(f"{w.path!r}: a bank of adapters with per-example ids cannot be merged "
                       "into one weight, but the function uses this weight in an op other than a "
                       "matmul, a convolution or a lookup (pick one slot: bank.adapter(name))")

  def merge_into(self, weight, path, subtract=False):
    raise AdapterError(f"{path!r}: merge one slot of a bank (bank.adapter(name)), not the bank")

  # ------------------------------------------------------------------ the uses
  def _method(self, ids, rows_per_id) -> str:
    if self.method != "auto":
      return self.method
    if rows_per_id <= SLOT_ROWS and self.a.shape[0] <= 2 * max(ids.size, 1):
      return "slots"
    return "gather" if ids.size <= GATHER_IDS else "grouped"

  def fused_input(self, x_shape=None):
    """``[K, N·R]``: every slot's ``a`` side by side (the ``slots`` method's input
    factor, shared with sibling matmuls), or None where the input ``x_shape``
    (``[*ids, ..., K]``) takes another method."""
    if self.ids is None or self.stack:
      return None
    n, r = self.a.shape[0], self.a.shape[-1]
    k = math.prod(self.a.shape[1:-1])
    if x_shape is not None:
      rows = math.prod(x_shape) // max(k, 1) // max(self.ids.size, 1)
      if self._method(self.ids, rows) != "slots":
        return None
    return jnp.moveaxis(self.a.reshape(n, -1, r), 0, 1).reshape(-1, n * r)

  def _ids(self, w):
    if self.ids is None:
      raise AdapterError(f"{w.path!r}: a bank needs the slot of each example: "
                         "jlora.apply(..., adapter_ids=ids) or bank.bind(ids)")
    return self.ids

  def _rows(self, ids, lead_shape, path):
    """``ids`` broadcast to the leading axes of an input, and the rows per id."""
    if tuple(lead_shape[:ids.ndim]) != tuple(ids.shape):
      raise AdapterError(f"{path!r}: adapter_ids {list(ids.shape)} do not match the leading "
                         f"axes {list(lead_shape)} of the input this weight multiplies")
    return math.prod(lead_shape[ids.ndim:])

  def on_dot(self, site):
    w, x = site.w, site.x
    ids = self._ids(w)
    if not site.ok or site.wb:
      raise AdapterError(f"{w.path!r}: a mixed batch needs the weight used as a plain matmul "
                         "operand (input axes contracted, output axes kept)")
    xc = list(site.xc)
    free = [d for d in range(x.ndim) if d not in xc]
    if free[:ids.ndim] != list(range(ids.ndim)):
      raise AdapterError(f"{w.path!r}: adapter_ids {list(ids.shape)} must be the leading axes "
                         f"of the matmul's input {list(x.shape)}")
    # x as [*ids, F, C] with C the contracted axes in the factor's input order
    order_c = sorted(range(len(xc)), key=lambda k: w.roles[site.wc[k]][1])
    c_axes = [xc[k] for k in order_c]
    xt = jnp.transpose(x, free + c_axes)
    f_shape = xt.shape[ids.ndim:len(free)]
    n_c = math.prod(xt.shape[len(free):])
    xt = xt.reshape(ids.shape + (math.prod(f_shape), n_c))
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else site.y.dtype
    n_slots, r = self.a.shape[0], self.a.shape[-1]
    b = self.b.astype(dt).reshape(n_slots, r, -1)
    method = self._method(ids, math.prod(f_shape))
    if method == "slots":
      t = site.t_pre
      if t is None:
        t = jnp.einsum("...fc,cn->...fn", xt.astype(dt),
                       self.fused_input().astype(dt))                  # [*ids, F, N·R]
      else:   # made with the siblings' (x's axes as the matmul keeps them): reorder
        t = t.reshape(ids.shape + (math.prod(f_shape), n_slots * r))
      u = _slot_rows(t.astype(dt), b, ids, self.scale)
    else:
      a = self.a.astype(dt).reshape(n_slots, n_c, r)
      u = (_gathered if method == "gather" else _grouped)(xt.astype(dt), a, b, ids)
      u = u * _slot_scale(self.scale, ids, u.ndim).astype(u.dtype)    # [*ids, F, ∏O]
    o_free = [d for d in range(w.ndim) if w.roles[d][0] == "o"]        # in view order
    o_dims = [w.shape[d] for d in sorted(o_free, key=lambda d: w.roles[d][1])]
    u = u.reshape(ids.shape + tuple(f_shape) + tuple(o_dims))
    lead = ids.ndim + len(f_shape)
    by_view = sorted(range(len(o_free)), key=lambda k: o_free[k])
    o_numbers = [w.roles[d][1] for d in o_free]
    perm = list(range(lead)) + [lead + o_numbers[k] for k in by_view]
    u = jnp.transpose(u, perm)
    if site.w_lhs:
      n_o = len(o_free)
      u = jnp.moveaxis(u, list(range(lead, lead + n_o)), list(range(n_o)))
    return site.y + u.astype(site.y.dtype)

  def on_gather(self, w, params, indices, y):
    """An embedding lookup in a mixed batch: ``W[tok] + s_i·a_i[tok]·b_i`` per row."""
    ids = self._ids(w)
    dn = params["dimension_numbers"]
    ins = [d for d in range(w.ndim) if w.roles[d][0] == "i"]
    outs = [d for d in range(w.ndim) if w.roles[d][0] == "o"]
    if len(ins) != 1 or tuple(dn.start_index_map) != tuple(ins) or w.count("s"):
      raise AdapterError(f"{w.path!r}: a mixed batch supports lookups of one axis")
    tok = indices[..., 0]                                              # [*batch_of_indices]
    self._rows(ids, tok.shape, w.path)
    slot = jnp.broadcast_to(ids.reshape(ids.shape + (1,) * (tok.ndim - ids.ndim)), tok.shape)
    n_slots, r = self.a.shape[0], self.a.shape[-1]
    rows = self.a[jnp.maximum(slot, 0), jnp.clip(tok, 0, self.a.shape[1] - 1)]   # [..., R]
    b = self.b.reshape(n_slots, r, -1)[jnp.maximum(slot, 0)]                      # [..., R, ∏O]
    u = jnp.einsum("...r,...ro->...o", rows.astype(y.dtype), b.astype(y.dtype))
    u = u * _slot_scale(self.scale, slot, u.ndim).astype(u.dtype)
    u = u.reshape(tok.shape + tuple(w.shape[d] for d in sorted(outs, key=lambda d: w.roles[d][1])))
    o_numbers = [w.roles[d][1] for d in outs]
    u = jnp.transpose(u, list(range(tok.ndim)) + [tok.ndim + j for j in o_numbers])
    u = jnp.moveaxis(u, list(range(tok.ndim, tok.ndim + len(outs))), list(dn.offset_dims))
    return y + u

  def on_conv(self, w, params, x, y):
    """A convolution in a mixed batch: each example convolved with its slot's ``a``."""
    ids = self._ids(w)
    dn = params["dimension_numbers"]
    o_axis = dn.rhs_spec[0]
    if ids.ndim != 1 or w.count("s") or w.roles[o_axis] != ("o", 0) or \
        params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
      raise AdapterError(f"{w.path!r}: a mixed batch needs one id per example and a plain "
                         "convolution")
    bdim = dn.lhs_spec[0]
    n_in = w.count("i")
    perm = [n_in if d == o_axis else w.roles[d][1] for d in range(w.ndim)]
    dt = x.dtype
    kernels = jnp.transpose(self.a[jnp.maximum(ids, 0)].astype(dt),
                            [0] + [1 + p for p in perm])                # [B, *kernel with O=r]

    def one(xi, k):
      return jax.lax.conv_general_dilated_p.bind(jnp.expand_dims(xi, bdim), k, **params)
    t = jax.vmap(one, in_axes=(bdim, 0))(x, kernels)                    # [B, 1 at bdim, ...]
    t = jnp.squeeze(jnp.moveaxis(t, 0, bdim + 1), bdim)                 # batch back in place
    f = dn.out_spec[1]
    bsel = self.b[jnp.maximum(ids, 0)].astype(dt)                       # [B, r, cout]
    tb = jnp.moveaxis(t, (dn.out_spec[0], f), (0, -1))                  # [B, ..., r]
    u = jnp.einsum("b...r,bro->b...o", tb, bsel)
    u = u * _slot_scale(self.scale, ids, u.ndim).astype(u.dtype)
    u = jnp.moveaxis(u, (0, -1), (dn.out_spec[0], f))
    return y + u.astype(y.dtype)


def _slot_scale(scale, ids, ndim):
  """Each row's scale (0 for :data:`BASE`), shaped to broadcast on ``ndim`` axes."""
  s = jnp.where(ids >= 0, scale[jnp.maximum(ids, 0)], 0.0)
  return s.reshape(ids.shape + (1,) * (ndim - ids.ndim))


def _slot_rows(t_all, b, ids, scale):
  """``[*ids, F, N·R]`` (x times every slot's a) → ``[*ids, F, O]``: each row keeps its
  own slot's R columns (scaled; none for :data:`BASE`), then one matmul with all b."""
  n, r = b.shape[0], b.shape[1]
  keep = (ids[..., None] == jnp.arange(n).reshape((1,) * ids.ndim + (n,))).astype(t_all.dtype)
  keep = keep * jnp.where(ids >= 0, scale[jnp.maximum(ids, 0)], 0.0)[..., None].astype(
      t_all.dtype)
  mask = jnp.repeat(keep, r, axis=-1)[..., None, :]                             # [*ids, 1, N·R]
  return jnp.einsum("...fn,no->...fo", t_all * mask, b.reshape(n * r, -1))


def _gathered(xt, a, b, ids):
  """``[*ids, F, C] → [*ids, F, O]`` with each row's own slot: gather a and b."""
  slot = jnp.maximum(ids, 0)
  t = jnp.einsum("...fc,...cr->...fr", xt, a[slot])
  return jnp.einsum("...fr,...ro->...fo", t, b[slot])


def _grouped(xt, a, b, ids):
  """The same by rows sorted by slot and ``jax.lax.ragged_dot`` (one group per slot,
  one extra zero group for :data:`BASE`)."""
  n_slots = a.shape[0]
  flat_ids = jnp.where(ids >= 0, ids, n_slots).reshape(-1)                # [E]
  per = xt.shape[-2]
  order = jnp.argsort(flat_ids, stable=True)
  x_rows = xt.reshape((-1,) + xt.shape[-2:])[order].reshape(-1, xt.shape[-1])
  sizes = jnp.bincount(flat_ids, length=n_slots + 1).astype(jnp.int32) * per
  a_ext = jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)])
  b_ext = jnp.concatenate([b, jnp.zeros((1,) + b.shape[1:], b.dtype)])
  t = jax.lax.ragged_dot(x_rows, a_ext, sizes)
  u = jax.lax.ragged_dot(t.astype(b.dtype), b_ext, sizes)
  u = u.reshape(-1, per, u.shape[-1])
  back = jnp.zeros_like(u).at[order].set(u)
  return back.reshape(xt.shape[:-1] + (u.shape[-1],))


# ----------------------------------------------------------------------------- the bank

def _encode(name: str | None) -> np.ndarray:
  out = np.zeros(NAME_BYTES, np.uint8)
  if name is None:
    return out
  if not isinstance(name, str) or not name:
    raise AdapterError(f"a slot name must be a non-empty str, got {name!r}")
  raw = name.encode()
  if len(raw) > NAME_BYTES - 1:
    raise AdapterError(f"slot name {name[:20]!r}... is {len(raw)} bytes; at most "
                       f"{NAME_BYTES - 1}")
  out[:len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def _decode(row) -> str | None:
  raw = bytes(np.asarray(row, np.uint8)).rstrip(b"\0")
  return raw.decode() if raw else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
  """N adapters of one base, stacked at a fixed capacity, with names.

  Attributes:
    nodes: ``{path: BankLoRA}`` (flat paths), one per weight any slot adapts.
    names: ``[N, 64]`` uint8, each slot's UTF-8 name (all zero: an empty slot).
    rank: R, the padded rank (static).

  Functions that change the bank return a new one; none changes a shape, so
  nothing compiled for the bank recompiles.

  Example:
    >>> import jlora
    >>> params = {"d": {"kernel": jnp.ones((16, 8))}}
    >>> cfg = jlora.LoraConfig(rank=2, targets=["d"])
    >>> ads = {n: jlora.init_adapter(jax.random.key(i), params, cfg) for i, n in enumerate("xy")}
    >>> bank = AdapterBank.stack(ads, capacity=4)
    >>> bank.slot_names, bank.ids(["y", None, "x"]).tolist()
    (['x', 'y', None, None], [1, -1, 0])
  """
  nodes: dict
  names: jax.Array
  _jlora_node = True   # one leaf for jlora's tree functions (saved and restored whole)
  rank: int = dataclasses.field(metadata=dict(static=True))

  # ------------------------------------------------------------------ reading
  @property
  def capacity(self) -> int:
    return int(self.names.shape[0])

  @property
  def slot_names(self) -> list[str | None]:
    return [_decode(r) for r in np.asarray(self.names)]

  def slot(self, name: str) -> int:
    """The slot index of ``name``."""
    names = self.slot_names
    if name not in names:
      raise AdapterError(f"no adapter named {name!r} in the bank (it has "
                         f"{[n for n in names if n is not None]})")
    return names.index(name)

  def ids(self, names: Sequence[str | None]) -> jax.Array:
    """Slot ids (int32) for a batch's adapter names; None means :data:`BASE`."""
    return jnp.asarray([BASE if n is None else self.slot(n) for n in names], jnp.int32)

  def adapter(self, name: str) -> dict:
    """The adapter in slot ``name`` as a plain adapter tree (its own rank)."""
    k = self.slot(name)
    out = {}
    for p, node in self.nodes.items():
      r = int(node.ranks[k])
      if r == 0:
        continue                          # this slot does not adapt p
      a, b, s = node.a[k], node.b[k], float(node.scale[k])
      out[p] = L.LoRA(a=a[..., :r], b=jnp.take(b, jnp.arange(r), axis=node.stack),
                      alpha=s * r, in_axes=node.in_axes, out_axes=node.out_axes,
                      kind=node.kind)
    return paths.unflatten(out)

  def bind(self, ids: jax.Array, method: str = "auto") -> dict:
    """The adapter tree for a mixed batch: each example (``ids [batch]``) or token
    (``ids [batch, seq]``, packed sequences) uses its slot; :data:`BASE` none."""
    if method not in METHODS:
      raise AdapterError(f"bank.bind: method must be one of {METHODS}, got {method!r}")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise AdapterError(f"adapter_ids must be integers (slot or {BASE}), got {ids.dtype}")
    ids = ids.astype(jnp.int32)
    return paths.unflatten({p: n.replace(ids=ids, method=method) for p, n in self.nodes.items()})

  # ------------------------------------------------------------------ building
  @classmethod
  def stack(cls, adapters, *, capacity: int | None = None, rank: int | None = None,
            names: Sequence[str] | None = None, dtype=None) -> "AdapterBank":
    """A bank of ``adapters`` (a dict name → adapter, or a list named by ``names``
    or "0", "1", ...), with room for ``capacity`` (default: as many), ranks
    padded to ``rank`` (default: the largest) and factors in ``dtype`` (default:
    the adapters'; ``jnp.bfloat16`` halves what serving reads)."""
    if not isinstance(adapters, Mapping):
      adapters = list(adapters)
      names = list(names) if names is not None else [str(i) for i in range(len(adapters))]
      if len(names) != len(adapters):
        raise AdapterError(f"AdapterBank.stack: {len(names)} names for {len(adapters)} adapters")
      adapters = dict(zip(names, adapters))
    if not adapters:
      raise AdapterError("AdapterBank.stack: no adapters")
    flats = {n: _flat(ad, n) for n, ad in adapters.items()}
    ranks = [lo.a.shape[-1] for f in flats.values() for lo in f.values()]
    rank = max(ranks) if rank is None else rank
    if max(ranks) > rank:
      raise AdapterError(f"AdapterBank.stack: an adapter has rank {max(ranks)} > rank={rank}")
    capacity = len(adapters) if capacity is None else capacity
    if capacity < len(adapters):
      raise AdapterError(f"AdapterBank.stack: {len(adapters)} adapters for capacity {capacity}")
    shapes = {}
    for n, f in flats.items():
      for p, lo in f.items():
        meta = (lo.kernel_shape, lo.in_axes, lo.out_axes, lo.kind, lo.a.dtype)
        if shapes.setdefault(p, (meta, n))[0][:4] != meta[:4]:
          raise AdapterError(f"AdapterBank.stack: adapters {shapes[p][1]!r} and {n!r} adapt "
                             f"{p!r} differently ({shapes[p][0][:4]} vs {meta[:4]})")
    nodes = {p: _empty_node(next(f[p] for f in flats.values() if p in f), capacity, rank, dtype)
             for p in shapes}
    bank = cls(nodes=nodes, names=jnp.zeros((capacity, NAME_BYTES), jnp.uint8), rank=rank)
    for n, ad in adapters.items():
      bank = bank.add(n, ad)
    return bank

  def add(self, name: str, adapter: Any) -> "AdapterBank":
    """A new bank with ``adapter`` in the first empty slot, named ``name``.

    An adapter that targets a weight no slot adapted yet adds that weight to
    the bank (zeros in every other slot): the one change that gives the bank
    new arrays, so functions compiled for it compile again. Stack the bank
    with every target it will hold to avoid it.
    """
    names = self.slot_names
    if name in names:
      raise AdapterError(f"the bank already has an adapter named {name!r}; use replace")
    if None not in names:
      raise AdapterError(f"the bank is full ({self.capacity} slots); remove one first")
    return self._write(names.index(None), name, adapter)

  def replace(self, name: str, adapter: Any) -> "AdapterBank":
    """A new bank with slot ``name`` holding ``adapter``."""
    return self._write(self.slot(name), name, adapter)

  def remove(self, name: str) -> "AdapterBank":
    """A new bank with slot ``name`` emptied (zeros; its id then adds nothing)."""
    k = self.slot(name)
    nodes = _write_slot(self.nodes, jnp.int32(k), {}, {}, {p: jnp.float32(0) for p in self.nodes},
                        {p: jnp.int32(0) for p in self.nodes}, self.rank)
    return dataclasses.replace(self, nodes=nodes, names=self.names.at[k].set(0))

  def _write(self, k: int, name: str, adapter: Any) -> "AdapterBank":
    flat = _flat(adapter, name)
    grown = dict(self.nodes)
    for p in sorted(set(flat) - set(self.nodes)):     # a weight no slot adapted yet: zeros
      some = next(iter(self.nodes.values()), None)
      grown[p] = _empty_node(flat[p], self.capacity, self.rank,
                             None if some is None else some.a.dtype)
    self = dataclasses.replace(self, nodes=grown)
    rows = {}
    for p, node in self.nodes.items():
      lo = flat.get(p)
      if lo is None:
        rows[p] = (None, None, 0.0, 0)
        continue
      if lo.kernel_shape != node.kernel_shape or (lo.in_axes, lo.out_axes) != (
          node.in_axes, node.out_axes):
        raise AdapterError(f"adapter {name!r} at {p!r}: a kernel of {list(lo.kernel_shape)} "
                           f"grouped {lo.in_axes}/{lo.out_axes}, the bank's is "
                           f"{list(node.kernel_shape)} {node.in_axes}/{node.out_axes}")
      r = lo.a.shape[-1]
      if r > self.rank:
        raise AdapterError(f"adapter {name!r} at {p!r} has rank {r} > the bank's {self.rank}")
      rows[p] = (lo.a, lo.b, lo.scale, r)
    a = {p: v[0] for p, v in rows.items() if v[0] is not None}
    b = {p: v[1] for p, v in rows.items() if v[1] is not None}
    scale = {p: jnp.float32(v[2]) for p, v in rows.items()}      # dicts: jit sorts their keys
    ranks = {p: jnp.int32(v[3]) for p, v in rows.items()}
    nodes = _write_slot(self.nodes, jnp.int32(k), a, b, scale, ranks, self.rank)
    return dataclasses.replace(self, nodes=nodes, names=self.names.at[k].set(_encode(name)))

  # ------------------------------------------------------------------ composition
  def combine(self, names: Sequence[str], weights: Sequence[float], new_name: str,
              method: str = "cat", **kw) -> "AdapterBank":
    """A new bank with ``jlora.combine`` of the named slots in a new slot (task arithmetic:
    ``weights=[1, -1]`` adds one adapter and subtracts another, exactly with "cat")."""
    from jlora.adapter import combine
    parts = [_flat(self.adapter(n), n) for n in names]
    every = set().union(*parts)
    for part in parts:                     # a weight one slot does not adapt: a zero LoRA
      for p in every - set(part):
        node = self.nodes[p]
        zero = _empty_node(next(q[p] for q in parts if p in q), 1, 1)
        part[p] = L.LoRA(a=zero.a[0], b=zero.b[0], alpha=1.0, in_axes=node.in_axes,
                         out_axes=node.out_axes, kind=node.kind)
    if method == "cat":
      total = max(sum(part[p].a.shape[-1] for part in parts if p in part) for p in every)
      if total > self.rank:
        raise AdapterError(f"bank.combine: 'cat' gives rank {total} > the bank's {self.rank}; "
                           "use method='svd' with rank=bank.rank (or a bank of a larger rank)")
    merged = combine([paths.unflatten(p) for p in parts], weights=list(weights), method=method,
                     **kw)
    return self.add(new_name, merged)


@functools.partial(jax.jit, static_argnames=("pads",))
def _write_slot_jit(nodes, k, a, b, scale, ranks, pads):
  out = {}
  for p, node in nodes.items():
    if p in a:
      new_a = jnp.pad(a[p], [(0, 0)] * (a[p].ndim - 1) + [(0, pads[p][0])]).astype(node.a.dtype)
      new_b = jnp.pad(b[p], pads[p][1]).astype(node.b.dtype)
    else:
      new_a, new_b = jnp.zeros(node.a.shape[1:], node.a.dtype), jnp.zeros(node.b.shape[1:],
                                                                          node.b.dtype)
    out[p] = node.replace(a=jax.lax.dynamic_update_index_in_dim(node.a, new_a, k, 0),
                          b=jax.lax.dynamic_update_index_in_dim(node.b, new_b, k, 0),
                          scale=node.scale.at[k].set(scale[p]),
                          ranks=node.ranks.at[k].set(ranks[p]))
  return out


def _write_slot(nodes, k, a, b, scale, ranks, rank):
  """Every weight's slot ``k`` set to the given factors (zero-padded to ``rank``),
  in one compiled update (compiled once per bank layout and adapter ranks)."""
  pads = {}
  for p, node in nodes.items():
    if p in a:
      pad = rank - a[p].shape[-1]
      widths = [(0, 0)] * b[p].ndim
      widths[node.stack] = (0, pad)
      pads[p] = (pad, tuple(widths))
  return _write_slot_jit(nodes, k, a, b, scale, ranks, _Static(pads))


class _Static:
  """A hashable wrapper that makes its value a static argument of a jitted function."""

  def __init__(self, value):
    self.value = value
    self._key = repr(sorted(value.items()))

  def __getitem__(self, k):
    return self.value[k]

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and other._key == self._key


def _empty_node(lo: L.LoRA, capacity: int, rank: int, dtype=None) -> BankLoRA:
  """A weight's bank entry with every slot empty, shaped for ``lo``'s kernel."""
  dtype = lo.a.dtype if dtype is None else dtype
  return BankLoRA(a=jnp.zeros((capacity,) + lo.stack_dims + lo.in_dims + (rank,), dtype),
                  b=jnp.zeros((capacity,) + lo.stack_dims + (rank,) + lo.out_dims, dtype),
                  scale=jnp.zeros((capacity,), jnp.float32),
                  ranks=jnp.zeros((capacity,), jnp.int32), in_axes=lo.in_axes,
                  out_axes=lo.out_axes, kind=lo.kind)


def _flat(adapter, name) -> dict[str, L.LoRA]:
  from jlora.adapter import loras
  flat = loras(adapter)
  for p, lo in flat.items():
    if not isinstance(lo, L.LoRA):
      raise AdapterError(f"adapter {name!r} at {p!r} is a {type(lo).__name__}; a bank holds LoRA")
    if lo.magnitude is not None:
      raise AdapterError(f"adapter {name!r} at {p!r} is DoRA; a bank of mixed batches holds "
                         "plain LoRA (merge the magnitude first, or serve it alone)")
  return flat


def from_peft(directories: Mapping[str, str], params: Any, *, capacity: int | None = None,
              rank: int | None = None, **load_kwargs) -> AdapterBank:
  """A bank of several PEFT adapter directories (``{name: directory}``), each read
  by :func:`jlora.peft.load` (``load_kwargs``: ``model=``, ``args=``, ...)."""
  from jlora.interop import peft
  adapters = {name: peft.load(d, params, **load_kwargs)[0] for name, d in directories.items()}
  return AdapterBank.stack(adapters, capacity=capacity, rank=rank)


# ----------------------------------------------------------------------------- training

def factors(bank: AdapterBank) -> dict:
  """The trainable arrays of a bank: ``{path: {"a": [N, ...], "b": [N, ...]}}``."""
  return {p: {"a": n.a, "b": n.b} for p, n in bank.nodes.items()}


def with_factors(bank: AdapterBank, trained: Mapping) -> AdapterBank:
  """``bank`` with the arrays of :func:`factors` replaced by ``trained``."""
  nodes = {p: n.replace(a=trained[p]["a"], b=trained[p]["b"]) for p, n in bank.nodes.items()}
  return dataclasses.replace(bank, nodes=nodes)


def slot_mean(values: jax.Array, ids: jax.Array, capacity: int) -> jax.Array:
  """``Σ_slots mean(values of that slot's rows)``: each slot's loss is its own rows'
  mean, as if trained alone; rows of :data:`BASE` count for nothing.

  ``values`` is ``[*ids.shape]`` (e.g. a per-example loss) or has more axes
  (a per-token loss ``[batch, seq]`` with ids ``[batch]``), which are averaged
  within each row's slot too.

  Example:
    >>> slot_mean(jnp.array([1.0, 3.0, 10.0, 7.0]), jnp.array([0, 0, 1, -1]), 2).item()
    12.0
  """
  ids = jnp.asarray(ids)
  extra = values.ndim - ids.ndim
  per_row = values.reshape(ids.shape + (-1,)).sum(-1) if extra else values
  count = (math.prod(values.shape[ids.ndim:]) if extra else 1)
  onehot = (ids.reshape(-1)[:, None] == jnp.arange(capacity)[None, :]).astype(values.dtype)
  sums = onehot.T @ per_row.reshape(-1)
  rows = onehot.sum(0) * count
  return jnp.sum(jnp.where(rows > 0, sums / jnp.maximum(rows, 1), 0.0))


def per_slot(optimizer, capacity: int, learning_rates: jax.Array | None = None):
  """An optax transformation for bank :func:`factors`, slot by slot.

  ``optimizer`` runs as usual (elementwise optimizers like Adam(W) keep one
  state per slot automatically, their step count shared); then every update
  is multiplied by its slot's ``learning_rates[k]`` (a factor, default 1),
  and slots absent from the batch (``update(..., slot_active=[N] bool)``)
  get no update and keep their state. Global-norm clipping would couple the
  slots: clip per slot before, or not at all.
  """
  import optax

  rates = None if learning_rates is None else jnp.asarray(learning_rates, jnp.float32)

  def along_slots(v, ndim):
    return v.reshape((capacity,) + (1,) * (ndim - 1))

  def init(params):
    return optimizer.init(params)

  def update(updates, state, params=None, *, slot_active=None, **extra):
    new_updates, new_state = optimizer.update(updates, state, params)
    if rates is not None:
      new_updates = jax.tree.map(lambda u: u * along_slots(rates, u.ndim).astype(u.dtype),
                                 new_updates)
    if slot_active is not None:
      act = jnp.asarray(slot_active, bool)
      keep = lambda new, old: (jnp.where(along_slots(act, new.ndim), new, old)
                               if getattr(new, "ndim", 0) and new.shape[0] == capacity else new)
      new_updates = jax.tree.map(lambda u: jnp.where(along_slots(act, u.ndim), u, 0.0),
                                 new_updates)
      new_state = jax.tree.map(keep, new_state, state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)
