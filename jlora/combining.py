"""The math of :func:`jlora.combine`: combining several LoRAs of one weight.

Every function here works on one adapted weight at a time. ΔW matrices are
``[*stack, in, out]`` (see :func:`jlora.lora.delta_matrix`); a list of them,
one per adapter, is "the task tensors". The pruning and sign election rules
are those of TIES-merging (Yadav et al. 2023) and DARE (Yu et al. 2023) as
PEFT's ``peft.utils.merge_utils`` implements them, applied per layer (each
stacked layer is pruned on its own, as PEFT prunes each module on its own):

- magnitude pruning keeps the ``int(density · n)`` entries of largest
  ``|ΔW|`` of each layer (``n`` entries), zeroing the rest;
- random pruning (DARE) keeps each entry with probability ``density`` and
  rescales the kept ones by ``1 / density``;
- the majority sign of an entry is the sign of the sum over tasks of the
  pruned, *unweighted* ΔW ("total") or of the sum of their signs
  ("frequency"), ``+1`` where that sum is 0;
- the disjoint merge averages, per entry, the *weighted* pruned ΔW of the
  tasks whose sign agrees with the majority (0 where none does).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from jlora import lora as L

METHODS = ("cat", "linear", "svd", "ties", "dare", "dare_ties", "magnitude_prune")
"""The ``method`` names :func:`jlora.combine` accepts."""
PRUNING = ("ties", "dare", "dare_ties", "magnitude_prune")
RANDOM = ("dare", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def magnitude_prune(x: jax.Array, density: float, stack: int = 0) -> jax.Array:
  """Keeps the ``int(density · n)`` largest-magnitude entries of each layer.

  Args:
    x: ``[*stack, *dims]``; each of the leading ``stack`` axes indexes a layer
      pruned on its own over its ``n = ∏dims`` entries.
    density: fraction kept, in ``[0, 1]`` (1 keeps all, as PEFT).
    stack: number of leading stacked-layer axes.

  Returns:
    ``x`` with the other entries set to 0, same shape and dtype.

  Example:
    >>> magnitude_prune(jnp.array([[1.0, -4.0], [3.0, 2.0]]), 0.5)
    Array([[ 0., -4.],
           [ 3.,  0.]], dtype=float32)
  """
  if density >= 1:
    return x
  lead = x.shape[:stack]
  flat = x.reshape((math.prod(lead), -1))
  k = int(density * flat.shape[1])
  if k == 0:
    return jnp.zeros_like(x)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  rows = jnp.arange(flat.shape[0])[:, None]
  keep = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
  return jnp.where(keep, flat, 0).reshape(x.shape)


def random_prune(key: jax.Array, x: jax.Array, density: float) -> jax.Array:
  """DARE's drop-and-rescale: keeps each entry with probability ``density``,
  scaled by ``1 / density``; ``x: [...]`` -> the same shape.

  Example:
    >>> y = random_prune(jax.random.key(0), jnp.ones((4, 8)), 0.5)
    >>> sorted(set(y.ravel().tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
  """
  if density >= 1:
    return x
  keep = jax.random.bernoulli(key, density, x.shape)
  return jnp.where(keep, x / density, 0).astype(x.dtype)


def majority_sign(tasks: jax.Array, method: str = "total") -> jax.Array:
  """``tasks: [n_tasks, ...]`` -> ``[...]`` of ``±1``: the elected sign per entry.

  Example:
    >>> majority_sign(jnp.array([[1.0, -1.0], [-3.0, 2.0]]))
    Array([-1,  1], dtype=int32)
  """
  if method == "total":
    total = tasks.sum(axis=0)
  elif method == "frequency":
    total = jnp.sign(tasks).sum(axis=0)
  else:
    raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
  return jnp.where(total >= 0, 1, -1).astype(jnp.int32)


def disjoint_merge(weighted: jax.Array, sign: jax.Array, tasks: jax.Array) -> jax.Array:
  """Mean over the tasks whose sign agrees with ``sign`` (0 where none does).

  Args:
    weighted: ``[n_tasks, ...]`` weighted pruned task tensors.
    sign: ``[...]`` elected signs (``±1``).
    tasks: ``[n_tasks, ...]`` the unweighted pruned task tensors (their signs
      decide agreement, as PEFT; a pruned 0 never agrees).

  Example:
    >>> t = jnp.array([[1.0, -2.0], [3.0, 4.0]])
    >>> disjoint_merge(t, majority_sign(t), t)
    Array([2., 4.], dtype=float32)
  """
  agree = jnp.sign(tasks).astype(jnp.int32) == sign[None]
  count = jnp.maximum(agree.sum(axis=0), 1).astype(weighted.dtype)
  return jnp.where(agree, weighted, 0).sum(axis=0) / count


def _weighted(tasks: jax.Array, weights: jax.Array) -> jax.Array:
  return tasks * weights.reshape((-1,) + (1,) * (tasks.ndim - 1)).astype(tasks.dtype)


def mix(deltas: Sequence[jax.Array], weights: jax.Array, method: str, *, stack: int = 0,
        density: float | None = None, key: jax.Array | None = None,
        majority_sign_method: str = "total") -> jax.Array:
  """Combines task tensors ``deltas`` (each ``[*stack, ...]``) into one.

  "svd" is the weighted sum ``Σ w_i ΔW_i``; "magnitude_prune" the weighted sum
  of magnitude-pruned tensors; "ties" magnitude pruning, sign election and
  disjoint merge; "dare" the weighted sum of randomly pruned tensors (PEFT's
  "dare_linear"); "dare_ties" random pruning, sign election, disjoint merge.

  Example:
    >>> d = [jnp.array([1.0, -2.0]), jnp.array([3.0, 4.0])]
    >>> mix(d, jnp.array([1.0, 1.0]), "ties", density=1.0)
    Array([2., 4.], dtype=float32)
  """
  weights = jnp.asarray(weights)
  if method in ("ties", "magnitude_prune"):
    deltas = [magnitude_prune(d, density, stack) for d in deltas]
  elif method in RANDOM:
    keys = jax.random.split(key, len(deltas))
    deltas = [random_prune(k, d, density) for k, d in zip(keys, deltas)]
  elif method != "svd":
    raise ValueError(f"mix: unknown method {method!r}")
  tasks = jnp.stack(deltas)
  weighted = _weighted(tasks, weights)
  if method in ("ties", "dare_ties"):
    merged = disjoint_merge(weighted, majority_sign(tasks, majority_sign_method), tasks)
    # a NaN or Inf of any input poisons its entry, as in a plain sum: sign election
    # and the agreement mask would otherwise drop it and return finite numbers.
    return merged + 0 * weighted.sum(axis=0)
  return weighted.sum(axis=0)


def svd_factors(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Best rank-``rank`` factors of ``m: [*stack, in, out]``: ``a: [*stack, in, rank]``
  with orthonormal columns and ``b: [*stack, rank, out]`` (singular values in
  ``b``, as PEFT puts them in ``lora_B``), so that ``a @ b`` is the truncated SVD.

  Example:
    >>> a, b = svd_factors(jnp.outer(jnp.arange(1.0, 4.0), jnp.ones(2)), 1)
    >>> a.shape, b.shape, bool(jnp.allclose(a @ b, jnp.outer(jnp.arange(1.0, 4.0), jnp.ones(2))))
    ((3, 1), (1, 2), True)
  """
  u, s, vt = jnp.linalg.svd(m.astype(jnp.float32), full_matrices=False)
  return u[..., :, :rank], s[..., :rank, None] * vt[..., :rank, :]


def _meta(lo: L.LoRA, rank: int, a: jax.Array, b: jax.Array) -> L.LoRA:
  """A LoRA shaped like ``lo`` with factors ``a``/``b`` and scale 1 (alpha = rank)."""
  a = a.reshape(lo.stack_dims + lo.in_dims + (rank,)).astype(lo.a.dtype)
  b = b.reshape(lo.stack_dims + (rank,) + lo.out_dims).astype(lo.b.dtype)
  return L.LoRA(a=a, b=b, magnitude=None, alpha=float(rank), rank=rank, in_axes=lo.in_axes,
                out_axes=lo.out_axes, kind=lo.kind, rslora=False,
                dropout=lo.dropout)


# The per-weight functions below are jitted: in eager use (combine outside
# jax.jit) a model's many same-shaped layers then share one compilation instead
# of dispatching every primitive; inside jax.jit they simply inline.
@jax.jit
def cat(los: Sequence[L.LoRA], weights: jax.Array) -> L.LoRA:
  """Exact: ranks concatenated, ``w_i · scale_i`` folded into each ``b_i``.

  The result has scale 1 (alpha = rank = Σ r_i) and ΔW = Σ w_i ΔW_i.
  """
  first = los[0]
  s = first.stack
  a = jnp.concatenate([lo.a.astype(jnp.float32) for lo in los], axis=-1)
  b = jnp.concatenate([lo.b.astype(jnp.float32) * (w * lo.scale) for lo, w in zip(los, weights)],
                      axis=s)
  rank = a.shape[-1]
  return _meta(first, rank, a.reshape(first.stack_dims + (-1, rank)),
               b.reshape(first.stack_dims + (rank, -1)))


@jax.jit
def linear(los: Sequence[L.LoRA], weights: jax.Array) -> L.LoRA:
  """PEFT's ``add_weighted_adapter(combination_type="linear")``, same rank required.

  ``a = Σ sign(c_i)·sqrt|c_i|·a_i`` and ``b = Σ sqrt|c_i|·b_i`` with
  ``c_i = w_i · scale_i``, result scale 1. Not ΔW's weighted sum: the product
  carries cross terms ``a_i b_j`` (i ≠ j).
  """
  first = los[0]
  c = jnp.asarray(weights, jnp.float32) * jnp.asarray([lo.scale for lo in los], jnp.float32)
  root = jnp.sqrt(jnp.abs(c))
  sign = jnp.where(c >= 0, 1.0, -1.0)
  a = sum(lo.a.astype(jnp.float32) * (sg * rt) for lo, sg, rt in zip(los, sign, root))
  b = sum(lo.b.astype(jnp.float32) * rt for lo, rt in zip(los, root))
  rank = first.a.shape[-1]
  return _meta(first, rank, a.reshape(first.stack_dims + (-1, rank)),
               b.reshape(first.stack_dims + (rank, -1)))


@functools.partial(jax.jit, static_argnames=("method", "rank", "density", "majority_sign_method"))
def recompress(los: Sequence[L.LoRA], weights: jax.Array, method: str, rank: int, *,
               density: float | None = None, key: jax.Array | None = None,
               majority_sign_method: str = "total") -> L.LoRA:
  """Mixes the ΔW of ``los`` with :func:`mix`, then truncates to ``rank`` by SVD."""
  first = los[0]
  deltas = [L.delta_matrix(lo, jnp.float32) for lo in los]
  m = mix(deltas, weights, method, stack=first.stack, density=density, key=key,
          majority_sign_method=majority_sign_method)
  a, b = svd_factors(m, rank)
  return _meta(first, rank, a, b)
