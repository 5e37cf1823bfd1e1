"""QArray: a quantized array as a pytree of codes, per-block scales and static metadata."""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora.quant import blockwise as B
from jlora.quant import codebooks as C


def _static(**kw):
  return dataclasses.field(kw_only=True, metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A blockwise-quantized array ``[*lead, rows, cols]`` (a Flax kernel layout).

  Each slice ``[rows, cols]`` over the leading axes is quantized on its own,
  as PyTorch would quantize ``kernel.T`` (``[out, in]``, flattened row-major)
  — so a 2-D ``[in, out]`` kernel is exactly bitsandbytes' 4-bit layout, and a
  scanned layer stack ``[L, in, out]`` is L independent bitsandbytes tensors.
  Every child carries the leading axes, so slicing all children along axis 0
  (``q[i]``, ``nn.scan``, ``vmap``) gives a valid per-layer QArray.

  Children (``nb = ceil(rows * cols / block_size)`` blocks per slice):
    codes: ``[*lead, nb, block_size // 2]`` uint8, two 4-bit codes per byte
      (the first in the high nibble); int8: ``[*lead, nb, block_size]`` int8.
    scales: ``[*lead, nb]`` per-block absmax, float32; uint8 codes of the
      dynamic map when double-quantized.
    nested_scales: ``[*lead, ceil(nb / 256)]`` float32, or None.
    offset: ``[*lead]`` float32 mean of the absmax, or None.

  Static: ``scheme`` ("nf4", "fp4", "int4", "int8"), ``block_size``,
  ``matrix_shape`` ``(rows, cols)``, ``dtype`` (the logical dtype).

  Example:
    >>> from jlora.quant import quantize_array
    >>> q = quantize_array(jnp.ones((3, 64, 32)), "nf4")     # 3 stacked [64, 32] kernels
    >>> q.shape, q[0].shape, q.dequantize().shape
    ((3, 64, 32), (64, 32), (3, 64, 32))
  """
  codes: jax.Array
  scales: jax.Array
  nested_scales: jax.Array | None = None
  offset: jax.Array | None = None
  _jlora_node = True  # a leaf for jlora's tree functions (see paths.is_node)
  scheme: str = _static(default="nf4")
  block_size: int = _static(default=64)
  matrix_shape: tuple[int, int] = _static(default=(0, 0))
  dtype: np.dtype = _static(default=np.dtype(np.float32))

  # --- shape ---------------------------------------------------------------
  @property
  def lead_shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape[:-2])

  @property
  def shape(self) -> tuple[int, ...]:
    """Full logical shape ``[*lead, rows, cols]``."""
    return self.lead_shape + tuple(self.matrix_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def double_quant(self) -> bool:
    return self.nested_scales is not None

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: codes + scales + nested statistics."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self))

  def __getitem__(self, idx) -> "QArray":
    """Slices the leading (stacked-layer) axis: ``q[i]`` is layer ``i``."""
    if not self.lead_shape:
      raise IndexError(f"QArray of shape {list(self.shape)} has no leading (stacked) axis to index")
    if not isinstance(idx, (int, np.integer, slice)) and not hasattr(idx, "dtype"):
      raise TypeError(f"QArray indexes only its leading axis with an int or slice, got {idx!r}")
    return jax.tree.map(lambda c: c[idx], self)

  # --- values --------------------------------------------------------------
  def block_scales(self) -> jax.Array:
    """Per-block absmax, float32 ``[*lead, nb]`` (double quantization undone)."""
    return _block_scales(self)

  def dequantize(self, dtype=None) -> jax.Array:
    """The array in its kernel layout ``[*lead, rows, cols]``, in ``dtype`` (default: logical).

    ``table[code] * absmax`` in float32 (as bitsandbytes), then cast: cheap,
    elementwise and fusible into the consumer under ``jit`` (the inner ``jit``
    is inlined there; called eagerly it compiles once per shape).

    Example:
      >>> from jlora.quant import quantize_array
      >>> quantize_array(jnp.ones((64, 32))).dequantize(jnp.bfloat16).dtype
      dtype(bfloat16)
    """
    return _dequantize(self, np.dtype(self.dtype if dtype is None else jnp.dtype(dtype)))

  def astype(self, dtype) -> jax.Array:
    """``dequantize(dtype)``: lets weight math written for arrays read a QArray."""
    return self.dequantize(dtype)

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    try:
      shape = list(self.shape)
    except (AttributeError, TypeError):   # children replaced by non-arrays (tree.map)
      shape = ["?"]
    return (f"QArray({self.scheme}, shape={shape}, block_size={self.block_size}"
            f"{dq}, dtype={np.dtype(self.dtype).name})")


@jax.jit
def _block_scales(q: QArray) -> jax.Array:
  if q.nested_scales is None:
    return q.scales.astype(jnp.float32)
  return B.dequantize_scales(q.scales, q.nested_scales, q.offset)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: QArray, dtype) -> jax.Array:
  rows, cols = q.matrix_shape
  vals = B.code_values(q.codes, q.scheme) * B.step(_block_scales(q), q.scheme)[..., None]
  flat = vals.astype(dtype).reshape(q.lead_shape + (-1,))[..., :rows * cols]
  return jnp.swapaxes(flat.reshape(q.lead_shape + (cols, rows)), -1, -2)


def partition_specs(q: QArray, axis_name) -> QArray:
  """PartitionSpecs that shard ``q``'s blocks along ``axis_name`` (scales follow their codes).

  For a kernel ``[in, out]`` whose ``in`` is a multiple of ``block_size``,
  block ``b`` lies in output feature ``b * block_size // in``, so sharding the
  blocks is sharding the output features (column-parallel). Nested statistics
  are tiny and replicated.
  """
  from jax.sharding import PartitionSpec as P
  lead = (None,) * len(q.lead_shape)
  specs = dict(codes=P(*lead, axis_name, None), scales=P(*lead, axis_name))
  if q.double_quant:
    specs.update(nested_scales=P(*lead, None), offset=P(*lead))
  return dataclasses.replace(q, **specs)


def num_blocks_of(matrix_shape, block_size: int) -> int:
  return B.num_blocks(math.prod(matrix_shape), block_size)


def check_scheme(scheme: str, block_size, path: str = "array") -> None:
  if scheme not in C.SCHEMES:
    raise ValueError(f"{path}: unknown quantization scheme {scheme!r}; expected one of {C.SCHEMES}")
  if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
    raise ValueError(f"{path}: block_size must be a positive int, got {block_size!r}")
  if C.bits(scheme) == 4 and block_size % 2:
    raise ValueError(f"{path}: 4-bit scheme {scheme!r} packs two codes per byte, so block_size "
                     f"must be even, got {block_size}")
