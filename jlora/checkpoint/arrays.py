"""The array half of a checkpoint: orbax I/O, shardings, checks against a target."""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import numpy as np

from jlora import paths
from jlora.checkpoint.files import ARRAYS
from jlora.checkpoint.tree_json import ArraySpec, crc32


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp, ocp.Checkpointer(ocp.StandardCheckpointHandler())


def write_arrays(directory: str, arrays: list) -> None:
  ocp, ckpt = _checkpointer()
  try:
    ckpt.save(directory, args=ocp.args.StandardSave({str(i): x for i, x in enumerate(arrays)}))
  finally:
    ckpt.close()


def _as_sharding(s, spec: ArraySpec, default):
  if s is None:
    return default
  if not isinstance(s, jax.sharding.Sharding):
    raise TypeError(f"shardings for {spec.path!r} must be a jax.sharding.Sharding or None, "
                    f"got {type(s).__name__}")
  try:
    s.shard_shape(spec.shape)
  except Exception as err:  # noqa: BLE001 (jax raises several kinds)
    raise ValueError(f"sharding {s} does not fit {spec.path!r} of shape {list(spec.shape)}: "
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
      raise ValueError(f"shardings do not match the checkpoint's arrays: no sharding for "
                       f"{missing[:3]}; shardings for arrays it lacks: {extra[:3]}")
    chosen = [by_path[s.path] for s in specs]
  return [_as_sharding(c, s, default) for c, s in zip(chosen, specs)]


def check_target(directory: str, specs: list[ArraySpec], target) -> None:
  flat = jax.tree_util.tree_flatten_with_path(target)[0]
  leaves = {paths.path_str(kp): x for kp, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")}
  got = {s.path: s for s in specs}
  missing, extra = sorted(set(leaves) - set(got)), sorted(set(got) - set(leaves))
  if missing or extra:
    raise ValueError(f"checkpoint at {directory!r} does not match target: the target has "
                     f"{missing[:3]} that the checkpoint lacks, the checkpoint has {extra[:3]} "
                     "that the target lacks")
  for path, x in leaves.items():
    spec = got[path]
    if tuple(x.shape) != spec.shape or np.dtype(x.dtype) != spec.dtype:
      raise ValueError(f"checkpoint at {directory!r} does not match target at {path!r}: "
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
      raise ValueError(f"checkpoint at {directory!r} does not match target at {path!r}: "
                       f"checkpoint {jax.tree.structure(got)}, target {jax.tree.structure(want)}")
    leaves.append(got)
  if len(leaves) != len(restored):
    raise ValueError(f"checkpoint at {directory!r} has more leaves than the target "
                     f"({len(restored)} vs {len(leaves)})")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def read_arrays(directory: str, specs: list[ArraySpec], placements: list, verify: bool):
  if not specs:
    return []
  arrays_dir = os.path.join(directory, ARRAYS)
  if not os.path.isdir(arrays_dir):
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: its {ARRAYS}/ directory is "
                     "missing")
  abstract = {str(s.index): jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p)
              for s, p in zip(specs, placements)}
  ocp, ckpt = _checkpointer()
  try:
    out = ckpt.restore(arrays_dir, args=ocp.args.StandardRestore(abstract))
  except Exception as err:  # noqa: BLE001 (orbax and tensorstore raise many kinds)
    which, why = _unreadable(err, specs)
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: {which} in {ARRAYS}/ "
                     f"could not be read ({why})") from err
  finally:
    ckpt.close()
  return [_checked(directory, s, out, verify) for s in specs]


def _unreadable(err: Exception, specs: list[ArraySpec]) -> tuple[str, str]:
  """Which array orbax failed on (from tensorstore's key "<index>/...") and why."""
  while err.__cause__ is not None:
    err = err.__cause__
  why = (str(err).strip().splitlines() or [type(err).__name__])[0]
  why = why.split(" See full TensorStore details")[0][:300]
  key = re.search(r'"(\d+)/', why)
  if key and int(key.group(1)) < len(specs):
    return f"array {specs[int(key.group(1))].path!r}", why
  return "the arrays", why


def _checked(directory: str, spec: ArraySpec, out, verify: bool):
  x = out.get(str(spec.index)) if isinstance(out, Mapping) else None
  if x is None or tuple(x.shape) != spec.shape or x.dtype != spec.dtype:
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: array {spec.path!r} should "
                     f"be {spec.dtype}{list(spec.shape)}, the stored one is "
                     f"{getattr(x, 'dtype', None)}{list(getattr(x, 'shape', []))}")
  if verify and spec.crc32 is not None and x.is_fully_addressable and crc32(x) != spec.crc32:
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: the bytes of "
                     f"{spec.path!r} ({spec.dtype}{list(spec.shape)}) fail their CRC-32 check")
  return x
