"""Tree functions over adapters: init, merge, unmerge, delta, scale, count.

An adapter is a sparse nested dict that mirrors the base tree's paths and
holds a :class:`~jlora.lora.LoRA` node at each adapted weight's path, e.g.
``{"layers": {"attn": {"q_proj": {"kernel": LoRA(...)}}}}``. The base tree is
any pytree of arrays (nested dict, ``FrozenDict``, NNX ``State``).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig


def loras(adapter: Any) -> dict[str, L.LoRA]:
  """``{path: LoRA}`` for every LoRA node in ``adapter``."""
  flat = paths.flatten(adapter)
  bad = [p for p, v in flat.items() if not isinstance(v, L.LoRA) and v is not None]
  if bad:
    raise ValueError(f"not an adapter: leaf at {bad[0]!r} is a {type(flat[bad[0]]).__name__}, "
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
    layers: ``{param_path: LayerInfo}`` as learnt by tracing the model
      (``jlora.init_adapter(..., model=, args=)`` fills it). Without it a
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
  layers = dict(layers or {})
  flat = paths.flatten(params)
  out = {}
  for path, w in flat.items():
    info = layers.get(path)
    if not cfg.matches(path, len(_shape(w)), info.kind if info else None):
      continue
    if info is None:
      info = _guess_layer(path, _shape(w))
    rank, alpha = cfg.resolve(path)
    k = jax.random.fold_in(key, _path_hash(path))
    out[path] = L.init(k, w, rank=rank, alpha=alpha, kind=info.kind, in_axes=info.in_axes,
                       out_axes=info.out_axes, stack=info.stack, init=cfg.init,
                       use_dora=cfg.use_dora, rslora=cfg.use_rslora, dropout=cfg.dropout,
                       dtype=cfg.dtype, path=path)
  if not out:
    some = ", ".join(list(flat)[:6])
    raise ValueError(f"LoraConfig.targets={cfg.targets!r} matches no weight of the params tree "
                     f"(paths look like: {some}{', ...' if len(flat) > 6 else ''})")
  adapter = paths.unflatten(out)
  if return_base:
    return adapter, (unmerge(params, adapter) if cfg.init == "pissa" else params)
  return adapter


def _guess_layer(path: str, shape: tuple[int, ...]) -> L.LayerInfo:
  leaf = path.rpartition(paths.SEP)[2]
  if len(shape) != 2:
    raise ValueError(
        f"weight at {path!r} has shape {list(shape)}: which of its axes are inputs and outputs "
        "(a scanned layer stack, DenseGeneral, Einsum or Conv) cannot be told from the shape; "
        "pass model= and args= to jlora.init_adapter so jlora can trace how the layer uses it")
  return L.LayerInfo("embed" if leaf == "embedding" else "dense", (0,), (1,), 0)


def _path_hash(path: str) -> int:
  h = 0
  for ch in path.encode():
    h = (h * 131 + ch) % (2**31 - 1)
  return h


def _pair(params: Any, adapter: Any, what: str) -> tuple[dict[str, L.LoRA], dict[str, Any]]:
  ads = loras(adapter)
  flat = paths.flatten(params)
  for p, lo in ads.items():
    if p not in flat:
      raise ValueError(f"{what}: adapter path {p!r} is not in the base tree")
    L.check_weight(_shape(flat[p]), lo, p)
  return ads, flat


def merge(params: Any, adapter: Any) -> Any:
  """``W + scale · a @ b`` at every adapted path (DoRA: PEFT's merged weight).

  Returns a new tree of the same structure and dtypes as ``params``; paths
  without an adapter are returned as they are. Raises a ValueError naming the
  path and shapes when adapter and base disagree.

  Example:
    >>> p = {"d": {"kernel": jnp.ones((4, 6))}}
    >>> ad = init_adapter(jax.random.key(0), p, LoraConfig(rank=2, targets=["d"]))
    >>> bool((merge(p, ad)["d"]["kernel"] == 1).all())   # B starts at zero
    True
  """
  ads, _ = _pair(params, adapter, "merge")
  return paths.map_with_path(lambda p, w: L.merge_weight(w, ads[p]) if p in ads else w, params)


def unmerge(params: Any, adapter: Any) -> Any:
  """Subtracts ``scale · a @ b`` at every adapted path: ``unmerge(merge(p, a), a) ≈ p``.

  DoRA adapters raise (the merge is not invertible from the merged weight).
  """
  ads, _ = _pair(params, adapter, "unmerge")
  return paths.map_with_path(
      lambda p, w: L.unmerge_weight(w, ads[p], p) if p in ads else w, params)


def delta(adapter: Any, dtype=None) -> dict:
  """The dense ``ΔW = scale · a @ b`` tree, each ``[*stack, *kernel]`` like its base weight.

  (DoRA's magnitude is not part of ΔW; see :func:`merge` for the full weight.)
  """
  return paths.unflatten({p: L.delta(lo, dtype) for p, lo in loras(adapter).items()})


def scale(adapter: Any, factor: float | jax.Array) -> Any:
  """Task arithmetic: ΔW of every layer times ``factor`` (applied to ``b``).

  DoRA magnitudes are left as they are.
  """
  return jax.tree.map(lambda lo: lo.replace(b=(lo.b * factor).astype(lo.b.dtype)), adapter,
                      is_leaf=lambda x: isinstance(x, L.LoRA))


def negate(adapter: Any) -> Any:
  """``scale(adapter, -1)``: the adapter that removes what ``adapter`` adds."""
  return scale(adapter, -1.0)


def count_params(tree: Any) -> int:
  """Number of scalars in ``tree`` (an adapter, or any tree of arrays)."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def combine(adapters, weights=None, method: str = "cat", **kwargs):
  """Combines adapters into one (being built: see issue 2)."""
  raise NotImplementedError("combine is being built")
