"""Blockwise absmax quantization in JAX: codes, nibble packing, double quantization.

Every function works on a batch of independent slices: ``x: [*lead, n]`` is
the row-major flattening of each slice, cut into blocks of ``block_size``
(the last block zero-padded); blocks never cross slices. For NF4/FP4 the
arithmetic is bitsandbytes' CPU path step by step, in float32:

  absmax_b = max |x| over block b
  v        = clip(x * (1 / absmax_b), -1, 1)   (the last, partial block: x / absmax_b)
  code     = sorted_order[#{midpoints < v}]
  x̂        = table[code] * absmax_b

and the absmax are double-quantized as bitsandbytes does (see
:func:`double_quantize`). All of it is jit-friendly, with no Python loops over
blocks.

XLA flushes float32 subnormals (|x| < 2^-126) to zero on CPU and GPU, so the
inputs are flushed first; bitsandbytes keeps them, so blocks whose absmax is
subnormal are the one place the codes can differ (their values are < 1.2e-38
either way).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import codebooks as C

TINY = float(np.finfo(np.float32).tiny)   # 2^-126, the smallest normal float32
HUGE = 2.0 ** 125                         # largest |x| accepted: 1/absmax must stay normal
NESTED_BLOCK = 256                        # bitsandbytes' block size for the absmax
_BNB_MIN_ABSMAX = np.float32(1e-38)       # bitsandbytes' clamp of a partial block's absmax


def num_blocks(n: int, block_size: int) -> int:
  return -(-n // block_size)


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``x: [*lead, n]`` -> ``[*lead, ceil(n / block_size), block_size]``, zero-padded."""
  n = x.shape[-1]
  pad = num_blocks(n, block_size) * block_size - n
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (-1, block_size))


def flush_subnormals(x: jax.Array) -> jax.Array:
  return jnp.where(jnp.abs(x) < TINY, jnp.zeros_like(x), x)


def block_absmax(xb: jax.Array) -> jax.Array:
  """``[*lead, nb, bs]`` -> ``[*lead, nb]`` float32; NaN where a block holds NaN/Inf or |x| ≥ 2^125.

  The NaN poisons every value dequantized from the block, so bad input that
  slips through ``jit`` (where it cannot be checked eagerly) is never silent.
  """
  am = jnp.max(jnp.abs(xb), axis=-1)
  return jnp.where(jnp.isfinite(am) & (am < HUGE), am, jnp.nan)


def count_bad(x: jax.Array) -> jax.Array:
  """Number of values that cannot be quantized: NaN, ±Inf or |x| ≥ 2^125."""
  return jnp.sum(~(jnp.isfinite(x) & (jnp.abs(x) < HUGE)))


def rounded(x: jax.Array) -> jax.Array:
  """``x``, rounded to float32 before anything is added to it.

  XLA's LLVM backends contract ``a * b + c`` into one fused multiply-add,
  which rounds once where bitsandbytes rounds twice. An identity select
  (NaN stays NaN) between the multiply and the add stops the contraction;
  ``optimization_barrier`` and ``reduce_precision`` do not (tested).
  """
  return jnp.where(jnp.isnan(x), jnp.full_like(x, jnp.nan), x)


def lookup(table, idx: jax.Array) -> jax.Array:
  """``table[idx]`` for a small constant table: a gather whose output is sharded like ``idx``.

  (Needed for explicitly sharded indices, where a plain ``jnp.take`` cannot
  tell which sharding its output should have.)
  """
  table = jnp.asarray(table)
  sharding = jax.typeof(idx).sharding if hasattr(jax, "typeof") else None
  if sharding is None:
    return jnp.take(table, idx, axis=0)
  if table.ndim > 1:  # rows of the table: trailing axes replicated
    spec = tuple(sharding.spec) + (None,) * (idx.ndim - len(sharding.spec) + table.ndim - 1)
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return table.at[idx].get(out_sharding=sharding)


def divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a / b`` as one IEEE division per value, also under ``jit``.

  XLA rewrites ``a / broadcast(b)`` and ``a / constant`` into
  ``a * (1 / b)``, which rounds twice, where torch divides. A full-shaped
  divisor that depends on ``a`` (an identity select: NaN only where ``a`` is
  NaN, whose quotient is NaN anyway) is not rewritten.
  """
  b = jnp.broadcast_to(b, a.shape)
  return a / jnp.where(jnp.isnan(a), jnp.full_like(b, jnp.nan), b)


def _safe(am: jax.Array) -> jax.Array:
  return jnp.where(am > 0, am, jnp.ones_like(am))


def scale_4bit(xb: jax.Array, am: jax.Array, n: int) -> jax.Array:
  """``x / absmax`` exactly as bitsandbytes rounds it: ``[*lead, nb, bs]`` float32 in [-1, 1]."""
  safe = _safe(am)
  v = xb * (1.0 / safe)[..., None]
  if n % xb.shape[-1]:
    # bitsandbytes divides the last, partial block instead of multiplying by 1/absmax
    last = divide(xb[..., -1:, :], safe[..., -1:, None])
    v = jnp.concatenate([v[..., :-1, :], last], axis=-2)
  return jnp.clip(v, -1.0, 1.0)


def stored_absmax(am: jax.Array, n: int, block_size: int) -> jax.Array:
  """bitsandbytes stores a partial last block's absmax clamped to ≥ 1e-38."""
  if n % block_size == 0:
    return am
  last = jnp.where(am[..., -1:] > 0, am[..., -1:], _BNB_MIN_ABSMAX)
  return jnp.concatenate([am[..., :-1], last], axis=-1)


