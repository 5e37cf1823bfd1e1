"""PEFT's ``adapter_model.safetensors``: its keys, reading it safely, grouping keys by module.

Keys and layouts (PyTorch ``[out, in]`` weights, jlora ``a: [in, r]``, ``b: [r, out]``)::

  base_model.model.<module>.lora_A.weight           [r, in]    a = A.T
  base_model.model.<module>.lora_B.weight           [out, r]   b = B.T
  base_model.model.<module>.lora_embedding_A        [r, vocab] a = A.T  (Embed)
  base_model.model.<module>.lora_embedding_B        [dim, r]   b = B.T
  base_model.model.<module>.lora_magnitude_vector   [out]      DoRA magnitude

Only this file and ``adapter_config.json`` are ever read (safetensors and
JSON: no pickle, no ``torch.load``); its header is checked before any data.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import jax
import numpy as np

from jlora.errors import FormatError, short

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# key suffix -> role; linear and embedding layers use different names.
SUFFIXES = {
    "lora_A.weight": ("A", "dense"), "lora_B.weight": ("B", "dense"),
    "lora_embedding_A": ("A", "embed"), "lora_embedding_B": ("B", "embed"),
    "lora_magnitude_vector": ("magnitude", None), "lora_magnitude_vector.weight": ("magnitude", None),
    "base_layer.weight": ("base", None),
}


def read_tensors(directory: str | os.PathLike) -> dict[str, jax.Array]:
  """Reads ``adapter_model.safetensors`` (and nothing else) as ``{key: array}``.

  Raises a ValueError naming the file when it is truncated or corrupt, and
  when the directory only has a pickled ``adapter_model.bin``.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), rank=4)
    >>> jlora.peft.save(out, {"lm_head": {"kernel": lora}})
    >>> sorted(read_tensors(out))
    ['base_model.model.lm_head.lora_A.weight', 'base_model.model.lm_head.lora_B.weight']
  """
  from safetensors import SafetensorError
  from safetensors.flax import load_file
  d = os.fspath(directory)
  path = os.path.join(d, WEIGHTS_NAME)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(d, "adapter_model.bin")):
      raise FormatError(f"{short(d)} has only a pickled adapter_model.bin; jlora reads safetensors only "
                       "(never pickle): re-save it from PEFT with safe_serialization=True")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {short(d)}")
  _check_header(path)
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                      f"{short(str(e), 300)}") from None


MAX_KEY_LENGTH = 1024
MAX_KEYS = 100_000
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_header(path: str) -> None:
  """Names, count and dtypes of the file's tensors, from its header alone (no data read)."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      keys = list(f.keys())
      if len(keys) > MAX_KEYS:
        raise FormatError(f"{short(path)}: {len(keys):,} tensors; a LoRA adapter has at most "
                          f"{MAX_KEYS:,}")
      for k in keys:
        if len(k) > MAX_KEY_LENGTH:
          raise FormatError(f"{short(path)}: tensor name {short(k, 100)} is {len(k):,} "
                            f"characters long (at most {MAX_KEY_LENGTH})")
        dtype = f.get_slice(k).get_dtype()
        if dtype not in FLOAT_DTYPES:
          raise FormatError(f"{short(path)}: tensor {short(k)} has dtype {dtype}; LoRA weights "
                            f"are floating point {FLOAT_DTYPES}")
  except FormatError:
    raise
  except Exception as e:  # noqa: BLE001 (safetensors raises its own and builtin kinds)
    raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                      f"{short(str(e), 300)}") from None


def split_keys(tensors: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, Any]]]:
  """Groups file keys by module: ``{hf_name: {role: (key, tensor)}}``.

  Roles: "A", "B", "magnitude", "base"; each also records whether it came
  from a linear or an embedding key. Unknown keys raise, naming them.

  Example:
    >>> parts = split_keys({"base_model.model.lm_head.lora_A.weight": np.ones((4, 16))})
    >>> parts["lm_head"]["A"][0], parts["lm_head"]["A"][2]
    ('base_model.model.lm_head.lora_A.weight', 'dense')
  """
  out: dict = collections.defaultdict(dict)
  unknown = []
  for key, t in tensors.items():
    if not key.startswith(PREFIX):
      unknown.append(key)
      continue
    rest = key[len(PREFIX):]
    for suffix, (role, kind) in SUFFIXES.items():
      if rest.endswith("." + suffix):
        name = rest[:-len(suffix) - 1]
        if role in out[name]:
          raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} has two {role} tensors "
                           f"({out[name][role][0]!r} and {short(key)})")
        out[name][role] = (key, t, kind)
        break
    else:
      unknown.append(key)
  if unknown:
    raise FormatError(f"{WEIGHTS_NAME}: keys jlora does not understand (only LoRA A/B, "
                     f"DoRA magnitudes and embedding base copies are supported): {sorted(unknown)[:8]}"
                     + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
  return dict(out)


def module_tensors(name: str, lo: Any, layer: int | None) -> dict[str, np.ndarray]:
  """PEFT's tensors of one module ``name`` from a LoRA node (host NumPy arrays; ``layer``
  picks one layer of a stacked node).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> lo = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), rank=4)
    >>> {k: v.shape for k, v in module_tensors("fc", lo, None).items()}
    {'base_model.model.fc.lora_A.weight': (4, 16), 'base_model.model.fc.lora_B.weight': (24, 4)}
  """
  pick = (lambda x: x) if layer is None else (lambda x: x[layer])
  r = lo.a.shape[-1]
  A = pick(lo.a).reshape(-1, r).T        # [r, in]
  B = pick(lo.b).reshape(r, -1).T        # [out, r]
  stem = PREFIX + name
  names = ("lora_embedding_A", "lora_embedding_B") if lo.kind == "embed" else (
      "lora_A.weight", "lora_B.weight")
  out = {f"{stem}.{names[0]}": host(A), f"{stem}.{names[1]}": host(B)}
  if lo.magnitude is not None:
    out[f"{stem}.lora_magnitude_vector"] = host(pick(lo.magnitude).reshape(-1))
  return out


def host(x) -> np.ndarray:
  """``x`` as a contiguous host NumPy array."""
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))
