"""The directory half of a checkpoint: layout, atomic replacement, the manifest file."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys

FORMAT = "jlora-checkpoint"
VERSION = 1
MANIFEST = "jlora.json"
ARRAYS = "arrays"
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")


def local_path(path) -> str:
  path = os.fspath(path)
  if not isinstance(path, str) or "://" in path:
    raise ValueError(f"path {path!r}: jlora checkpoints are written to local file systems only")
  return os.path.realpath(path)


def check_replaceable(target: str, overwrite: bool) -> None:
  if not os.path.lexists(target):
    return
  if not overwrite:
    raise ValueError(f"path {target!r} exists; pass overwrite=True to replace it")
  if not os.path.isdir(target):
    raise ValueError(f"refusing to replace {target!r}: it is a file, not a jlora checkpoint")
  if os.listdir(target) and not os.path.isfile(os.path.join(target, MANIFEST)):
    raise ValueError(f"refusing to replace {target!r}: it is a directory that is not a jlora "
                     f"checkpoint (it has no {MANIFEST})")


def write_text(file: str, text: str) -> None:
  with open(file, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


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


def replace(tmp: str, target: str) -> None:
  """Puts the complete checkpoint ``tmp`` at ``target``, dropping what was there."""
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
  else:
    old = tmp.replace(".jlora-tmp-", ".jlora-old-")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
  fsync_dir(os.path.dirname(target))


def _foreign(directory: str) -> ValueError:
  entries = sorted(os.listdir(directory))
  if not entries:
    return ValueError(f"not a jlora checkpoint: {directory!r} is an empty directory")
  if any(e in _ORBAX_MARKERS for e in entries):
    return ValueError(f"not a jlora checkpoint: {directory!r} looks like an orbax checkpoint "
                      f"that jlora.save did not write (it has no {MANIFEST}); restore it with "
                      "orbax-checkpoint directly")
  shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
  return ValueError(f"not a jlora checkpoint: {directory!r} has no {MANIFEST} (it holds {shown})")


def read_manifest(directory: str) -> dict:
  if not os.path.exists(directory):
    raise ValueError(f"no checkpoint at {directory!r}: the path does not exist")
  if not os.path.isdir(directory):
    raise ValueError(f"not a jlora checkpoint: {directory!r} is a file, not a directory")
  file = os.path.join(directory, MANIFEST)
  if not os.path.isfile(file):
    raise _foreign(directory)
  try:
    with open(file, "rb") as f:
      data = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: {MANIFEST} is not valid "
                     f"JSON ({err})") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT:
    raise ValueError(f"not a jlora checkpoint: {MANIFEST} in {directory!r} does not say "
                     f"format {FORMAT!r}")
  version = data.get("version")
  if not isinstance(version, int) or not 1 <= version <= VERSION:
    raise ValueError(f"jlora checkpoint at {directory!r} has format version {version!r}; this "
                     f"jlora reads versions 1 to {VERSION}")
  if "tree" not in data:
    raise ValueError(f"corrupted jlora checkpoint at {directory!r}: {MANIFEST} has no 'tree'")
  return data
