"""Lazy, validated access to safetensors checkpoints (single file or sharded index).

Only safetensors and JSON are ever read: never pickle. Files are opened with
``safetensors.safe_open`` (memory-mapped); a tensor's bytes are copied only
when :meth:`Checkpoint.read` asks for it (or for a slice of it).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora.errors import FormatError, short


SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


MAX_JSON_BYTES = 64 << 20
"""Largest JSON file (config, index) read; real ones are kilobytes."""


def read_json(path: str) -> dict:
  """Parses a JSON object file, with errors that name it (FormatError)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  size = os.path.getsize(path)
  if size > MAX_JSON_BYTES:
    raise FormatError(f"{path}: {size:,} bytes is too large for a JSON config "
                      f"(at most {MAX_JSON_BYTES:,})")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FormatError(f"{path}: not valid JSON ({short(str(e), 200)})") from None
  except RecursionError:
    raise FormatError(f"{path}: not valid JSON (nested too deeply)") from None
  if not isinstance(data, dict):
    raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _host_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend configured: read onto the default device
    return None


class Checkpoint:
  """An open safetensors checkpoint: ``names``, ``shape``, ``dtype``, ``read``.

  Use as a context manager (``with open_checkpoint(d) as ckpt:``); the files
  stay memory-mapped until it closes.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._files = _weight_map(directory)        # tensor name -> file name (None: single file)
    self._stack = contextlib.ExitStack()
    self._handles = {}
    try:
      files = [SINGLE] if self._files is None else sorted(set(self._files.values()))
      for fname in files:
        self._handles[fname] = self._stack.enter_context(_open(os.path.join(directory, fname)))
      if self._files is None:
        self._files = {n: SINGLE for n in self._handles[SINGLE].keys()}
      else:
        self._check_index()
    except BaseException:
      self._stack.close()
      raise

  def _check_index(self):
    for fname, f in self._handles.items():
      have = set(f.keys())
      for name, where in self._files.items():
        if where == fname and name not in have:
          raise FormatError(f"{os.path.join(self.directory, INDEX)} maps tensor {short(name)} to "
                           f"{fname}, which does not contain it")

  def __enter__(self) -> "Checkpoint":
    return self

  def __exit__(self, *exc):
    self._stack.close()

  def close(self):
    self._stack.close()

  @property
  def names(self) -> set[str]:
    return set(self._files)

  def file_of(self, name: str) -> str:
    return os.path.join(self.directory, self._files[name])

  def _slice(self, name: str):
    return self._handles[self._files[name]].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype string ("BF16", "F32", ...)."""
    return self._slice(name).get_dtype()

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor (or ``tensor[index]``) as a host NumPy array, in its stored dtype."""
    try:
      with jax.default_device(_host_device()):
        x = self._slice(name)[index] if index is not None else \
            self._handles[self._files[name]].get_tensor(name)
      return np.asarray(x)
    except Exception as e:  # safetensors raises its own error types
      raise FormatError(f"cannot read tensor {short(name)} from {self.file_of(name)}: {e}") from None


def _open(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  try:
    return safe_open(path, framework="flax")
  except Exception as e:
    raise FormatError(f"{path} is not a valid safetensors file "
                     f"(truncated, or a header that disagrees with the data?): {e}") from None


def _weight_map(directory: str) -> dict[str, str] | None:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    wmap = read_json(index).get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
      raise FormatError(f"{index} has no 'weight_map' object of tensor name -> file")
    for name, fname in wmap.items():
      if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
        raise FormatError(f"{index}: tensor {short(name)} maps to {short(fname)}, which is not a file "
                         "name in the checkpoint directory")
    return dict(wmap)
  if os.path.exists(os.path.join(directory, SINGLE)):
    return None  # one file: its keys are read once it is open
  pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  hint = (f" (found {pickled[0]}: pickle checkpoints are never loaded; convert it to "
          "safetensors first)") if pickled else ""
  raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory}{hint}")


def open_checkpoint(directory: str) -> Checkpoint:
  """Opens the safetensors checkpoint in ``directory`` (single file or sharded).

  Example:
      with open_checkpoint(path) as ckpt:
        w = ckpt.read("model.norm.weight")
  """
  return Checkpoint(os.fspath(directory))


def write_checkpoint(directory: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                     max_shard_size: int | None = None,
                     metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes ``(name, array)`` pairs as ``model.safetensors`` or as shards plus an index.

  With ``max_shard_size`` (bytes), tensors go in order into
  ``model-0000k-of-0000n.safetensors`` files of at most that size (a larger
  tensor gets a file of its own) and ``model.safetensors.index.json`` maps
  names to files, as Hugging Face writes them. Only one shard is held in
  memory at a time when ``tensors`` is a generator.

  Returns:
    The file names written (shards, then the index).
  """
  os.makedirs(directory, exist_ok=True)
  meta = dict(metadata or {"format": "pt"})
  shards, current, size, total = [], {}, 0, 0
  for name, arr in tensors:
    arr = np.ascontiguousarray(arr)
    if max_shard_size is not None and current and size + arr.nbytes > max_shard_size:
      shards.append(_flush(directory, current, len(shards), meta))
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
    total += arr.nbytes
  if max_shard_size is None:
    save_file(current, os.path.join(directory, SINGLE), metadata=meta)
    return [SINGLE]
  shards.append(_flush(directory, current, len(shards), meta))
  n = len(shards)
  weight_map, written = {}, []
  for k, (tmp, names) in enumerate(shards):
    final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
    weight_map.update({name: final for name in names})
    written.append(final)
  with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return written + [INDEX]


def _flush(directory, tensors, k, meta):
  tmp = f"model-{k + 1:05d}.safetensors.tmp"   # renamed once the shard count is known
  save_file(tensors, os.path.join(directory, tmp), metadata=meta)
  return tmp, list(tensors)
