"""What a restored ``LoRA`` or ``QArray`` must satisfy before jlora hands it out.

The checksum of ``jlora.json`` catches damage; these checks catch a manifest
that is well-formed but describes numbers jlora would compute wrongly (a rank
of 0, an infinite alpha, codes that do not fit the shape), whoever wrote it.
Each check returns None or the reason, naming the field and what was expected.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jlora.errors import short

LORA_KINDS = ("dense", "einsum", "embed", "conv")


def _int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _float_dtype(x) -> bool:
  import jax.numpy as jnp
  return x is None or bool(jnp.issubdtype(x.dtype, jnp.floating))


def check_lora(lo) -> str | None:
  """Why the LoRA node ``lo`` is not one jlora computes with, or None."""
  if not _int(lo.rank) or lo.rank <= 0:
    return f"rank={short(lo.rank, 40)} (expected a positive int)"
  if isinstance(lo.alpha, bool) or not isinstance(lo.alpha, (int, float)) or \
      not math.isfinite(lo.alpha):
    return f"alpha={short(lo.alpha, 40)} (expected a finite number)"
  if not isinstance(lo.rslora, bool):
    return f"rslora={short(lo.rslora, 40)} (expected true or false)"
  if isinstance(lo.dropout, bool) or not isinstance(lo.dropout, (int, float)) or \
      not 0 <= lo.dropout < 1:
    return f"dropout={short(lo.dropout, 40)} (expected a number in [0, 1))"
  if lo.kind not in LORA_KINDS:
    return f"kind={short(lo.kind, 40)} (expected one of {LORA_KINDS})"
  a, b, m = lo.a, lo.b, lo.magnitude
  if not all(hasattr(x, "shape") for x in (a, b)) or (m is not None and not hasattr(m, "shape")):
    return "a, b and magnitude must be arrays"
  if not (_float_dtype(a) and _float_dtype(b) and _float_dtype(m)):
    return (f"a, b, magnitude have dtypes {a.dtype}, {b.dtype}, "
            f"{None if m is None else m.dtype} (expected floating point)")
  s = lo.stack
  if not _int(s) or not 0 <= s <= a.ndim - 2 or b.ndim < s + 2:
    return f"stack={short(s, 40)} does not fit a: {list(a.shape)}, b: {list(b.shape)}"
  ins, outs = lo.in_axes, lo.out_axes
  if not (isinstance(ins, tuple) and isinstance(outs, tuple) and all(map(_int, ins + outs))):
    return f"in_axes={short(ins, 40)}, out_axes={short(outs, 40)} (expected tuples of ints)"
  if len(ins) != a.ndim - s - 1 or len(outs) != b.ndim - s - 1 or \
      sorted(ins + outs) != list(range(len(ins) + len(outs))):
    return (f"in_axes={ins}, out_axes={outs} do not describe a: {list(a.shape)}, "
            f"b: {list(b.shape)} with stack={s}")
  if a.shape[:s] != b.shape[:s] or a.shape[-1] != b.shape[s]:
    return f"a: {list(a.shape)} and b: {list(b.shape)} disagree on stack or rank"
  if lo.rank > a.shape[-1]:
    return f"rank={lo.rank} is more than a's {a.shape[-1]} columns"
  if m is not None and tuple(m.shape) != tuple(a.shape[:s]) + tuple(b.shape[s + 1:]):
    return f"magnitude: {list(m.shape)} does not match b: {list(b.shape)}"
  return None


def check_qarray(q) -> str | None:
  """Why the QArray ``q`` is not one jlora dequantizes correctly, or None."""
  from jlora.quant import codebooks as C
  from jlora.quant.qarray import check_scheme, num_blocks_of
  try:
    check_scheme(q.scheme, q.block_size)
  except ValueError as err:
    return short(str(err), 160)
  ms = q.matrix_shape
  if not (isinstance(ms, tuple) and len(ms) == 2 and all(_int(d) and d > 0 for d in ms)):
    return f"matrix_shape={short(ms, 40)} (expected two positive ints)"
  import jax.numpy as jnp
  try:
    if not jnp.issubdtype(q.dtype, jnp.floating):
      raise TypeError
  except TypeError:
    return f"dtype={short(q.dtype, 40)} (expected a floating-point dtype)"
  codes, scales = q.codes, q.scales
  nb = num_blocks_of(ms, q.block_size)
  width = q.block_size // 2 if C.bits(q.scheme) == 4 else q.block_size
  lead = tuple(codes.shape[:-2])
  if tuple(codes.shape[-2:]) != (nb, width) or tuple(scales.shape) != lead + (nb,):
    return (f"codes: {list(codes.shape)}, scales: {list(scales.shape)} do not fit "
            f"{list(ms)} in blocks of {q.block_size} (expected codes [..., {nb}, {width}], "
            f"scales [..., {nb}])")
  want_codes = np.uint8 if C.bits(q.scheme) == 4 else np.int8
  if np.dtype(codes.dtype) != want_codes:
    return f"codes have dtype {codes.dtype} (expected {np.dtype(want_codes).name})"
  if q.nested_scales is None:
    if q.offset is not None or np.dtype(scales.dtype) != np.float32:
      return f"scales have dtype {scales.dtype} (expected float32 without nested scales)"
  elif (np.dtype(scales.dtype) != np.uint8 or q.offset is None
        or tuple(q.nested_scales.shape) != lead + (-(-nb // 256),)
        or tuple(q.offset.shape) != lead):
    return "double-quantized scales, nested scales and offset do not fit together"
  return None


def check_bank_node(node) -> str | None:
  """Why a restored bank entry (``BankLoRA``) is not one jlora computes with, or None."""
  a, b, scale, ranks = node.a, node.b, node.scale, node.ranks
  if not all(hasattr(x, "shape") for x in (a, b, scale, ranks)):
    return "a, b, scale and ranks must be arrays"
  if not (_float_dtype(a) and _float_dtype(b) and _float_dtype(scale)) or \
      not jnp.issubdtype(ranks.dtype, jnp.integer):
    return "a, b and scale must be floating point and ranks integer"
  n = a.shape[0] if a.ndim else -1
  if a.ndim < 3 or b.ndim < 3 or b.shape[0] != n or tuple(scale.shape) != (n,) or \
      tuple(ranks.shape) != (n,) or a.shape[-1] != b.shape[1 + node.stack]:
    return f"a: {list(a.shape)}, b: {list(b.shape)}, scale, ranks do not fit one bank"
  if not np.all(np.isfinite(np.asarray(scale))) or np.any(np.asarray(ranks) < 0) or \
      np.any(np.asarray(ranks) > a.shape[-1]):
    return "scale must be finite and each rank within [0, R]"
  return None


def check_node(node) -> str | None:
  """``check_lora`` / ``check_qarray`` / ``check_bank_node`` for those classes; None for others."""
  from jlora.bank import BankLoRA
  from jlora.lora import LoRA
  from jlora.quant.qarray import QArray
  if isinstance(node, LoRA):
    return check_lora(node)
  if isinstance(node, QArray):
    return check_qarray(node)
  if isinstance(node, BankLoRA):
    return check_bank_node(node)
  return None
