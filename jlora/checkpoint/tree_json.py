"""The JSON half of a checkpoint: a tree's structure, node metadata and array specs.

:func:`encode` turns a tree into JSON plus the list of its arrays; :func:`parse`
reads the JSON back into a skeleton of :class:`ArraySpec` / :class:`NodeSpec`
and :func:`build` fills the skeleton with the restored arrays. In the JSON,
None, Python scalars and lists are themselves; everything else is a dict
tagged by one key: "array" (index, shape, dtype, CRC-32), "node"
(class name, static fields, children), "dtype", "dict" or "tuple".
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.errors import UnsavableError, short

MAX_DEPTH = 64
"""Deepest nesting of containers and nodes a manifest may describe."""
_EXTRA_NODES: dict[str, type] = {}


def register_node(cls: type, name: str | None = None) -> type:
  """Lets :func:`save`/:func:`restore` handle another dataclass pytree node.

  ``LoRA`` and ``QArray`` are known already. The class must be a dataclass
  registered as a pytree whose children are fields (``GetAttrKey``) and whose
  other ``__init__`` fields are static, JSON-able values (numbers, strings,
  bools, None, dtypes, and tuples/lists/dicts of them).
  """
  _EXTRA_NODES[name or cls.__name__] = cls
  return cls


def _node_classes() -> dict[str, type]:
  from jlora.bank import AdapterBank, BankLoRA
  from jlora.lora import LoRA
  from jlora.quant import QArray
  return {"LoRA": LoRA, "QArray": QArray, "AdapterBank": AdapterBank, "BankLoRA": BankLoRA,
          **_EXTRA_NODES}


class BadMetadata(Exception):
  """A malformed jlora.json; restore turns it into a FormatError."""


def crc32(x) -> int | None:
  """CRC-32 of an array's bytes (C order); None if its shards are not all local."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  host = np.ascontiguousarray(np.asarray(x))
  return zlib.crc32(host.reshape(-1).view(np.uint8))


def _encode_dtype(x) -> dict | None:
  if isinstance(x, np.dtype):
    return {"dtype": x.name, "as": "numpy_dtype"}
  if isinstance(x, type) and issubclass(x, np.generic):
    return {"dtype": np.dtype(x).name, "as": "numpy_type"}
  if type(x).__name__ == "_ScalarMeta" and hasattr(x, "dtype"):
    return {"dtype": np.dtype(x.dtype).name, "as": "jax_type"}
  return None


def _encode_array(x, path: str, arrays: list | None) -> dict:
  if arrays is None:
    raise UnsavableError(f"cannot save an array in the static field {path!r}")
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
    raise UnsavableError(f"cannot save {path!r}: dtype {x.dtype} is not a plain array dtype "
                          "(for PRNG keys save jax.random.key_data(key))")
  if jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype:
    raise UnsavableError(f"cannot save {path!r} bit-exactly: its dtype {np.dtype(x.dtype)} "
                          f"becomes {jax.dtypes.canonicalize_dtype(x.dtype)} in JAX with "
                          "jax_enable_x64 off; cast it first, or enable x64")
  arrays.append(x)
  return {"array": len(arrays) - 1, "shape": [int(d) for d in x.shape],
          "dtype": np.dtype(x.dtype).name, "crc32": crc32(x)}


def _encode_node(node, path: str, arrays: list | None) -> dict:
  names = {cls: name for name, cls in _node_classes().items()}
  name = names.get(type(node))
  if name is None or not dataclasses.is_dataclass(node):
    raise UnsavableError(f"cannot save {path!r}: {type(node).__name__} is not a node class jlora "
                          "knows (see jlora.checkpoint.register_node)")
  kids, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
  children = {}
  for keypath, child in kids:
    if len(keypath) != 1 or not isinstance(keypath[0], jax.tree_util.GetAttrKey):
      raise UnsavableError(f"cannot save {path!r}: {name} children must be dataclass fields")
    field = keypath[0].name
    children[field] = encode(child, _join(path, field), arrays)
  static = {f.name: encode(getattr(node, f.name), f"{path}.{f.name}", None)
            for f in dataclasses.fields(node) if f.init and f.name not in children}
  return {"node": name, "static": static, "children": children}


def encode(x, path: str, arrays: list | None):
  """JSON for ``x``; arrays are appended to ``arrays`` (None: static, no arrays).

  None, Python scalars and lists are themselves; everything else is a dict
  tagged by one key: "array", "node", "dtype", "dict" or "tuple".
  """
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    if arrays is None and isinstance(x, np.generic):
      return x.item()
    return _encode_array(np.asarray(x) if isinstance(x, np.generic) else x, path, arrays)
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  dtype = _encode_dtype(x)
  if dtype is not None:
    return dtype
  if paths.is_node(x):
    return _encode_node(x, path, arrays)
  if isinstance(x, Mapping):
    bad = [k for k in x if not isinstance(k, str)]
    if bad:
      raise UnsavableError(f"cannot save {path!r}: dict keys must be strings, got {bad[0]!r}")
    return {"dict": {k: encode(v, _join(path, k), arrays) for k, v in x.items()}}
  if type(x) in (list, tuple):
    items = [encode(v, _join(path, str(i)), arrays) for i, v in enumerate(x)]
    return items if type(x) is list else {"tuple": items}
  raise UnsavableError(f"cannot save {path or 'the tree'!r}: unsupported {type(x).__name__} "
                       "(save nested dicts/lists/tuples of arrays and jlora nodes; for an NNX "
                       "State use nnx.to_pure_dict)")


def _join(path: str, key: str) -> str:
  return f"{path}/{key}" if path else key


