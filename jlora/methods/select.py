"""Trainable sets by path: a parameter tree split into a trainable and a frozen tree.

Every fine-tuning method is "a trainable tree beside a frozen tree". For
methods that train some of the model's own parameters (full fine-tuning,
BitFit, LoRA plus norm scales, ...) the two trees come from one tree by path:

  trainable, frozen = split(params, BIASES)     # same structure; None where the other has a leaf
  params = join(trainable, frozen)              # the plain tree again

Both halves keep the tree's containers (dicts, ``FrozenDict``, lists, NNX
``State``) and hold ``None`` where the other half has the leaf, so optax and
``jax.grad`` see only the trainable leaves: the frozen leaves get no gradient
and no optimizer state. jlora nodes (``LoRA``, ``QArray``, IA³, ...) are
selected whole.

A selection is one of:

- :data:`ALL`: every leaf (full fine-tuning);
- :data:`BIASES`: every leaf named ``bias`` (BitFit);
- :data:`NORMS`: the scales of normalisation layers (a leaf ``scale`` under a
  module whose name contains ``norm``);
- a regular expression (a ``str`` other than those): must match a leaf's
  whole "a/b/c" path;
- a list of names: a leaf is selected when a name equals a run of whole path
  components (``"bias"``, ``"input_layernorm"``, ``"adapter"``,
  ``"self_attn/q_proj"``); the keywords above may be entries too;
- a function ``(path, leaf) -> bool``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax

from jlora import paths
from jlora.errors import ConfigError

ALL = "all"
"""Selects every leaf: full fine-tuning."""
BIASES = "biases"
"""Selects every leaf named ``bias``: BitFit (Ben Zaken et al., 2022)."""
NORMS = "norms"
"""Selects normalisation scales: a leaf ``scale`` whose module name contains ``norm``."""
KEYWORDS = (ALL, BIASES, NORMS)


def _is_bias(path: str) -> bool:
  return path.rpartition(paths.SEP)[2] == "bias"


def _is_norm(path: str) -> bool:
  mod, _, leaf = path.rpartition(paths.SEP)
  return leaf == "scale" and "norm" in mod.rpartition(paths.SEP)[2]


def _names_match(name: str, path: str) -> bool:
  parts, want = path.split(paths.SEP), name.strip(paths.SEP).split(paths.SEP)
  n = len(want)
  return any(parts[i:i + n] == want for i in range(len(parts) - n + 1))


def _entry(entry) -> Callable[[str], bool]:
  if entry == ALL:
    return lambda p: True
  if entry == BIASES:
    return _is_bias
  if entry == NORMS:
    return _is_norm
  return lambda p: _names_match(entry, p)


def selector(select) -> Callable[[str, Any], bool]:
  """``select`` as a predicate ``(path, leaf) -> bool`` (see the module docstring).

  Example:
    >>> sel = selector(["bias", "input_layernorm"])
    >>> sel("layers_0/mlp/up_proj/bias", None), sel("layers_0/input_layernorm/scale", None)
    (True, True)
    >>> selector(r".*q_proj/kernel")("layers_0/self_attn/q_proj/kernel", None)
    True
  """
  if callable(select):
    return select
  if isinstance(select, str):
    if select in KEYWORDS:
      fn = _entry(select)
      return lambda p, x: fn(p)
    try:
      rx = re.compile(select)
    except re.error as e:
      raise ConfigError(f"trainable selection {select!r} is not a regular expression: {e}") from None
    return lambda p, x: rx.fullmatch(p) is not None
  if isinstance(select, Sequence) and select and all(isinstance(s, str) for s in select):
    fns = [_entry(s) for s in select]
    return lambda p, x: any(f(p) for f in fns)
  raise ConfigError(f"a trainable selection is {KEYWORDS}, a regex, a non-empty list of names "
                    f"or a function (path, leaf) -> bool; got {select!r}")


def _is_leaf(x) -> bool:
  return x is None or paths.is_node(x)


def split(tree: Any, select) -> tuple[Any, Any]:
  """``(trainable, frozen)``: ``tree`` with the leaves ``select`` picks, and with the rest.

  Both have ``tree``'s structure, with ``None`` in place of the other half's
  leaves (so ``jax.grad`` and optax treat them as empty). jlora nodes are
  picked whole by their path.

  Args:
    tree: any pytree of arrays and jlora nodes (a params tree, an adapter,
      ``{"adapter": ..., "params": ...}``).
    select: a selection (see the module docstring).

  Returns:
    ``(trainable, frozen)``.

  Raises:
    ConfigError: the selection picks nothing (the message shows some paths).

  Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> trainable, frozen = split(params, BIASES)
    >>> trainable
    {'dense': {'bias': Array([0., 0.], dtype=float32), 'kernel': None}}
    >>> join(trainable, frozen)["dense"]["kernel"].shape
    (3, 2)
  """
  pick = selector(select)
  chosen = []

  def side(keep: bool):
    def fn(kp, x):
      if x is None:
        return None
      p = paths.path_str(kp)
      take = bool(pick(p, x))
      if keep and take:
        chosen.append(p)
      return x if take == keep else None
    return jax.tree_util.tree_map_with_path(fn, tree, is_leaf=_is_leaf)

  trainable, frozen = side(True), side(False)
  if not chosen:
    some = list(paths.flatten(tree))
    hint = ""
    if select == BIASES:
      hint = (" (the model has no biases: BitFit needs some, e.g. the reference Llama with "
              "LlamaConfig(qkv_bias=True, o_bias=True, mlp_bias=True), whose zero-initialised "
              "biases change nothing until trained)")
    raise ConfigError(f"trainable selection {select!r} picks no leaf of the tree{hint}; its paths "
                      f"look like {some[:5]}")
  return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
  """The tree :func:`split` cut in two, joined back: each leaf from whichever half holds it.

  Raises:
    ConfigError: both halves hold a leaf at the same path.

  Example:
    >>> join({"a": 1.0, "b": None}, {"a": None, "b": 2.0})
    {'a': 1.0, 'b': 2.0}
  """
  def pick(kp, t, f):
    if t is not None and f is not None:
      raise ConfigError(f"join: both the trainable and the frozen tree hold "
                        f"{paths.path_str(kp)!r}")
    return f if t is None else t
  return jax.tree_util.tree_map_with_path(pick, trainable, frozen, is_leaf=_is_leaf)


def selected_paths(tree: Any) -> list[str]:
  """The paths of the leaves (and jlora nodes) a half of :func:`split` holds.

  Example:
    >>> selected_paths({"a": {"kernel": None, "bias": 1.0}})
    ['a/bias']
  """
  return [p for p, x in paths.flatten(tree, is_leaf=_is_leaf).items() if x is not None]
