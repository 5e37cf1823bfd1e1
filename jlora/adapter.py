"""Tree functions over adapters: init, merge, unmerge, delta, scale, count.

An adapter is a sparse nested dict that mirrors the base tree's paths and
holds a :class:`~jlora.lora.LoRA` node at each adapted weight's path, e.g.
``{"layers": {"attn": {"q_proj": {"kernel": LoRA(...)}}}}``. The base tree is
any pytree of arrays (nested dict, ``FrozenDict``, NNX ``State``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora import combining as C
from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig, names_leaf
from jlora.errors import AdapterError, short
from jlora.quant import merge as quant_merge
from jlora.quant.qarray import QArray


def is_adapter_node(x: Any) -> bool:
  """A LoRA, or another adapter node (a class with ``_jlora_adapter = True``, e.g.
  IA³ in ``jlora.methods``) that the transformation applies at a weight's uses."""
  return isinstance(x, L.LoRA) or getattr(type(x), "_jlora_adapter", False)


def loras(adapter: Any) -> dict[str, L.LoRA]:
  """``{path: node}`` for every adapter node (LoRA and other kinds) in ``adapter``."""
  flat = paths.flatten(adapter)
  bad = [p for p, v in flat.items() if not is_adapter_node(v) and v is not None]
  if bad:
    raise AdapterError(f"not an adapter: leaf at {bad[0]!r} is a {type(flat[bad[0]]).__name__}, "
                       "expected a jlora LoRA node")
  return {p: v for p, v in flat.items() if v is not None}