@dataclasses.dataclass
class ArraySpec:
  index: int
  path: str
  shape: tuple[int, ...]
  dtype: np.dtype
  crc32: int | None


@dataclasses.dataclass
class NodeSpec:
  path: str
  cls: type
  static: dict
  children: dict


def _tag(e, where: str, tags: tuple[str, ...]) -> str:
  for t in tags:
    if t in e:
      return t
  raise BadMetadata(f"has an unreadable entry at {short(where or 'the root')}: {short(e, 80)}")


def _parse_dtype(e, where: str):
  try:
    name, form = e["dtype"], e.get("as", "numpy_dtype")
    dtype = jnp.dtype(name)
    if not _numeric(dtype):
      raise TypeError(f"{dtype} is not a numeric dtype")
    return {"numpy_dtype": lambda: dtype, "numpy_type": lambda: dtype.type,
            "jax_type": lambda: getattr(jnp, dtype.name)}[form]()
  except (KeyError, TypeError, AttributeError, ValueError) as err:
    raise BadMetadata(f"has a bad dtype at {short(where)}: {short(e, 80)} "
                      f"({short(str(err), 80)})") from None


def _numeric(dtype) -> bool:
  """bool, ints, floats (bfloat16 and float8 too), complex: what orbax stores as plain bytes."""
  return dtype == np.bool_ or bool(jnp.issubdtype(dtype, jnp.number))


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _parse_array(e, where: str, specs: list) -> ArraySpec:
  index, shape, crc = e.get("array"), e.get("shape"), e.get("crc32")
  try:
    dtype = jnp.dtype(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
  except TypeError:
    dtype = None
  if (not _is_int(index) or index < 0 or not isinstance(shape, list)
      or not all(_is_int(d) and 0 <= d < 2**62 for d in shape) or len(shape) > 32
      or dtype is None or not _numeric(dtype)
      or not (crc is None or _is_int(crc) and 0 <= crc < 2**32)):
    raise BadMetadata(f"has a bad array entry at {short(where)}: {short(e, 120)} (expected "
                      "an index, a shape of non-negative ints, a numeric dtype and a CRC-32)")
  spec = ArraySpec(index, where, tuple(shape), dtype, crc)
  specs.append(spec)
  return spec


def _parse_node(e, where: str, specs: list, depth: int) -> NodeSpec:
  cls = _node_classes().get(e["node"]) if isinstance(e["node"], str) else None
  if cls is None:
    raise BadMetadata(f"names an unknown node class {short(e['node'], 80)} at {short(where)}")
  static, children = e.get("static"), e.get("children")
  if not isinstance(static, dict) or not isinstance(children, dict):
    raise BadMetadata(f"has a node without static fields or children at {short(where)}")
  return NodeSpec(where, cls,
                  {k: parse(v, f"{where}.{k}", None, depth + 1) for k, v in static.items()},
                  {k: parse(v, _join(where, k), specs, depth + 1) for k, v in children.items()})


def parse(e, where: str, specs: list | None, depth: int = 0):
  """JSON entry -> containers holding ArraySpec/NodeSpec (specs None: static)."""
  if depth > MAX_DEPTH:
    raise BadMetadata(f"nests deeper than {MAX_DEPTH} levels at {short(where)}")
  if e is None or isinstance(e, (bool, int, float, str)):
    return e
  if isinstance(e, list):
    return [parse(v, _join(where, str(i)), specs, depth + 1) for i, v in enumerate(e)]
  if not isinstance(e, dict):
    raise BadMetadata(f"has an unreadable entry at {short(where or 'the root')}: {short(e, 80)}")
  tags = ("array", "node", "dtype", "dict", "tuple")
  tag = _tag(e, where, tags if specs is not None else tags[2:])
  if tag == "array":
    return _parse_array(e, where, specs)
  if tag == "node":
    return _parse_node(e, where, specs, depth)
  if tag == "dtype":
    return _parse_dtype(e, where)
  body = e[tag]
  if tag == "dict" and isinstance(body, dict):
    return {k: parse(v, _join(where, k), specs, depth + 1) for k, v in body.items()}
  if tag == "tuple" and isinstance(body, list):
    return tuple(parse(v, _join(where, str(i)), specs, depth + 1) for i, v in enumerate(body))
  raise BadMetadata(f"has a malformed {tag} at {short(where or 'the root')}")


def build(x, arrays: list):
  """The tree from a parsed skeleton, with ``arrays[i]`` for each ArraySpec."""
  if isinstance(x, ArraySpec):
    return arrays[x.index]
  if isinstance(x, NodeSpec):
    kids = {k: build(v, arrays) for k, v in x.children.items()}
    try:
      node = x.cls(**kids, **x.static)
    except (TypeError, ValueError) as err:
      raise BadMetadata(f"describes a {x.cls.__name__} at {short(x.path)} that cannot be "
                         f"rebuilt ({short(str(err), 160)})") from None
    from jlora.checkpoint.nodes import check_node
    why = check_node(node)
    if why is not None:
      raise BadMetadata(f"describes an invalid {x.cls.__name__} at {short(x.path)}: {why}")
    return node
  if isinstance(x, dict):
    return {k: build(v, arrays) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(build(v, arrays) for v in x)
  return x


def parse_tree(obj) -> tuple:
  """The skeleton of a manifest's "tree" and its array specs, in index order."""
  specs: list[ArraySpec] = []
  skeleton = parse(obj, "", specs)
  if sorted(s.index for s in specs) != list(range(len(specs))):
    raise BadMetadata("numbers its arrays inconsistently")
  return skeleton, sorted(specs, key=lambda s: s.index)
