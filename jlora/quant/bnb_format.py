"""bitsandbytes 4-bit weights as transformers serializes them, both ways.

A ``bitsandbytes.nn.Linear4bit`` saved under the name ``<m>`` writes
(``Linear4bit._save_to_state_dict`` -> ``QuantState.as_dict(packed=True)``):

  <m>.weight                        uint8 [ceil(out·in / 2), 1]  packed codes
  <m>.weight.absmax                 float32 [nb]; uint8 [nb] when double-quantized
  <m>.weight.quant_map              float32 [16]                 the code book
  <m>.weight.nested_absmax          float32 [ceil(nb / 256)]     (double quant only)
  <m>.weight.nested_quant_map       float32 [256]                (double quant only)
  <m>.weight.quant_state.bitsandbytes__nf4 (or __fp4)
                                    uint8 JSON: quant_type, blocksize, dtype,
                                    shape [out, in], and with double quant
                                    nested_blocksize, nested_dtype, nested_offset

The PyTorch weight is ``[out, in]``; jlora's :class:`QArray` holds the same
bits as a Flax kernel ``[in, out]`` (its ``matrix_shape``), so nothing is
re-quantized either way.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from jlora.quant import codebooks as C
from jlora.quant.blockwise import NESTED_BLOCK, num_blocks
from jlora.quant.qarray import QArray
from jlora.errors import FormatError, short

STATE_KEY = ".quant_state.bitsandbytes__"
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_DTYPES = ("float32", "float16", "bfloat16")


def to_bnb(q: QArray, name: str = "weight") -> dict[str, np.ndarray]:
  """The tensors bitsandbytes would save for a 2-D NF4/FP4 kernel ``q`` (``[in, out]``), keyed ``name...``.

  Example:
    >>> import jax.numpy as jnp
    >>> from jlora.quant import quantize_array
    >>> t = to_bnb(quantize_array(jnp.ones((64, 32))), "lin.weight")     # kernel [in, out]
    >>> t["lin.weight"].shape, t["lin.weight.absmax"].dtype, sorted(t)[-1]
    ((1024, 1), dtype('uint8'), 'lin.weight.quant_state.bitsandbytes__nf4')
  """
  _check_exportable(q, name)
  rows, cols = q.matrix_shape
  n = rows * cols
  out = {name: np.asarray(q.codes).reshape(-1)[:(n + 1) // 2].reshape(-1, 1),
         f"{name}.absmax": np.asarray(q.scales),
         f"{name}.quant_map": C.TABLES[q.scheme].copy()}
  state = {"quant_type": q.scheme, "blocksize": int(q.block_size),
           "dtype": np.dtype(q.dtype).name, "shape": [cols, rows]}
  if q.double_quant:
    out[f"{name}.nested_absmax"] = np.asarray(q.nested_scales)
    out[f"{name}.nested_quant_map"] = C.dynamic_map().copy()
    state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32",
                 nested_offset=float(np.asarray(q.offset)))
  out[f"{name}{STATE_KEY}{q.scheme}"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
  return out


def _check_exportable(q: QArray, name: str) -> None:
  if q.lead_shape:
    raise FormatError(f"{name}: bitsandbytes stores one 2-D weight per tensor; this QArray has "
                     f"shape {list(q.shape)} (export each q[i] of a stacked kernel separately)")
  if q.scheme not in C.BNB_SCHEMES:
    raise FormatError(f"{name}: bitsandbytes 4-bit supports {C.BNB_SCHEMES}, not {q.scheme!r}")
  if q.block_size not in BNB_BLOCK_SIZES:
    raise FormatError(f"{name}: bitsandbytes accepts block sizes {BNB_BLOCK_SIZES}, got {q.block_size}")
  if np.dtype(q.dtype).name not in BNB_DTYPES:
    raise FormatError(f"{name}: bitsandbytes 4-bit weights are {BNB_DTYPES}, not {np.dtype(q.dtype)}")


def _state(tensors: Mapping[str, Any], name: str) -> tuple[str, dict]:
  keys = [k for k in tensors if k.startswith(name + STATE_KEY)]
  if len(keys) != 1:
    raise FormatError(f"{short(name)}: expected one '{short(name)[1:-1]}{STATE_KEY}<nf4|fp4>' "
                      f"entry, found {len(keys)}")
  raw = np.asarray(tensors[keys[0]])
  if raw.dtype != np.uint8 or raw.size > 1 << 16:
    raise FormatError(f"{short(keys[0])}: the quant state must be a JSON blob in a uint8 tensor "
                      f"of at most 64 KiB, got {raw.dtype}[{raw.size}]")
  try:
    st = json.loads(np.ascontiguousarray(raw).tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
    raise FormatError(f"{short(keys[0])}: the quant state is not valid JSON "
                      f"({short(str(err), 100)})") from None
  _check_state(st, keys[0])
  return keys[0], st


def _check_state(st, key: str) -> None:
  """The fields of a quant state that decide the numbers, each checked with its expected values."""
  def bad(field, want):
    value = st.get(field) if isinstance(st, dict) else st
    raise FormatError(f"{short(key)}: quant state {field}={short(value, 60)} (expected {want})")
  if not isinstance(st, dict):
    bad("(the state)", "a JSON object")
  if st.get("quant_type") not in C.BNB_SCHEMES:
    bad("quant_type", f"one of {C.BNB_SCHEMES}")
  if st.get("blocksize") not in BNB_BLOCK_SIZES or isinstance(st.get("blocksize"), bool):
    bad("blocksize", f"one of {BNB_BLOCK_SIZES}")
  if st.get("dtype") not in BNB_DTYPES:
    bad("dtype", f"one of {BNB_DTYPES}: the dtype 4-bit weights dequantize to")
  shape = st.get("shape")
  if not (isinstance(shape, list) and len(shape) == 2 and
          all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 1 << 31 for d in shape)):
    bad("shape", "[out, in], two positive ints")
  if "nested_offset" in st:
    off = st["nested_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, float)) or not np.isfinite(off):
      bad("nested_offset", "a finite number")
    if st.get("nested_blocksize", NESTED_BLOCK) != NESTED_BLOCK:
      bad("nested_blocksize", f"{NESTED_BLOCK} (bitsandbytes' default; others are not supported)")
    if st.get("nested_dtype", "float32") != "float32":
      bad("nested_dtype", "float32")


def _tensor(tensors: Mapping[str, Any], key: str, dtypes: tuple, size: int | None = None):
  if key not in tensors:
    raise FormatError(f"{short(key)} is missing (a bitsandbytes 4-bit weight needs it)")
  x = np.asarray(tensors[key])
  if x.dtype.name not in dtypes or (size is not None and x.size != size):
    raise FormatError(f"{short(key)} is {x.dtype}{list(x.shape)}, expected "
                      f"{' or '.join(dtypes)} with {size if size is not None else 'any'} elements")
  return x


def _same(a, b) -> bool:
  a = np.asarray(a, np.float32).reshape(-1)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def from_bnb(tensors: Mapping[str, Any], name: str = "weight") -> QArray:
  """Builds the QArray (a Flax kernel ``[in, out]``) from bitsandbytes' tensors for ``name``.

  ``tensors`` maps the keys listed in the module docstring to arrays (NumPy,
  or anything ``np.asarray`` reads). Every field and tensor is checked
  against the others before anything is built; a FormatError names the first
  that is wrong, including layouts jlora does not reproduce bit for bit
  (custom code books, other nested block sizes, a non-float ``dtype``).
  """
  _, st = _state(tensors, name)
  scheme, bs = st["quant_type"], st["blocksize"]
  out_f, in_f = st["shape"]
  n, nb = out_f * in_f, num_blocks(out_f * in_f, bs)
  if not _same(_tensor(tensors, f"{name}.quant_map", ("float32",), 16), C.TABLES[scheme]):
    raise FormatError(f"{short(name)}: quant_map is not bitsandbytes' {scheme} table")
  packed = _tensor(tensors, name, ("uint8",), (n + 1) // 2).reshape(-1)
  zero = int(np.argmin(np.abs(C.TABLES[scheme])))      # pad with the code of 0, as quantizing does
  codes = np.full(nb * bs // 2, (zero << 4) | zero, np.uint8)
  codes[:packed.size] = packed
  nested = offset = None
  if "nested_offset" in st:
    scales = _tensor(tensors, f"{name}.absmax", ("uint8",), nb)
    if not _same(_tensor(tensors, f"{name}.nested_quant_map", ("float32",), 256), C.dynamic_map()):
      raise FormatError(f"{short(name)}: nested_quant_map is not bitsandbytes' dynamic map")
    nested = _tensor(tensors, f"{name}.nested_absmax", ("float32",), -(-nb // NESTED_BLOCK))
    offset = np.asarray(st["nested_offset"], np.float32)
  else:
    scales = _tensor(tensors, f"{name}.absmax", ("float32",), nb)
  return QArray(codes.reshape(nb, bs // 2), scales.reshape(nb), nested, offset, scheme=scheme,
                block_size=bs, matrix_shape=(in_f, out_f), dtype=np.dtype(_dtype(st["dtype"])))


def _dtype(name: str):
  import ml_dtypes
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def save_safetensors(path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
  """Writes ``{name: QArray | array}`` as transformers would: QArrays under their bitsandbytes keys.

  Plain arrays are written as they are (so give PyTorch layouts, e.g. ``[out, in]``).

  Example:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from jlora.quant import quantize_array
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save_safetensors(path, {"lin.weight": quantize_array(jnp.ones((64, 32))),
    ...                         "lin.bias": np.zeros(32, np.float32)})
    >>> {k: type(v).__name__ for k, v in sorted(load_safetensors(path).items())}
    {'lin.bias': 'ndarray', 'lin.weight': 'QArray'}
  """
  from safetensors.numpy import save_file
  flat = {}
  for name, x in tensors.items():
    flat.update(to_bnb(x, name) if isinstance(x, QArray) else {name: np.asarray(x)})
  save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path),
            metadata=dict(metadata or {"format": "pt"}))


def load_safetensors(path) -> dict[str, Any]:
  """Reads a safetensors file: ``{name: QArray}`` for each bitsandbytes 4-bit weight, arrays otherwise.

  The QArray of ``"<m>.weight"`` is the Flax kernel ``[in, out]``; other
  arrays keep the file's (PyTorch) layout.
  """
  from safetensors.numpy import load_file
  return split_bnb(load_file(str(path)))


def split_bnb(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Groups a flat state dict: bitsandbytes weights become QArrays, other entries pass through."""
  names = [k.split(STATE_KEY)[0] for k in tensors if STATE_KEY in k]
  out = {name: from_bnb(tensors, name) for name in names}
  owned = {k for k in tensors for name in names if k == name or k.startswith(name + ".")}
  out.update({k: v for k, v in tensors.items() if k not in owned})
  return out