def _shape(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def init_adapter(key: jax.Array, params: Any, cfg: LoraConfig, *,
                 layers: Mapping[str, L.LayerInfo] | None = None,
                 return_base: bool = False):
  """Creates an adapter for every weight of ``params`` that ``cfg`` targets.

  Args:
    key: PRNG key; each weight gets its own key folded from its path.
    params: the base parameter tree (shapes are all that is read, except for
      "pissa" init and DoRA, which read the weights).
    cfg: the :class:`LoraConfig`.
    layers: ``{param_path: LayerInfo | message}`` for every weight of two or
      more axes, as learnt by tracing the model (``jlora.init_adapter(...,
      model=, args=)`` fills it); a message says why the weight cannot be
      adapted, and a target that selects it raises it. Without ``layers`` a
      ``kernel`` must be 2-D (Dense ``[in, out]``) and an ``embedding`` is an
      ``Embed`` table ``[vocab, dim]``; higher-rank kernels are ambiguous and
      raise.
    return_base: also return the base to train against: for "pissa" the
      residual ``unmerge(params, adapter)``, otherwise ``params`` unchanged.

  Returns:
    The adapter tree (``a: [*stack, *in_dims, r]``, ``b: [*stack, r, *out_dims]``
    at each adapted path), or ``(adapter, base)`` with ``return_base``.

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)}}
    >>> ad = init_adapter(jax.random.key(0), params, LoraConfig(rank=4, targets=["dense"]))
    >>> ad["dense"]["kernel"].a.shape
    (16, 4)
  """
  traced = layers is not None
  layers = dict(layers or {})
  skipped = []
  flat = paths.flatten(params)
  out = {}
  for path, w in flat.items():
    info = layers.get(path)
    if traced and info is None:
      continue                      # not a weight of two or more axes
    kind = None if info is None else info.kind if isinstance(info, L.LayerInfo) else "none"
    if not cfg.matches(path, len(_shape(w)), kind):
      continue
    if isinstance(info, str):
      if names_leaf(cfg.targets, path):
        raise AdapterError(f"LoraConfig.targets={cfg.targets!r} names {info}")
      skipped.append(info)        # selected through its module: the module's other weights
      continue
    if info is None:
      info = _guess_layer(path, _shape(w))
    rank, alpha = cfg.resolve(path)
    k = jax.random.fold_in(key, paths.path_seed(path))
    out[path] = L.init(k, _init_value(w, cfg), rank=rank, alpha=alpha, kind=info.kind,
                       in_axes=info.in_axes, out_axes=info.out_axes, stack=info.stack,
                       init=cfg.init, use_dora=cfg.use_dora, rslora=cfg.use_rslora,
                       dropout=cfg.dropout, dtype=cfg.dtype, path=path)
  if not out and skipped:
    raise AdapterError(f"LoraConfig.targets={cfg.targets!r} selects only weights LoRA cannot "
                       f"adapt: {'; '.join(skipped[:3])}")
  if not out:
    some = ", ".join(list(flat)[:6])
    raise AdapterError(f"LoraConfig.targets={cfg.targets!r} matches no weight of the params tree "
                     f"(paths look like: {some}{', ...' if len(flat) > 6 else ''})")
  adapter = paths.unflatten(out)
  if return_base:
    if cfg.init != "pissa":
      return adapter, params
    # the residual W - s·a@b; with DoRA too (PEFT's order: PiSSA first, then the magnitude)
    lora_only = jax.tree.map(lambda lo: lo.replace(magnitude=None), adapter,
                             is_leaf=lambda x: isinstance(x, L.LoRA))
    return adapter, unmerge(params, lora_only)
  return adapter


def _init_value(w, cfg: LoraConfig):
  """What the init reads of a weight: its values for PiSSA and DoRA, else only its shape
  (a quantized weight is dequantized only when its values are read)."""
  if isinstance(w, QArray):
    return w.dequantize() if (cfg.use_dora or cfg.init == "pissa") else \
        jax.ShapeDtypeStruct(w.shape, w.dtype)
  return w


def _guess_layer(path: str, shape: tuple[int, ...]) -> L.LayerInfo:
  leaf = path.rpartition(paths.SEP)[2]
  if len(shape) != 2:
    raise AdapterError(
        f"weight at {path!r} has shape {list(shape)}: which of its axes are inputs and outputs "
        "(a scanned layer stack, DenseGeneral, Einsum or Conv) cannot be told from the shape; "
        "pass model= and args= to jlora.init_adapter so jlora can trace how the layer uses it")
  return L.LayerInfo("embed" if leaf == "embedding" else "dense", (0,), (1,), 0)


def _pair(params: Any, adapter: Any, what: str) -> tuple[dict[str, L.LoRA], dict[str, Any]]:
  ads = loras(adapter)
  flat = paths.flatten(params)
  for p, lo in ads.items():
    if p not in flat:
      raise ValueError(f"{what}: adapter path {p!r} is not in the base tree")
    _check_fits(_shape(flat[p]), lo, p)
  return ads, flat


def _check_fits(shape, node, path: str) -> None:
  if isinstance(node, L.LoRA):
    L.check_weight(shape, node, path)
  else:
    node.check_weight(shape, path)


def merge(params: Any, adapter: Any, *, report: bool = False) -> Any:
  """``W + scale · a @ b`` at every adapted path (DoRA: PEFT's merged weight).

  Returns a new tree of the same structure and dtypes as ``params``; paths
  without an adapter are returned as they are. Raises a ValueError naming the
  path and shapes when adapter and base disagree.

  A quantized weight (:class:`~jlora.quant.QArray`) is dequantized, merged and
  quantized again with its own scheme, which adds a fresh rounding error
  (see ``jlora.quant.merge``); with ``report=True`` the result is
  ``(merged, errors)``, ``errors[path] = ‖deq(merged) - (W + ΔW)‖ / ‖W + ΔW‖``
  for each re-quantized path (``unmerge`` likewise).

  Example:
    >>> p = {"d": {"kernel": jnp.ones((4, 6))}}
    >>> ad = init_adapter(jax.random.key(0), p, LoraConfig(rank=2, targets=["d"]))
    >>> bool((merge(p, ad)["d"]["kernel"] == 1).all())   # B starts at zero
    True
  """
  ads, _ = _pair(params, adapter, "merge")
  errors = {}
  out = paths.map_with_path(
      lambda p, w: _merge_one(w, ads[p], p, errors, False) if p in ads else w, params)
  return (out, errors) if report else out


def unmerge(params: Any, adapter: Any, *, report: bool = False) -> Any:
  """Subtracts ``scale · a @ b`` at every adapted path: ``unmerge(merge(p, a), a) ≈ p``.

  DoRA adapters raise (the merge is not invertible from the merged weight).
  """
  ads, _ = _pair(params, adapter, "unmerge")
  errors = {}
  out = paths.map_with_path(
      lambda p, w: _merge_one(w, ads[p], p, errors, True) if p in ads else w, params)
  return (out, errors) if report else out


def _merge_one(w, lo: L.LoRA, p: str, errors: dict, subtract: bool):
  """Merges (or unmerges) one weight; a QArray is re-quantized and its error kept in ``errors``."""
  if not isinstance(lo, L.LoRA):
    return lo.merge_into(w, p, subtract=subtract)     # another adapter kind
  if not isinstance(w, QArray) and not jnp.issubdtype(w.dtype, jnp.floating):
    raise AdapterError(f"{'unmerge' if subtract else 'merge'}: the base weight at {short(p)} has "
                       f"dtype {w.dtype}; merging into it would round W + ΔW to integers. "
                       "Dequantize or cast it to a float dtype first")
  if isinstance(w, QArray):
    w, errors[p] = quant_merge.merge_weight(w, lo, subtract=subtract, path=p)
    return w
  return L.unmerge_weight(w, lo, p) if subtract else L.merge_weight(w, lo)


def delta(adapter: Any, dtype=None) -> dict:
  """The dense ``ΔW = scale · a @ b`` tree, each ``[*stack, *kernel]`` like its base weight.

  (DoRA's magnitude is not part of ΔW; see :func:`merge` for the full weight.)
  """
  return paths.unflatten({p: L.delta(lo, dtype) for p, lo in loras(adapter).items()})


def _lora_only(adapter: Any, what: str) -> dict[str, L.LoRA]:
  """``loras(adapter)``, refusing other kinds of node (they have no ΔW = s·a·b)."""
  nodes = loras(adapter)
  other = [p for p, v in nodes.items() if not isinstance(v, L.LoRA)]
  if other:
    raise AdapterError(f"{what} works on LoRA adapters; {other[0]!r} is a "
                       f"{type(nodes[other[0]]).__name__} node")
  return nodes


def scale(adapter: Any, factor: float | jax.Array) -> Any:
  """Task arithmetic: ΔW of every layer times ``factor`` (applied to ``b``).

  DoRA magnitudes are left as they are. LoRA nodes only (an
  :class:`~jlora.errors.AdapterError` names any other kind).
  """
  _lora_only(adapter, "scale")
  return jax.tree.map(lambda lo: lo.replace(b=(lo.b * factor).astype(lo.b.dtype)), adapter,
                      is_leaf=lambda x: isinstance(x, L.LoRA))


def negate(adapter: Any) -> Any:
  """``scale(adapter, -1)``: the adapter that removes what ``adapter`` adds."""
  return scale(adapter, -1.0)


def count_params(tree: Any) -> int:
  """Number of scalars in ``tree`` (an adapter, or any tree of arrays)."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def combine(adapters, weights=None, method: str = "cat", *, rank: int | None = None,
            density: float | None = None, key: jax.Array | None = None,
            majority_sign_method: str = "total") -> dict:
  """Combines several adapters of one base into one adapter.

  Methods (``ΔW_i = scale_i · a_i @ b_i`` is adapter i's update of a weight):

  - "cat" (exact): ranks concatenated, ``a = [a_1 … a_n]``, ``b = [w_1·scale_1·b_1;
    …]``, so ΔW = Σ w_i ΔW_i exactly, whatever the alphas, ranks and rsLoRA
    flags; rank Σ r_i. Same as PEFT's "cat".
  - "linear" (PEFT-compatible, approximate): PEFT's ``add_weighted_adapter``
    "linear": ``a = Σ sign(c_i)·sqrt|c_i|·a_i``, ``b = Σ sqrt|c_i|·b_i`` with
    ``c_i = w_i·scale_i``; same rank required. The product carries cross terms
    ``a_i b_j`` (i ≠ j), so ΔW is *not* the weighted sum. (For rsLoRA adapters
    PEFT additionally scales its result by ``sqrt(r)``; jlora does not.)
  - "svd": Σ w_i ΔW_i re-compressed to ``rank`` by truncated SVD (exact at full
    rank ``min(in, out)``); PEFT's "svd".
  - "ties": TIES-merging on ΔW: each ΔW_i keeps its top ``density`` fraction
    by magnitude, a sign is elected per entry, agreeing weighted entries are
    averaged; then SVD to ``rank`` (PEFT's "ties_svd").
  - "dare": DARE on ΔW: random drop with keep-probability ``density`` and
    rescale by ``1/density``, then Σ w_i ΔW_i and SVD (PEFT's "dare_linear_svd").
  - "dare_ties": DARE's drop and rescale, then TIES' sign election and
    disjoint merge, then SVD (PEFT's "dare_ties_svd").
  - "magnitude_prune": top-``density`` magnitude pruning, Σ w_i ΔW_i, SVD
    (PEFT's "magnitude_prune_svd").

  The pruning methods act on each layer's ΔW (each layer of a stack on its
  own); :mod:`jlora.combining` states the exact rules. Every result has scale 1
  (``alpha = rank``, no rsLoRA), so it needs no knowledge of the inputs'
  scales. Works under ``jax.jit`` with ``method``, ``rank``, ``density`` and
  ``majority_sign_method`` static (``weights`` and ``key`` may be traced).

  DoRA adapters are rejected: DoRA's merged weight ``m·(W+ΔW)/‖W+ΔW‖`` is not
  linear in ΔW and needs the base, so no weighted combination of adapters is
  defined by the adapters alone; merge them into the base with :func:`merge`
  instead, or combine their LoRA parts (``lo.replace(magnitude=None)``).

  Args:
    adapters: a sequence of adapter trees with the same paths, kernel shapes
      and axis groupings.
    weights: one number per adapter (may be negative); default all 1 (the sum).
    method: one of "cat", "linear", "svd", "ties", "dare", "dare_ties",
      "magnitude_prune".
    rank: result rank for the SVD-based methods (default: the largest input
      rank at each path), capped at each weight's full rank
      ``min(∏in_dims, ∏out_dims)``, where the truncated SVD is exact.
    density: fraction of entries kept, in ``[0, 1]`` (``(0, 1]`` for DARE);
      required by the pruning methods.
    key: PRNG key; required by "dare" and "dare_ties".
    majority_sign_method: "total" (sign of the sum) or "frequency" (sign of
      the count), for "ties" and "dare_ties".

  Returns:
    One adapter (nested dict) with the same paths: ``a: [*stack, *in_dims, R]``,
    ``b: [*stack, R, *out_dims]``.

  Example:
    >>> p = {"d": {"kernel": jnp.ones((6, 4))}}
    >>> cfg = LoraConfig(rank=2, targets=["d"], init="gaussian")
    >>> ad1, ad2 = (scale(init_adapter(jax.random.key(i), p, cfg), 0.1) for i in (1, 2))
    >>> both = combine([ad1, ad2], weights=[0.7, 0.3], method="cat")
    >>> both["d"]["kernel"].a.shape
    (6, 4)
  """
  flats, weights = _combine_args(adapters, weights, method, density, key, majority_sign_method)
  out = {}
  for path, first in flats[0].items():
    los = [_same_layer(f, first, path, i) for i, f in enumerate(flats)]
    if method == "cat":
      out[path] = C.cat(los, weights)
    elif method == "linear":
      _check_same_rank(los, path)
      out[path] = C.linear(los, weights)
    else:
      r = _combine_rank(los, rank, path)
      k = None if key is None else jax.random.fold_in(key, paths.path_seed(path))
      out[path] = C.recompress(los, weights, method, r, density=density, key=k,
                               majority_sign_method=majority_sign_method)
  return paths.unflatten(out)


def _combine_args(adapters, weights, method, density, key, sign_method):
  if method not in C.METHODS:
    raise ValueError(f"combine: method must be one of {C.METHODS}, got {method!r}")
  if isinstance(adapters, Mapping) or not isinstance(adapters, (list, tuple)) or not adapters:
    raise TypeError("combine: adapters must be a non-empty list or tuple of adapter trees")
  n = len(adapters)
  if weights is None:
    weights = [1.0] * n
  if len(weights) != n:
    raise ValueError(f"combine: {len(weights)} weights for {n} adapters")
  if method in C.PRUNING:
    lo_ok = 0 < density if method in C.RANDOM else 0 <= density if density is not None else False
    if density is None or not (lo_ok and density <= 1):
      raise ValueError(f"combine: method {method!r} needs density in "
                       f"{'(0, 1]' if method in C.RANDOM else '[0, 1]'}, got {density!r}")
  elif density is not None:
    raise ValueError(f"combine: density is only used by {C.PRUNING}, not by {method!r}")
  if method in C.RANDOM and key is None:
    raise ValueError(f"combine: method {method!r} drops entries at random and needs key=")
  if sign_method not in C.SIGN_METHODS:
    raise ValueError(f"combine: majority_sign_method must be one of {C.SIGN_METHODS}, "
                     f"got {sign_method!r}")
  flats = [_lora_only(ad, "combine") for ad in adapters]
  for i, f in enumerate(flats[1:], 1):
    extra = set(f) ^ set(flats[0])
    if extra:
      p = sorted(extra)[0]
      which = "adapter 0" if p in flats[0] else f"adapter {i}"
      other = f"adapter {i}" if p in flats[0] else "adapter 0"
      raise ValueError(f"combine: path {p!r} is in {which} but not in {other}; all adapters "
                       "must adapt the same paths")
  return flats, jnp.asarray(weights, jnp.float32)


def _same_layer(flat: dict, first: L.LoRA, path: str, i: int) -> L.LoRA:
  lo = flat[path]
  if lo.magnitude is not None:
    raise ValueError(f"combine: adapter {i} at {path!r} is a DoRA adapter; DoRA's merged weight "
                     "m·(W+ΔW)/‖W+ΔW‖ is not linear in ΔW, so no combination of adapters is "
                     "defined without the base. Merge into the base with jlora.merge, or "
                     "combine the LoRA parts (lo.replace(magnitude=None))")
  same = (lo.kernel_shape, lo.in_axes, lo.out_axes, lo.stack)
  want = (first.kernel_shape, first.in_axes, first.out_axes, first.stack)
  if same != want:
    raise ValueError(f"combine: adapter {i} at {path!r} adapts a kernel of "
                     f"{list(lo.kernel_shape)} (in_axes {lo.in_axes}, out_axes {lo.out_axes}, "
                     f"stack {lo.stack}) but adapter 0 one of {list(first.kernel_shape)} "
                     f"(in_axes {first.in_axes}, out_axes {first.out_axes}, stack {first.stack})")
  return lo


def _check_same_rank(los, path):
  ranks = [lo.a.shape[-1] for lo in los]
  if len(set(ranks)) != 1:
    raise ValueError(f"combine: method 'linear' needs the same rank in every adapter, but at "
                     f"{path!r} the ranks are {ranks}; use 'cat' (exact) or 'svd'")


def _combine_rank(los, rank, path):
  """The requested rank (default: the largest input rank), capped at the full rank."""
  lo = los[0]
  r = max(x.rank for x in los) if rank is None else rank
  if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
    raise ValueError(f"combine: rank must be a positive int, got {r!r} (at {path!r})")
  return min(r, math.prod(lo.in_dims), math.prod(lo.out_dims))
