"""The array half of a checkpoint: orbax I/O, shardings, checks against a target."""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import numpy as np

from jlora import paths
from jlora.checkpoint import files
from jlora.checkpoint.files import ARRAYS
from jlora.checkpoint.tree_json import ArraySpec, crc32
from jlora.errors import CheckpointError, FormatError, short


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp, ocp.Checkpointer(ocp.StandardCheckpointHandler())


def write_arrays(directory: str, arrays: list) -> None:
  """Writes ``arrays`` as ``directory/arrays`` (orbax), then checks orbax wrote them all.

  orbax logs a warning and returns normally when it skips merging the
  per-process array databases; reading the metadata back catches that
  before anything is swapped into place.
  """
  ocp, ckpt = _checkpointer()
  want = {str(i): (tuple(x.shape), np.dtype(x.dtype)) for i, x in enumerate(arrays)}
  try:
    with files.orbax_path(directory) as where:
      out = os.path.join(where, ARRAYS)
      ckpt.save(out, args=ocp.args.StandardSave({str(i): x for i, x in enumerate(arrays)}))
      files.barrier(f"jlora-arrays-{directory}")
      if files.is_primary():
        _check_written(ocp, out, want, directory)
  finally:
    ckpt.close()


def _check_written(ocp, where: str, want: dict, directory: str) -> None:
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as reader:
      meta = reader.metadata(where).item_metadata
      got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in dict(meta).items()}
  except Exception as err:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
    raise CheckpointError(f"saving to {short(directory)} failed: orbax did not write the arrays "
                          f"readably ({_first_line(err)}); nothing was replaced") from None
  if got != want:
    raise CheckpointError(f"saving to {short(directory)} failed: orbax wrote {len(got)} of "
                          f"{len(want)} arrays; nothing was replaced")


def _as_sharding(s, spec: ArraySpec, default):
  if s is None:
    return default
  if not isinstance(s, jax.sharding.Sharding):
    raise CheckpointError(f"shardings for {spec.path!r} must be a jax.sharding.Sharding or None, "
                    f"got {type(s).__name__}")
  try:
    s.shard_shape(spec.shape)
  except Exception as err:  # noqa: BLE001 (jax raises several kinds)
    raise CheckpointError(f"sharding {s} does not fit {spec.path!r} of shape {list(spec.shape)}: "
                     f"{err}") from None
  return s


