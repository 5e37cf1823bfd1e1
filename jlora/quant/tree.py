"""Quantizing arrays and parameter trees, leaf by leaf; dequantizing; memory accounting."""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.config import HEAD_NAMES
from jlora.quant import blockwise as B
from jlora.quant.qarray import QArray, check_scheme

MIN_SIZE = 4096
"""Default targets skip arrays smaller than this (norms, tiny projections)."""

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@functools.partial(jax.jit, static_argnames=("scheme", "block_size", "double_quant"))
def _quantize(x, scheme: str, block_size: int, double_quant: bool):
  """jit-compiled once per (shape, dtype, scheme, block_size, double_quant)."""
  dtype = x.dtype
  rows, cols = x.shape[-2:]
  lead = x.shape[:-2]
  n = rows * cols
  flat = jnp.swapaxes(x, -1, -2).reshape(lead + (n,)).astype(jnp.float32)
  bad = B.count_bad(flat)
  xb = B.to_blocks(B.flush_subnormals(flat), block_size)
  am = B.block_absmax(xb)
  if scheme == "int8":
    codes = B.codes_int8(xb, am)
  elif scheme == "int4":
    codes = B.pack(B.codes_int4(xb, am))
  else:
    codes = B.pack(B.codes_4bit(B.scale_4bit(xb, am, n), scheme))
    am = B.stored_absmax(am, n, block_size)
  nested = offset = None
  scales = am
  if double_quant:
    scales, nested, offset = B.double_quantize(am)
  q = QArray(codes, scales, nested, offset, scheme=scheme, block_size=block_size,
             matrix_shape=(rows, cols), dtype=np.dtype(dtype))
  return q, bad


def _check_input(x, path: str):
  dtype = getattr(x, "dtype", None)
  if dtype is None or not any(jnp.dtype(dtype) == jnp.dtype(d) for d in FLOAT_DTYPES):
    raise TypeError(f"{path}: only float16, bfloat16, float32 (and float64) arrays can be "
                    f"quantized, got dtype {dtype} of shape {list(getattr(x, 'shape', ()))}")
  if x.ndim < 2:
    raise ValueError(f"{path}: quantization needs an array of 2 or more axes (a kernel "
                     f"[..., in, out]), got shape {list(x.shape)}")
  if 0 in x.shape:
    raise ValueError(f"{path}: cannot quantize an empty array of shape {list(x.shape)}")


def quantize_array(x, scheme: str = "nf4", block_size: int | None = 64,
                   double_quant: bool = True, *, path: str = "array") -> QArray:
  """Quantizes one array ``x: [*lead, rows, cols]`` (a Flax kernel ``[..., in, out]``).

  Each ``[rows, cols]`` slice is transposed (PyTorch's ``[out, in]``),
  flattened row-major and cut into blocks of ``block_size``; the last partial
  block is zero-padded (bitsandbytes' rule), so any size works. NF4/FP4 codes,
  absmax and double-quantization statistics are bit-identical to
  ``bitsandbytes.functional.quantize_4bit`` for each slice.

  Args:
    x: float16, bfloat16 or float32 array of 2 or more axes (float64 is
      quantized through float32).
    scheme: "nf4", "fp4" (bitsandbytes), "int4" (symmetric, codes -7..7) or
      "int8" (symmetric, -127..127).
    block_size: values per absmax block. 4-bit schemes need an even size
      (bitsandbytes itself accepts 32..4096, powers of two). For "int8",
      None means one scale per output feature (``block_size = rows``).
    double_quant: quantize the absmax again (bitsandbytes'
      ``compress_statistics``): 8-bit codes in blocks of 256 plus a mean offset.
    path: name used in error messages.

  Returns:
    A :class:`QArray`. Raises ValueError when ``x`` is concrete and holds NaN,
    ±Inf or |x| ≥ 2^125; under ``jit`` (no eager check) such a block's scale
    becomes NaN, so everything dequantized from it is NaN rather than silently
    wrong.

  Example:
    >>> q = quantize_array(jnp.ones((128, 64)), "nf4", 64)
    >>> q.codes.shape, q.scales.dtype, q.dequantize().shape
    ((128, 32), dtype('uint8'), (128, 64))
  """
  _check_input(x, path)
  if block_size is None and scheme == "int8":
    block_size = int(x.shape[-2])
  check_scheme(scheme, block_size, path)
  q, bad = _quantize(x, scheme, int(block_size), bool(double_quant))
  if not isinstance(bad, jax.core.Tracer) and int(bad):
    raise ValueError(f"{path}: {int(bad)} of {math.prod(x.shape)} values of the array "
                     f"{list(x.shape)} are NaN, ±Inf or too large (|x| ≥ 2^125); "
                     "quantization needs finite weights")
  return q


