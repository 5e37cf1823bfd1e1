"""A float64 NumPy reference of every scheme, written from the definitions (no JAX).

It is what the JAX kernels are tested against: the same blocks, code books
and decision rules, but exact arithmetic where bitsandbytes rounds in float32
(so a value within ~1e-6 of a decision boundary may get the neighbouring
code) and the exact nearest dynamic-map code for double quantization (where
bitsandbytes uses a 65536-point lookup grid).

  ref = quantize(x, "nf4", 64, double_quant=True)
  x_hat = dequantize(ref)          # float64, x's shape
"""
from __future__ import annotations

import numpy as np

from jlora.quant import codebooks as C

NESTED_BLOCK = 256


def _blocks(flat: np.ndarray, bs: int) -> np.ndarray:
  n = flat.shape[-1]
  nb = -(-n // bs)
  out = np.zeros(flat.shape[:-1] + (nb * bs,), np.float64)
  out[..., :n] = flat
  return out.reshape(flat.shape[:-1] + (nb, bs))


def _flatten(x: np.ndarray) -> np.ndarray:
  """``[*lead, rows, cols]`` -> ``[*lead, rows * cols]`` in PyTorch order (transpose, row-major)."""
  x = np.asarray(x, np.float64)
  return np.swapaxes(x, -1, -2).reshape(x.shape[:-2] + (-1,))


def _codes(v: np.ndarray, scheme: str) -> np.ndarray:
  if scheme in C.QMAX:
    q = np.round(v * C.QMAX[scheme])
    return (q + 8 if scheme == "int4" else q).astype(np.int64)
  table = C.TABLES[scheme].astype(np.float64)
  order = C.sorted_order(scheme)
  t = table[order]
  mids = (t[:-1] + t[1:]) / 2
  return order[np.searchsorted(mids, v, side="left")].astype(np.int64)


def values(codes: np.ndarray, scheme: str) -> np.ndarray:
  """Normalized float64 value of each (unpacked) code."""
  if scheme == "int8":
    return codes.astype(np.float64) / C.QMAX["int8"]
  if scheme == "int4":
    return (codes.astype(np.float64) - 8) / C.QMAX["int4"]
  return C.TABLES[scheme].astype(np.float64)[codes]


def double_quantize(absmax: np.ndarray):
  """Exact double quantization of ``absmax: [*lead, nb]``: ``(codes, nested, offset)``."""
  offset = absmax.mean(axis=-1)
  yb = _blocks(absmax - offset[..., None], NESTED_BLOCK)
  a2 = np.abs(yb).max(axis=-1)
  v = yb / np.where(a2 > 0, a2, 1.0)[..., None]
  code = C.dynamic_map().astype(np.float64)
  idx = np.abs(v[..., None] - code).argmin(axis=-1)
  return idx.reshape(idx.shape[:-2] + (-1,))[..., :absmax.shape[-1]], a2, offset


def undo_double_quantize(codes, nested, offset) -> np.ndarray:
  nb = codes.shape[-1]
  v = _blocks(C.dynamic_map().astype(np.float64)[codes], NESTED_BLOCK) * nested[..., None]
  return v.reshape(v.shape[:-2] + (-1,))[..., :nb] + offset[..., None]


def quantize(x, scheme: str, block_size: int, double_quant: bool = False) -> dict:
  """Reference quantization of ``x: [*lead, rows, cols]``.

  Returns a dict with ``codes: [*lead, nb, bs]`` (one code per value,
  unpacked), ``absmax: [*lead, nb]`` (exact), ``scales: [*lead, nb]`` (the
  absmax as dequantization sees it: after double quantization if any),
  ``shape``, ``scheme`` and, with double quantization, ``nested_codes``,
  ``nested`` and ``offset``.
  """
  x = np.asarray(x, np.float64)
  xb = _blocks(_flatten(x), block_size)
  absmax = np.abs(xb).max(axis=-1)
  v = np.clip(xb / np.where(absmax > 0, absmax, 1.0)[..., None], -1, 1)
  out = dict(codes=_codes(v, scheme), absmax=absmax, scales=absmax, shape=x.shape,
             scheme=scheme, v=v)
  if double_quant:
    codes2, nested, offset = double_quantize(absmax)
    out.update(nested_codes=codes2, nested=nested, offset=offset,
               scales=undo_double_quantize(codes2, nested, offset))
  return out


def dequantize(ref: dict) -> np.ndarray:
  """float64 array of ``ref['shape']`` from a :func:`quantize` result."""
  shape = ref["shape"]
  vals = values(ref["codes"], ref["scheme"]) * ref["scales"][..., None]
  rows, cols = shape[-2:]
  flat = vals.reshape(shape[:-2] + (-1,))[..., :rows * cols]
  return np.swapaxes(flat.reshape(shape[:-2] + (cols, rows)), -1, -2)


def error_bound(ref: dict) -> np.ndarray:
  """Per-value bound on ``|x - x̂|``: ``half_gap · absmax + |absmax - scale|`` of its block, x's shape.

  The first term is the code book's rounding (half its largest gap); the
  second what double quantization loses on the block's absmax.
  """
  b = C.half_gap(ref["scheme"]) * ref["absmax"] + np.abs(ref["absmax"] - ref["scales"])
  return per_value(b, ref["shape"], ref["codes"].shape[-1])


def per_value(per_block: np.ndarray, shape, block_size: int) -> np.ndarray:
  """Spreads ``[*lead, nb]`` per-block numbers to every value of an array of ``shape``."""
  rows, cols = shape[-2:]
  full = np.repeat(per_block, block_size, axis=-1)[..., :rows * cols]
  return np.swapaxes(full.reshape(tuple(shape[:-2]) + (cols, rows)), -1, -2)
