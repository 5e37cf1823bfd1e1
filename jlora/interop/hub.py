"""Hugging Face Hub names (``"org/name"``) resolved through the local Hugging Face cache.

:func:`jlora.interop.from_hf` and :func:`jlora.peft.load` take a directory
or a Hub repository id. A directory that exists is used as it is; otherwise
a name that looks like a repository id is looked up in the Hugging Face
cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) with ``huggingface_hub`` — offline: nothing is
downloaded unless ``download=True`` is passed, and then only JSON and
safetensors files (never pickle). A name found nowhere raises a
:class:`jlora.CheckpointError` saying where jlora looked and how to fetch it.
"""
from __future__ import annotations

import os
import re

from jlora.errors import CheckpointError, short

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
FILES = ("*.json", "*.safetensors", "*.md", "*.txt", "*.model")   # what download=True fetches


def is_repo_id(name: str) -> bool:
  """Whether ``name`` has the form of a Hub repository id (``name`` or ``org/name``).

  Example:
    >>> is_repo_id("meta-llama/Llama-3.2-1B"), is_repo_id("./out/model"), is_repo_id("/tmp/x")
    (True, False, False)
  """
  return (_REPO_ID.fullmatch(name) is not None and ".." not in name
          and not name.endswith((".", "-")))


def resolve(name, marker: str, *, revision: str | None = None, download: bool = False,
            what: str = "checkpoint") -> str:
  """The local directory of ``name``: itself if it is a directory, else its cached Hub snapshot.

  Args:
    name: a directory, or a Hub repository id such as ``"org/name"``.
    marker: a file every such directory has (``"config.json"``,
      ``"adapter_config.json"``); the cached snapshot holding it is returned.
    revision: a branch, tag or commit of the Hub repository (default "main").
    download: fetch the repository's JSON and safetensors files if they are
      not cached (needs network access); by default nothing is downloaded.
    what: how errors name the thing looked for.

  Returns:
    ``name`` unchanged when it is a directory or not a repository id (the
    caller then reports it missing), else the snapshot directory in the cache.

  Raises:
    CheckpointError: a repository id that is not in the cache (and
      ``download`` is off), or ``huggingface_hub`` is not installed.

  Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> resolve(d, "config.json") == d
    True
  """
  name = os.fspath(name)
  if os.path.isdir(name) or not is_repo_id(name):
    return name
  try:
    import huggingface_hub
  except ImportError:
    raise CheckpointError(f"{short(name)} is not a directory; to read it as a Hugging Face Hub "
                          "name, install huggingface_hub (pip install huggingface_hub)") from None
  cache = os.environ.get("HF_HUB_CACHE") or None     # read now: tests and users may set it late
  if download:
    return _download(huggingface_hub, name, revision, cache, what)
  found = huggingface_hub.try_to_load_from_cache(name, marker, cache_dir=cache, revision=revision)
  if isinstance(found, str):
    return os.path.dirname(found)
  where = cache or huggingface_hub.constants.HF_HUB_CACHE
  rev = f" at revision {revision!r}" if revision else ""
  raise CheckpointError(
      f"{name} is not a directory, and the Hugging Face cache ({where}) has no {what} "
      f"{name}{rev} (no {marker}); download it first (hf download {name}), or pass "
      "download=True (jlora downloads nothing unless asked)")


def _download(huggingface_hub, name: str, revision: str | None, cache: str | None,
              what: str) -> str:
  try:
    return huggingface_hub.snapshot_download(name, revision=revision, cache_dir=cache,
                                             allow_patterns=list(FILES))
  except Exception as e:  # noqa: BLE001 (network, authentication and not-found errors)
    raise CheckpointError(f"could not download the {what} {short(name)} from the Hugging Face "
                          f"Hub: {type(e).__name__}: {short(str(e), 300)}") from None
