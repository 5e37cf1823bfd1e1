"""The directory half of a checkpoint: atomic replacement, safe paths, the manifest.

:func:`atomic_directory` is the one way jlora writes a directory that may
replace an existing one (``jlora.save``, ``jlora.peft.save``): the new
contents are written into a fresh temporary directory beside the target and
swapped in with one rename only when complete. orbax's own ``force=True``
deletes the old checkpoint *before* writing the new one, so it cannot give
this promise.

:func:`orbax_path` hands orbax and TensorStore a path they handle: they
treat ``[``, ``]``, ``*``, ``?`` as glob patterns and a backslash as a
separator, and then silently skip merging the per-process array databases.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from typing import Callable, Iterator

from jlora.errors import CheckpointError, FormatError, short

FORMAT = "jlora-checkpoint"
VERSION = 2
MANIFEST = "jlora.json"
ARRAYS = "arrays"
MAX_MANIFEST_BYTES = 256 << 20
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
_UNSAFE = set("[]*?\\")
TMP_TAG = ".jlora-tmp-"


def local_path(path) -> str:
  """``path`` as an absolute local path; CheckpointError for URLs and non-paths."""
  try:
    path = os.fspath(path)
  except TypeError:
    raise CheckpointError(f"a checkpoint path must be a str or os.PathLike, got "
                          f"{type(path).__name__}") from None
  if isinstance(path, bytes):
    path = os.fsdecode(path)
  if not path or "://" in path or "\0" in path:
    raise CheckpointError(f"path {short(path)}: jlora checkpoints are directories on a local "
                          "file system")
  return os.path.realpath(path)


# ------------------------------------------------------------------ safe paths for orbax

@contextlib.contextmanager
def orbax_path(directory: str) -> Iterator[str]:
  """A path to the existing ``directory`` that orbax and TensorStore read as written.

  Paths with ``[ ] * ? \\`` are reached through ``/proc/self/fd/N`` (Linux),
  which holds none of them; elsewhere they are refused.
  """
  if not _UNSAFE & set(directory):
    yield directory
    return
  if not os.path.isdir("/proc/self/fd"):
    raise CheckpointError(f"path {short(directory)} has one of the characters [ ] * ? \\, which "
                          "orbax cannot use on this system; choose another directory name")
  fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    yield f"/proc/self/fd/{fd}"
  finally:
    os.close(fd)


# ------------------------------------------------------------------ atomic replacement

def fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system can't swap
    return False
  raise OSError(code, os.strerror(code), b)


def _swap_in(tmp: str, target: str) -> None:
  """Puts the complete directory ``tmp`` at ``target``, dropping what was there."""
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous contents
  else:  # no atomic swap: a short window where target is absent (the old one is kept aside)
    old = tmp + "-old"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
  fsync_dir(os.path.dirname(target))


def check_replaceable(target: str, overwrite: bool, owned: Callable[[str], str | None]) -> None:
  """Raises CheckpointError unless ``target`` is absent, empty, or ``owned`` accepts it.

  ``owned(target)`` returns None for a directory jlora may replace, else the reason.
  """
  if not os.path.lexists(target):
    return
  if not overwrite:
    raise CheckpointError(f"{short(target)} exists; pass overwrite=True to replace it")
  if os.path.islink(target) or not os.path.isdir(target):
    raise CheckpointError(f"refusing to replace {short(target)}: it is a file, not a directory "
                          "jlora wrote")
  if not os.listdir(target):
    return
  why = owned(target)
  if why is not None:
    raise CheckpointError(f"refusing to replace {short(target)}: {why}")


def _same_id_everywhere() -> str:
  """One random name for this save, the same in every process of a multi-host run."""
  import jax
  if jax.process_count() == 1:
    return uuid.uuid4().hex
  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.frombuffer(uuid.uuid4().bytes, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).hex()


def barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
  import jax
  return jax.process_index() == 0


@contextlib.contextmanager
def atomic_directory(target: str, *, overwrite: bool = True,
                     owned: Callable[[str], str | None], carry_over: bool = False
                     ) -> Iterator[str]:
  """Yields a new empty directory; on success it replaces ``target`` in one rename.

  The temporary directory is ``.<name>.jlora-tmp-<id>`` beside ``target``
  (same file system, so the swap is a rename: ``renameat2(RENAME_EXCHANGE)``
  on Linux). If the block raises, or the process dies, ``target`` is as it
  was; a killed process leaves the temporary directory, which is safe to
  delete. With ``carry_over``, entries of the old ``target`` that the block
  did not write (a README, say) are hard-linked (else copied) into the new
  one first. In a multi-host run every process calls this; process 0 alone
  creates, swaps and removes directories.

  Args:
    target: absolute path of the directory to (re)place.
    overwrite: allow replacing an existing ``target``.
    owned: ``owned(target) -> None`` if an existing non-empty ``target`` may
      be replaced, else the reason it may not (raised as CheckpointError).
    carry_over: keep the old directory's other entries.
  """
  check_replaceable(target, overwrite, owned)
  parent, name = os.path.split(target)
  tmp = os.path.join(parent, f".{name}{TMP_TAG}{_same_id_everywhere()}")
  primary = is_primary()
  if primary:
    try:
      os.makedirs(parent, exist_ok=True)
      os.mkdir(tmp)  # with the umask's permissions, as the result will have
    except OSError as err:
      raise CheckpointError(f"cannot write {short(target)}: {err.strerror} "
                            f"({short(err.filename or parent)})") from None
  barrier(f"jlora-mkdir-{tmp}")
  try:
    yield tmp
    barrier(f"jlora-written-{tmp}")
    if primary:
      if carry_over and os.path.isdir(target):
        _carry_over(target, tmp)
      fsync_dir(tmp)
      _swap_in(tmp, target)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  barrier(f"jlora-swapped-{tmp}")


def _carry_over(old: str, new: str) -> None:
  for entry in os.listdir(old):
    src, dst = os.path.join(old, entry), os.path.join(new, entry)
    if os.path.lexists(dst):
      continue
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst, follow_symlinks=False)
  except OSError:
    shutil.copy2(src, dst, follow_symlinks=False)


# ------------------------------------------------------------------ the manifest

def checksum(tree) -> str:
  """sha256 of the manifest's tree in a canonical JSON form."""
  text = json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=True)
  return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def write_manifest(directory: str, tree) -> str:
  """Writes ``jlora.json`` (format, version, a save id, the tree and its checksum)."""
  save_id = uuid.uuid4().hex
  data = {"format": FORMAT, "version": VERSION, "save_id": save_id, "checksum": checksum(tree),
          "tree": tree}
  with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
    f.write(json.dumps(data, indent=1))
    f.flush()
    os.fsync(f.fileno())
  return save_id