def placements(specs: list[ArraySpec], shardings, target) -> list:
  """The sharding each array is restored onto, in ``specs`` order."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if shardings is None and target is not None:
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    by_path = {paths.path_str(kp): getattr(x, "sharding", None) for kp, x in flat}
    chosen = [by_path.get(s.path) for s in specs]
    chosen = [c if isinstance(c, jax.sharding.Sharding) else None for c in chosen]
  elif shardings is None or isinstance(shardings, jax.sharding.Sharding):
    chosen = [shardings] * len(specs)
  elif callable(shardings):
    chosen = [shardings(s.path) for s in specs]
  else:
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    by_path = {paths.path_str(kp): x for kp, x in flat}
    wanted = {s.path for s in specs}
    missing, extra = sorted(wanted - set(by_path)), sorted(set(by_path) - wanted)
    if missing or extra:
      raise CheckpointError(f"shardings do not match the checkpoint's arrays: no sharding for "
                       f"{missing[:3]}; shardings for arrays it lacks: {extra[:3]}")
    chosen = [by_path[s.path] for s in specs]
  return [_as_sharding(c, s, default) for c, s in zip(chosen, specs)]


def check_target(directory: str, specs: list[ArraySpec], target) -> None:
  flat = jax.tree_util.tree_flatten_with_path(target)[0]
  leaves = {paths.path_str(kp): x for kp, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")}
  got = {s.path: s for s in specs}
  missing, extra = sorted(set(leaves) - set(got)), sorted(set(got) - set(leaves))
  if missing or extra:
    raise CheckpointError(f"checkpoint at {short(directory)} does not match target: the target has "
                     f"{missing[:3]} that the checkpoint lacks, the checkpoint has {extra[:3]} "
                     "that the target lacks")
  for path, x in leaves.items():
    spec = got[path]
    if tuple(x.shape) != spec.shape or np.dtype(x.dtype) != spec.dtype:
      raise CheckpointError(f"checkpoint at {short(directory)} does not match target at {path!r}: "
                       f"checkpoint {spec.dtype}{list(spec.shape)}, target "
                       f"{np.dtype(x.dtype)}{list(x.shape)}")


def like(target, tree, directory: str):
  """``tree`` in ``target``'s containers (e.g. FrozenDict); nodes must agree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=paths.is_node)
  restored = paths.flatten(tree)
  leaves = []
  for keypath, want in flat:
    path = paths.path_str(keypath)
    got = restored.get(path)
    if got is None or (paths.is_node(want) and jax.tree.structure(want) != jax.tree.structure(got)):
      raise CheckpointError(f"checkpoint at {short(directory)} does not match target at {path!r}: "
                       f"checkpoint {jax.tree.structure(got)}, target {jax.tree.structure(want)}")
    leaves.append(got)
  if len(leaves) != len(restored):
    raise CheckpointError(f"checkpoint at {short(directory)} has more leaves than the target "
                     f"({len(restored)} vs {len(leaves)})")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def read_arrays(directory: str, specs: list[ArraySpec], placements: list, verify: bool):
  if not specs:
    return []
  arrays_dir = os.path.join(directory, ARRAYS)
  where = f"corrupted jlora checkpoint at {short(directory)}"
  if not os.path.isdir(arrays_dir):
    raise FormatError(f"{where}: its {ARRAYS}/ directory is missing")
  abstract = {str(s.index): jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p)
              for s, p in zip(specs, placements)}
  ocp, ckpt = _checkpointer()
  try:
    with files.orbax_path(directory) as alias:
      _check_stored(ckpt, os.path.join(alias, ARRAYS), specs, where)
      out = ckpt.restore(os.path.join(alias, ARRAYS), args=ocp.args.StandardRestore(abstract))
  except CheckpointError:
    raise
  except Exception as err:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
    which, why = _unreadable(err, specs)
    raise FormatError(f"{where}: {which} in {ARRAYS}/ could not be read ({why})") from None
  finally:
    ckpt.close()
  return [_checked(where, s, out, verify) for s in specs]


def _check_stored(ckpt, arrays_dir: str, specs: list[ArraySpec], where: str) -> None:
  """The manifest's shapes and dtypes must be those stored, before anything is read."""
  meta = dict(ckpt.metadata(arrays_dir).item_metadata)
  for s in specs:
    m = meta.get(str(s.index))
    got = None if m is None else (tuple(m.shape), np.dtype(m.dtype))
    if got != (s.shape, s.dtype):
      stored = "nothing" if got is None else f"{got[1]}{list(got[0])}"
      raise FormatError(f"{where}: {files.MANIFEST} says array {short(s.path)} is "
                        f"{s.dtype}{list(s.shape)}, but {ARRAYS}/ stores {stored}")


def _first_line(err: BaseException) -> str:
  while err.__cause__ is not None:
    err = err.__cause__
  why = (str(err).strip().splitlines() or [type(err).__name__])[0]
  return why.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0][:300]


def _unreadable(err: Exception, specs: list[ArraySpec]) -> tuple[str, str]:
  """Which array orbax failed on (from tensorstore's key "<index>/...") and why."""
  why = _first_line(err)
  key = re.search(r'"(\d+)/', why)
  if key and int(key.group(1)) < len(specs):
    return f"array {short(specs[int(key.group(1))].path)}", why
  return "the arrays", why


def _checked(where: str, spec: ArraySpec, out, verify: bool):
  x = out.get(str(spec.index)) if isinstance(out, Mapping) else None
  if x is None or tuple(x.shape) != spec.shape or x.dtype != spec.dtype:
    raise FormatError(f"{where}: array {short(spec.path)} should be "
                      f"{spec.dtype}{list(spec.shape)}, the stored one is "
                      f"{getattr(x, 'dtype', None)}{list(getattr(x, 'shape', []))}")
  if verify and spec.crc32 is not None and x.is_fully_addressable and crc32(x) != spec.crc32:
    raise FormatError(f"{where}: the bytes of {short(spec.path)} "
                      f"({spec.dtype}{list(spec.shape)}) fail their CRC-32 check")
  return x