def _is_float_array(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return (hasattr(x, "shape") and dtype is not None and not isinstance(x, QArray)
          and jnp.issubdtype(dtype, jnp.floating))


def _targeted(path: str, x, targets, min_size: int) -> bool:
  if not _is_float_array(x) or len(x.shape) < 2:
    return False
  mod, _, leaf = path.rpartition(paths.SEP)
  if targets is None:
    return (leaf == "kernel" and math.prod(x.shape) >= min_size
            and mod.rpartition(paths.SEP)[2] not in HEAD_NAMES)
  if isinstance(targets, str):
    rx = re.compile(targets)
    return bool(rx.fullmatch(mod) or rx.fullmatch(path))
  return any(mod == t or mod.endswith(paths.SEP + t) or path == t or path.endswith(paths.SEP + t)
             for t in targets)


def quantize(params: Any, scheme: str = "nf4", block_size: int | None = 64,
             double_quant: bool = True, targets: str | Sequence[str] | None = None, *,
             min_size: int = MIN_SIZE, donate: bool = False) -> Any:
  """Replaces the targeted arrays of ``params`` by :class:`QArray` nodes, one leaf at a time.

  Each leaf goes through :func:`quantize_array` (jit-compiled once per shape),
  so at most one full-precision leaf is being converted at any moment; with
  ``donate=True`` each input ``jax.Array`` is deleted as soon as its QArray
  exists, so a model whose float weights would not fit twice never has to.
  Arrays shared by several paths (tied weights) are quantized once.

  Args:
    params: any parameter tree (nested dict, FrozenDict, NNX State).
    scheme, block_size, double_quant: see :func:`quantize_array`.
    targets: None (default): every ``kernel`` of ≥ 2 axes and ≥ ``min_size``
      values, except output heads (``lm_head``, ``head``, ...), as transformers
      leaves them; a regex that must fully match the module path
      (``"layers_0/attn/q_proj"``) or the parameter path; or a sequence of
      names, matching a module or parameter path equal to a name or ending in
      ``"/" + name``. Non-float leaves and leaves of < 2 axes are never touched.
    min_size: smallest array the default targets quantize.
    donate: delete each quantized input array (the caller gives up ``params``).

  Example:
    >>> params = {"dense": {"kernel": jnp.ones((128, 64)), "bias": jnp.zeros(64)}}
    >>> q = quantize(params, "nf4")
    >>> type(q["dense"]["kernel"]).__name__, q["dense"]["bias"].shape
    ('QArray', (64,))
  """
  check_scheme(scheme, 64 if block_size is None else block_size, "quantize")
  done: dict[int, QArray] = {}

  def one(path, x):
    if not _targeted(path, x, targets, min_size):
      return x
    if id(x) in done:
      return done[id(x)]
    q = quantize_array(x, scheme, block_size, double_quant, path=path)
    if donate and isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      jax.block_until_ready(q)
      x.delete()
    done[id(x)] = q
    return q

  return paths.map_with_path(one, params)


def dequantize(tree: Any, dtype=None) -> Any:
  """Replaces every :class:`QArray` in ``tree`` by its dequantized array (in ``dtype``, default logical).

  Example:
    >>> q = quantize({"d": {"kernel": jnp.ones((128, 64))}})
    >>> dequantize(q)["d"]["kernel"].shape
    (128, 64)
  """
  return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QArray) else x, tree,
                      is_leaf=lambda x: isinstance(x, QArray))


def nbytes(tree: Any) -> int:
  """Bytes held by all arrays of ``tree``; a QArray counts its codes, scales and nested statistics.

  Works on ``jax.ShapeDtypeStruct`` trees too (``jax.eval_shape(quantize, ...)``),
  so a 70B layout can be accounted for without memory.

  Example:
    >>> nbytes({"w": jnp.ones((128, 64), jnp.bfloat16)})
    16384
  """
  total = 0
  for x in jax.tree.leaves(tree):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return int(total)
