"""Saving and restoring adapters and (quantized) base trees with orbax-checkpoint.

A checkpoint is a directory that describes itself, so :func:`restore` needs
no template::

  path/
    jlora.json   the tree as JSON: its containers (dict, list, tuple, None,
                 Python scalars); for each jlora node (``LoRA``, ``QArray``)
                 its class name and static fields; for each array its index,
                 shape, dtype and CRC-32
    arrays/      the arrays, a flat dict {"0": ..., "1": ...} written by orbax

Loading reads JSON and array bytes only: nothing is unpickled and no class is
looked up by a name read from disk, only in jlora's own list of node classes.

``jlora.json`` carries a sha256 checksum of its own tree (so a changed
``alpha`` is caught) and a CRC-32 of every array's bytes. Restored ``LoRA``
and ``QArray`` nodes are checked for values jlora would compute wrongly with.

A save is atomic (:func:`jlora.checkpoint.files.atomic_directory`): it is
written beside ``path`` and swapped in with one rename only once it is
complete and orbax's output has been read back, so the previous checkpoint
stays readable until then and survives a failed or killed save. A restore
that races a save to the same path starts again on the new checkpoint.
Local (or shared, POSIX) file systems; any number of processes.
"""
from __future__ import annotations

from typing import Any, Callable

from jlora.checkpoint import arrays as array_io
from jlora.checkpoint import files
from jlora.checkpoint import tree_json
from jlora.checkpoint.tree_json import register_node
from jlora.errors import CheckpointError, FormatError, short

__all__ = ["save", "restore", "register_node"]
RESTORE_ATTEMPTS = 3


def _corrupted(directory: str, err: Exception) -> FormatError:
  return FormatError(f"corrupted jlora checkpoint at {short(directory)}: {files.MANIFEST} {err}")


def save(path, tree: Any, *, overwrite: bool = True) -> None:
  """Saves an adapter or a (quantized) base tree to the directory ``path``.

  ``tree`` is a nested dict/list/tuple (``FrozenDict`` comes back as a dict)
  of arrays (any dtype: float32, bfloat16, uint8, int8, ...), ``None``,
  Python scalars and jlora nodes (``LoRA``, ``QArray``), whose static
  metadata is saved with them. Arrays keep their dtype and bytes exactly.

  The save is atomic: it is written beside ``path`` and swapped in only when
  complete; a checkpoint already at ``path`` stays readable until then, and
  is left intact if the save fails or is killed.

  Args:
    path: a directory on a local file system (created; its parent too).
    tree: the tree to save, e.g. an adapter ``{"q_proj": {"kernel": LoRA}}``
      with ``a: [*stack, *in_dims, r]``, ``b: [*stack, r, *out_dims]``.
    overwrite: replace an existing checkpoint at ``path`` (else CheckpointError).
      Only a directory holding a jlora checkpoint and nothing else, or an
      empty one, is ever replaced.

  In a multi-host run every process calls ``save`` with the same ``path``
  (on a file system they share); each writes its own shards and process 0
  writes the manifest and swaps the directory in.

  Raises:
    UnsavableError: a leaf jlora cannot save (e.g. an NNX Variable, a PRNG key);
      a CheckpointError and a TypeError.
    CheckpointError: ``path`` exists and may not be replaced, cannot be
      written, or orbax failed to write the arrays (nothing is replaced).

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> path = tempfile.mkdtemp() + "/my_adapter"
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.zeros((4, 8)), alpha=8.0, rank=4)
    >>> jlora.save(path, {"q_proj": {"kernel": lora}})
    >>> jlora.restore(path)["q_proj"]["kernel"].scale
    2.0
  """
  target = files.local_path(path)
  arrays: list = []
  encoded = tree_json.encode(tree, "", arrays)
  with files.atomic_directory(target, overwrite=overwrite, owned=files.owned_checkpoint) as tmp:
    if arrays:
      array_io.write_arrays(tmp, arrays)
    if files.is_primary():
      files.write_manifest(tmp, encoded)


def restore(path, *, target: Any = None,
            shardings: Any | Callable[[str], Any] = None, verify: bool = True) -> Any:
  """Restores a tree saved by :func:`save`; no template is needed.

  Containers come back as they were saved (dicts, lists, tuples, None),
  arrays as ``jax.Array`` with their saved dtype and bytes, and ``LoRA`` /
  ``QArray`` nodes with their static metadata.

  Args:
    path: the checkpoint directory.
    target: optional template of the same tree (arrays or
      ``jax.ShapeDtypeStruct``, in any containers, e.g. ``FrozenDict``): the
      checkpoint must have the same paths, shapes, dtypes and node metadata
      (else ValueError naming the first mismatch); the result takes the
      target's containers, and arrays go onto the target leaves' shardings
      unless ``shardings`` is given.
    shardings: where arrays go: a ``jax.sharding.Sharding`` for all of them, a
      pytree of shardings matching the tree (a ``LoRA`` node's arrays are
      its ``a``/``b``/``magnitude``), or a callable ``path -> Sharding | None``
      taking array paths like ``"q_proj/kernel/a"``. None: the first local
      device. Arrays are read straight onto their shardings.
    verify: check each array's CRC-32 (arrays whose shards all live in this
      process); costs one pass over the bytes on the host.

  Raises:
    CheckpointError: ``path`` is missing or not a jlora checkpoint (an empty
      or foreign directory, an orbax checkpoint jlora did not write), or it
      does not match ``target``/``shardings``.
    FormatError: (a CheckpointError) the checkpoint is corrupted: garbled or
      changed metadata, nodes with impossible values, missing or damaged
      array data.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, jlora
    >>> path = tempfile.mkdtemp() + "/base"
    >>> jlora.save(path, {"dense": {"kernel": jnp.ones((16, 8), jnp.bfloat16)}})
    >>> mesh = jax.sharding.Mesh(jax.devices()[:2], ("x",))
    >>> rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    >>> base = jlora.restore(path, shardings=lambda p: rows)
    >>> base["dense"]["kernel"].sharding == rows
    True
  """
  directory = files.local_path(path)
  for _ in range(RESTORE_ATTEMPTS):
    manifest = files.read_manifest(directory)
    try:
      tree = _restore(directory, manifest, target, shardings, verify)
    except CheckpointError:
      if files.save_id(directory) == manifest.get("save_id"):
        raise
      continue   # a save replaced the checkpoint while it was read: read the new one
    if files.save_id(directory) == manifest.get("save_id"):
      return tree
  raise CheckpointError(f"the checkpoint at {short(directory)} was replaced "
                        f"{RESTORE_ATTEMPTS} times while it was being read; try again")


def _restore(directory: str, manifest: dict, target, shardings, verify):
  try:
    skeleton, specs = tree_json.parse_tree(manifest["tree"])
  except tree_json.BadMetadata as err:
    raise _corrupted(directory, err) from None
  if target is not None:
    array_io.check_target(directory, specs, target)
  where = array_io.placements(specs, shardings, target)
  arrays = array_io.read_arrays(directory, specs, where, verify)
  try:
    tree = tree_json.build(skeleton, arrays)
  except tree_json.BadMetadata as err:
    raise _corrupted(directory, err) from None
  return tree if target is None else array_io.like(target, tree, directory)