def codes_4bit(v: jax.Array, scheme: str) -> jax.Array:
  """Normalized values ``v`` in [-1, 1] -> uint8 codes 0..15 (one per value)."""
  if scheme == "int4":
    return (jnp.round(v * C.QMAX["int4"]) + 8).astype(jnp.uint8)
  bucket = jnp.zeros(v.shape, jnp.uint8)
  for m in C.midpoints(scheme):        # 15 compares, fused into one elementwise pass
    bucket = bucket + (v > m).astype(jnp.uint8)
  order = C.sorted_order(scheme)
  if np.array_equal(order, np.arange(16)):
    return bucket
  return lookup(order, bucket.astype(jnp.int32))


def codes_int8(xb: jax.Array, am: jax.Array) -> jax.Array:
  v = divide(xb, _safe(am)[..., None])
  return jnp.clip(jnp.round(v * C.QMAX["int8"]), -127, 127).astype(jnp.int8)


def codes_int4(xb: jax.Array, am: jax.Array) -> jax.Array:
  return codes_4bit(divide(xb, _safe(am)[..., None]), "int4")


def pack(codes: jax.Array) -> jax.Array:
  """uint8 codes ``[..., bs]`` -> ``[..., bs // 2]``: the first (even) code in the high nibble."""
  pairs = codes.reshape(codes.shape[:-1] + (-1, 2))
  return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`pack`: ``[..., bs // 2]`` uint8 -> ``[..., bs]`` codes 0..15."""
  both = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
  return both.reshape(packed.shape[:-1] + (-1,))


def code_values(codes: jax.Array, scheme: str) -> jax.Array:
  """The float32 value of each code: ``table[code]`` (4-bit), the integer itself (int8)."""
  if scheme == "int8":
    return codes.astype(jnp.float32)
  # One gather per byte from a [256, 2] table of both nibbles' values (high
  # nibble first) is already in element order: no unpack-and-interleave pass.
  return lookup(C.PAIR_TABLES[scheme], codes.astype(jnp.int32)).reshape(
      codes.shape[:-1] + (-1,))


def step(absmax: jax.Array, scheme: str) -> jax.Array:
  """What one unit of :func:`code_values` is worth per block: ``absmax`` (int8: ``absmax * (1/127)``).

  One multiply per value (``code_values * step``) leaves XLA nothing to
  reassociate, so eager and jitted dequantization agree bit for bit.
  """
  if scheme == "int8":
    return absmax * np.float32(1.0 / C.QMAX["int8"])
  return absmax


def double_quantize(am: jax.Array, offset: jax.Array | None = None):
  """bitsandbytes' double quantization of the absmax ``[*lead, nb]`` float32.

  ``offset = mean(absmax)`` per slice; ``absmax - offset`` is cut into blocks
  of 256, each scaled by its own float32 absmax and coded with the signed
  8-bit dynamic map through bitsandbytes' 65536-point lookup grid.

  Returns ``(qscales: [*lead, nb] uint8, nested: [*lead, ceil(nb/256)] float32,
  offset: [*lead] float32)``. ``offset`` may be given (to reproduce a state
  computed elsewhere); by default it is :func:`mean`, which can differ from
  torch's mean in the last bits.
  """
  nb = am.shape[-1]
  if offset is None:
    offset = mean(am)
  y = am - offset[..., None]
  yb = to_blocks(y, NESTED_BLOCK)
  a2 = jnp.max(jnp.abs(yb), axis=-1)
  v = jnp.clip(rounded(yb * (1.0 / _safe(a2))[..., None]), -1.0, 1.0)
  j = jnp.floor(rounded(((v + 1.0) * 0.5) * 65535.0) + 0.5)
  j = jnp.clip(j, 0, 65535).astype(jnp.int32)
  q = lookup(C.dynamic_lut(), j)
  q = jnp.where((a2 > 0)[..., None], q, jnp.zeros_like(q))     # bitsandbytes: 0/0 -> code 0
  q = q.reshape(q.shape[:-2] + (-1,))[..., :nb]
  return q, a2, offset


def pairwise_sum(x: jax.Array) -> jax.Array:
  """float32 sum over the last axis in a fixed pairwise order (zero-padded to a power of two).

  The order does not depend on the leading axes, the backend or XLA's
  reduction strategy, so a layer quantized alone or inside a stack gets the
  same bits.
  """
  n = x.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()
  if size != n:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def mean(am: jax.Array) -> jax.Array:
  """float32 ``sum / n`` over the last axis (a true division, as torch's mean).

  The barrier keeps XLA from recomputing the mean inside a consumer's fusion,
  so the offset stored is the one used. torch sums in another order (which
  depends on the machine), so bitsandbytes' mean can differ from this one in
  the last bits.
  """
  return jax.lax.optimization_barrier(divide(pairwise_sum(am), jnp.float32(am.shape[-1])))


def dequantize_scales(q: jax.Array, nested: jax.Array, offset: jax.Array) -> jax.Array:
  """Inverse of :func:`double_quantize`: ``dynamic_map[q] * nested_b + offset``, float32 ``[*lead, nb]``."""
  nb = q.shape[-1]
  vals = to_blocks(lookup(C.dynamic_map(), q.astype(jnp.int32)), NESTED_BLOCK)
  am = rounded(vals * nested[..., None]).reshape(vals.shape[:-2] + (-1,))[..., :nb]
  return am + offset[..., None]