def _foreign(directory: str) -> CheckpointError:
  entries = sorted(os.listdir(directory))
  if not entries:
    return CheckpointError(f"not a jlora checkpoint: {short(directory)} is an empty directory")
  if any(e in _ORBAX_MARKERS for e in entries):
    return CheckpointError(f"not a jlora checkpoint: {short(directory)} looks like an orbax "
                           f"checkpoint that jlora.save did not write (it has no {MANIFEST}); "
                           "restore it with orbax-checkpoint directly")
  shown = ", ".join(short(e, 60)[1:-1] for e in entries[:6]) + (", ..." if len(entries) > 6 else "")
  return CheckpointError(f"not a jlora checkpoint: {short(directory)} has no {MANIFEST} "
                         f"(it holds {shown})")


def read_manifest(directory: str) -> dict:
  """The parsed, checked ``jlora.json`` of ``directory``.

  Raises CheckpointError for a missing or foreign directory, FormatError for
  a manifest that is not jlora's, not valid JSON or fails its checksum.
  """
  if not os.path.exists(directory):
    raise CheckpointError(f"no checkpoint at {short(directory)}: the path does not exist")
  if not os.path.isdir(directory):
    raise CheckpointError(f"not a jlora checkpoint: {short(directory)} is a file, not a directory")
  file = os.path.join(directory, MANIFEST)
  if not os.path.isfile(file):
    raise _foreign(directory)
  where = f"jlora checkpoint at {short(directory)}"
  if os.path.getsize(file) > MAX_MANIFEST_BYTES:
    raise FormatError(f"corrupted {where}: {MANIFEST} is {os.path.getsize(file):,} bytes, more "
                      f"than the {MAX_MANIFEST_BYTES:,} a manifest may have")
  try:
    with open(file, "rb") as f:
      data = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
    why = "nested too deeply" if isinstance(err, RecursionError) else short(str(err), 120)
    raise FormatError(f"corrupted {where}: {MANIFEST} is not valid JSON ({why})") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise FormatError(f"not a jlora checkpoint: {MANIFEST} in {short(directory)} does not say "
                      f"format {FORMAT!r}")
  version = data.get("version")
  if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
    raise FormatError(f"{where} has format version {short(version, 40)}; this jlora reads "
                      f"versions 1 to {VERSION}")
  if "tree" not in data:
    raise FormatError(f"corrupted {where}: {MANIFEST} has no 'tree'")
  if version >= 2 and data.get("checksum") != checksum(data["tree"]):
    raise FormatError(f"corrupted {where}: {MANIFEST} fails its checksum (its metadata was "
                      "changed or damaged after it was written)")
  return data


def save_id(directory: str) -> str | None:
  """The save id in ``directory``'s manifest, or None if it cannot be read."""
  try:
    with open(os.path.join(directory, MANIFEST), "rb") as f:
      return json.loads(f.read()).get("save_id")
  except (OSError, ValueError, AttributeError, RecursionError):
    return None


def owned_checkpoint(directory: str) -> str | None:
  """None if ``directory`` holds a jlora checkpoint (even a damaged one) and nothing else."""
  file = os.path.join(directory, MANIFEST)
  try:
    if os.path.getsize(file) > MAX_MANIFEST_BYTES:
      raise ValueError
    with open(file, "rb") as f:
      data = json.loads(f.read())
  except (OSError, ValueError, RecursionError):
    data = None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    return (f"it is not a jlora checkpoint (it has no {MANIFEST} that says format "
            f"{FORMAT!r})")
  others = sorted(set(os.listdir(directory)) - {MANIFEST, ARRAYS})
  if others:
    return (f"besides a jlora checkpoint it holds {', '.join(short(e, 60) for e in others[:5])}"
            f"{', ...' if len(others) > 5 else ''}, which a save would delete")
  return None
