"""Code books: the value each code stands for, bit-identical to bitsandbytes'.

A 4-bit code ``c`` in a block with scale ``absmax`` stands for
``table[c] * absmax``. The tables are float32 and equal, bit for bit, to
``bitsandbytes.functional.get_4bit_type`` (NF4, FP4) and
``create_dynamic_map`` (the signed 8-bit map used to double-quantize the
absmax); ``tests/test_quant_bnb.py`` checks them against the installed peer.

  NF4: 16 quantiles of N(0, 1) scaled to [-1, 1]; code 7 is exactly 0.
  FP4: bitsandbytes' own 1-sign/2-exponent/1-mantissa table (not OCP E2M1):
       bit 3 is the sign, codes 0..7 have magnitudes
       0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4 (code 8 is +0 too, as in
       bitsandbytes' table).
  INT4: ours, symmetric: code c stands for (c - 8) / 7 (codes 1..15).
  INT8: ours, symmetric: int8 code q stands for q / 127 (q in -127..127).
"""
from __future__ import annotations

import functools

import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                np.float32) / np.float32(12)).astype(np.float32)

INT4 = ((np.arange(16, dtype=np.float32) - np.float32(8)) / np.float32(7)).astype(np.float32)

TABLES = {"nf4": NF4, "fp4": FP4, "int4": INT4}
"""The 16-entry table of each 4-bit scheme, indexed by code."""

PAIR_TABLES = {k: np.stack([np.repeat(t, 16), np.tile(t, 16)], -1) for k, t in TABLES.items()}
"""``[256, 2]`` per 4-bit scheme: the values of a packed byte's two codes, high nibble first."""

QMAX = {"int4": 7, "int8": 127}
"""Largest integer code of the symmetric integer schemes."""

SCHEMES = ("nf4", "fp4", "int4", "int8")
BNB_SCHEMES = ("nf4", "fp4")


def bits(scheme: str) -> int:
  """4 for the nibble-packed schemes, 8 for int8."""
  return 8 if scheme == "int8" else 4


def sorted_order(scheme: str) -> np.ndarray:
  """Codes sorted by value, as bitsandbytes sorts them (FP4's two zeros: code 0 before code 8)."""
  return np.argsort(TABLES[scheme], kind="stable").astype(np.uint8)


def midpoints(scheme: str) -> np.ndarray:
  """float32 midpoints between neighbouring sorted code values: the decision boundaries.

  A value ``v`` falls in bucket ``k = #{m : m < v}`` (so a value exactly on a
  midpoint goes to the lower code), and gets code ``sorted_order(scheme)[k]``.
  """
  t = TABLES[scheme][sorted_order(scheme)]
  return ((t[:-1] + t[1:]) / np.float32(2)).astype(np.float32)


def half_gap(scheme: str) -> float:
  """Largest rounding error of a scheme relative to its block's absmax."""
  if scheme in QMAX:
    return 0.5 / QMAX[scheme]
  t = np.sort(TABLES[scheme][sorted_order(scheme)].astype(np.float64))
  return float(np.max(np.diff(t)) / 2)


def _linspace_f32(n: int) -> np.ndarray:
  """``torch.linspace(0.1, 1, n, dtype=float32)`` (float32 step, fused multiply-add)."""
  start = np.float32(0.1)
  step = np.float32((np.float32(1) - start) / np.float32(n - 1))
  i = np.arange(n)
  lo = (np.float64(start) + np.float64(step) * i).astype(np.float32)
  hi = (1.0 - np.float64(step) * (n - 1 - i)).astype(np.float32)
  return np.where(i < n // 2, lo, hi)


@functools.cache
def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted float32 values.

  Values are ``±10^(i-6) * m`` for the midpoints ``m`` of ``linspace(0.1, 1, 2^i + 1)``,
  i = 0..6, plus 0 and 1.
  """
  data = []
  for i in range(7):
    b = _linspace_f32(2 ** i + 1)
    means = ((b[:-1] + b[1:]) / np.float32(2)).astype(np.float32)
    v = (np.float32(10.0 ** (i - 6)) * means).astype(np.float32)
    data += list(v) + list(-v)
  data += [np.float32(0), np.float32(1)]
  out = np.sort(np.array(data, np.float32))
  out.flags.writeable = False
  return out


@functools.cache
def dynamic_lut() -> np.ndarray:
  """uint8 ``[65536]``: the dynamic-map code nearest to each grid point ``j / 65535 * 2 - 1``.

  bitsandbytes' CPU 8-bit quantizer maps a normalized value ``v`` to grid
  index ``j = floor(((v + 1) * 0.5) * 65535 + 0.5)`` (float32 arithmetic) and
  then to ``lut[j]``; it is not the exact nearest code where the map's codes
  are closer together than the grid (near 0).
  """
  code = dynamic_map().astype(np.float64)
  g = np.arange(65536, dtype=np.float64) / 65535 * 2 - 1
  hi = np.clip(np.searchsorted(code, g, side="left"), 1, code.size - 1)
  lo = hi - 1
  pick = np.where(np.abs(g - code[hi]) < np.abs(g - code[lo]), hi, lo)
  out = pick.astype(np.uint8)
  out.flags.writeable = False
  return out
