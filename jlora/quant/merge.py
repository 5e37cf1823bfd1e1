"""Merging an adapter into a quantized base: dequantize, add, re-quantize.

The merged kernel ``W' = deq(Q) + ΔW`` is quantized again with Q's scheme,
block size and double quantization, so the result is as small as Q — but it
is *not* ``W + ΔW``: it carries a fresh rounding error of the same size as
the original quantization (NF4: up to ~15 % of each block's absmax per value,
about 10 % relative in norm for Gaussian weights), and ``ΔW`` itself, being
small, is mostly lost in it when it is smaller than the code book's steps.
:func:`merge_weight` returns that error so callers can see it; when the
merged model must keep the adapter's effect exactly, merge into a
dequantized (bf16/f32) base instead.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora import lora as L
from jlora.quant import blockwise as B
from jlora.quant.qarray import QArray
from jlora.quant.tree import quantize_array


def requantize(w: jax.Array, like: QArray, path: str = "weight") -> QArray:
  """Quantizes ``w`` (float, ``like.shape``) with ``like``'s scheme, block size, double quant and dtype."""
  q = quantize_array(w, like.scheme, like.block_size, like.double_quant, path=path)
  return dataclasses.replace(q, dtype=like.dtype)


def relative_error(q: QArray, w: jax.Array) -> jax.Array:
  """``‖deq(q) - w‖ / ‖w‖`` in float32 (a scalar array; 0 when ``w`` is 0)."""
  w = w.astype(jnp.float32)
  diff = jnp.linalg.norm((q.dequantize(jnp.float32) - w).ravel())
  norm = jnp.linalg.norm(w.ravel())
  return jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), diff)


@functools.partial(jax.jit, static_argnames=("subtract", "path"))
def _merge(q: QArray, lora: L.LoRA, subtract: bool, path: str):
  w = q.dequantize(jnp.float32)
  new = L.unmerge_weight(w, lora, path) if subtract else L.merge_weight(w, lora)
  merged = requantize(new, q, path)
  return merged, relative_error(merged, new), B.count_bad(new)


def merge_weight(q: QArray, lora: L.LoRA, *, subtract: bool = False,
                 path: str = "weight") -> tuple[QArray, jax.Array]:
  """``requantize(deq(q) ± ΔW)`` and its re-quantization error.

  Args:
    q: the quantized base kernel ``[*stack, *kernel]``.
    lora: the adapter for it (DoRA: PEFT's merged weight; ``subtract`` with
      DoRA raises, as for float weights).
    subtract: unmerge (``deq(q) - ΔW``) instead of merge.
    path: name for error messages.

  Returns:
    ``(merged QArray, rel_err)`` where ``rel_err = ‖deq(merged) - (deq(q) ± ΔW)‖
    / ‖deq(q) ± ΔW‖`` (float32 scalar array).

  Example:
    >>> from jlora import LoraConfig, init_adapter
    >>> from jlora.quant import quantize_array
    >>> params = {"d": {"kernel": jnp.ones((64, 32))}}
    >>> lo = init_adapter(jax.random.key(0), params, LoraConfig(rank=2, targets=["d"]))["d"]["kernel"]
    >>> merged, err = merge_weight(quantize_array(params["d"]["kernel"]), lo)
    >>> merged.shape, float(err)        # B starts at zero: nothing to add, nothing lost
    ((64, 32), 0.0)
  """
  if subtract and lora.magnitude is not None:     # raise here, not inside the trace
    L.unmerge_weight(jnp.zeros(()), lora, path)
  merged, err, bad = _merge(q, lora, subtract, path)
  if not isinstance(bad, jax.core.Tracer) and int(bad):
    raise ValueError(f"{path}: merging gave {int(bad)} NaN/Inf values (or |x| ≥ 2^125) in a "
                     f"weight of shape {list(q.shape)}; the adapter holds non-finite numbers")
  return merged, err
