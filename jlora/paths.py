"""Flattening parameter trees to "a/b/c" paths and matching targets.

Every jlora tree function speaks of parameters by their "/"-joined path, e.g.
``"layers_3/attn/q_proj/kernel"``. These helpers work for nested dicts, Flax
``FrozenDict`` and NNX ``State`` (whose ``Variable`` wrappers are looked
through: the path of ``state['linear']['kernel'].value`` is ``linear/kernel``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

SEP = "/"


def _key_name(key) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name in ("value", "raw_value") else key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(keypath) -> str:
  """Joins a JAX key path into "a/b/c", skipping NNX ``.value`` accessors.

  Example:
    >>> path_str((jax.tree_util.DictKey("layers"), jax.tree_util.SequenceKey(0)))
    'layers/0'
  """
  return SEP.join(n for n in map(_key_name, keypath) if n is not None)


def is_node(x: Any) -> bool:
  """True for jlora's own pytree nodes (``LoRA``, ``QArray``), which tree
  functions treat as single leaves. A class opts in with ``_jlora_node = True``."""
  return getattr(type(x), "_jlora_node", False)


def flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = is_node) -> dict[str, Any]:
  """Returns ``{path: leaf}`` for every leaf of ``tree`` (jlora nodes are leaves).

  Example:
    >>> flatten({"dense": {"kernel": 1, "bias": 2}})   # dicts flatten in sorted key order
    {'dense/bias': 2, 'dense/kernel': 1}
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_str(kp): leaf for kp, leaf in leaves}


def map_with_path(fn: Callable[[str, Any], Any], tree: Any,
                  is_leaf: Callable[[Any], bool] | None = is_node) -> Any:
  """``jax.tree.map`` that also passes each leaf's "a/b/c" path to ``fn``.

  The result has ``tree``'s container types (dict, ``FrozenDict``, NNX ``State``).

  Example:
    >>> map_with_path(lambda p, x: p if x else x, {"a": {"b": 1, "c": 0}})
    {'a': {'b': 'a/b', 'c': 0}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: fn(path_str(kp), x), tree, is_leaf=is_leaf)


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Builds a nested dict from ``{path: leaf}`` (inverse of :func:`flatten` for dicts).

  Example:
    >>> unflatten({"dense/kernel": 1, "dense/bias": 2})
    {'dense': {'kernel': 1, 'bias': 2}}
  """
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split(SEP)
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = leaf
  return out


def module_path(param_path: str) -> str:
  """The module part of a parameter path: ``"a/q_proj/kernel"`` -> ``"a/q_proj"``.

  Example:
    >>> module_path("layers_0/attn/q_proj/kernel")
    'layers_0/attn/q_proj'
  """
  return param_path.rpartition(SEP)[0]


def path_seed(path: str) -> int:
  """A stable 31-bit integer for ``path`` (to fold into a PRNG key per weight).

  Example:
    >>> path_seed("a/b") == path_seed("a/b") != path_seed("a/c")
    True
  """
  h = 0
  for ch in path.encode():
    h = (h * 131 + ch) % (2**31 - 1)
  return h
