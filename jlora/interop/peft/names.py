"""Name maps: PEFT's module names <-> the parameter paths of *your* model.

PEFT names each adapted module by its dotted name in the PyTorch model
(``model.layers.0.self_attn.q_proj``); jlora names each weight by its path
in your params tree (``layers_0/self_attn/q_proj/kernel``). A name map says
which is which, so a PEFT adapter trained on a Hugging Face model loads into
any Flax implementation of it, and back. :func:`resolve` accepts:

- ``None``: the model's own map if it has one (a ``name_map()`` method, as
  the reference :class:`jlora.models.Llama` has), else Hugging Face's
  ``*ForCausalLM`` layout (:class:`jlora.interop.hf_names.NameMap`:
  ``layers_{i}/...`` -> ``model.layers.{i}...``, ``lm_head`` at the top);
- a table ``{param path: module name}``. A key may be the weight's path
  (``"blocks_0/attn/query/kernel"``) or its module's (``"blocks_0/attn/query"``);
  a scanned weight with a leading ``[L]`` axis maps to a list of ``L`` names,
  one per layer. Weights the table leaves out are not addressed by PEFT;
- a function ``fn(path, layer) -> module name or None`` (``layer`` is the
  index within a stacked weight, else None; None: no PEFT name);
- any object with ``module_name(path, layer)`` (and, for
  :func:`jlora.peft.params_from_file`, ``param_path(module, leaf, scanned)``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from jlora import lora as L
from jlora import paths
from jlora.errors import ConfigError, short
from jlora.interop.hf_names import NameMap, scanned

ADAPTABLE_LEAVES = ("kernel", "embedding")
HEAD_MODULES = ("lm_head",)
DEFAULT = NameMap()
"""Hugging Face's ``*ForCausalLM`` layout (every family of the reference models uses it)."""


class Table:
  """A name map given as a table ``{param or module path: module name | [name per layer]}``.

  Example:
    >>> names = Table({"encoder/query": "bert.encoder.layer.0.attention.self.query"})
    >>> names.module_name("encoder/query/kernel", None)
    'bert.encoder.layer.0.attention.self.query'
    >>> names.param_path("bert.encoder.layer.0.attention.self.query", "kernel")
    ('encoder/query/kernel', None)
  """

  def __init__(self, table: Mapping[str, str | Sequence[str]]):
    self.table = dict(table)
    for key, value in self.table.items():
      ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                      and all(isinstance(v, str) for v in value))
      if not isinstance(key, str) or not ok:
        raise ConfigError(f"names table: {short(key)!s} -> {short(value)!s}; each entry maps a "
                          "parameter path (str) to a PEFT module name (str), or a stacked "
                          "weight's path to a list of names, one per layer")

  def _entry(self, path: str):
    for key in (path, paths.module_path(path)):
      if key in self.table:
        return self.table[key]
    return None

  def module_name(self, path: str, layer: int | None = None) -> str | None:
    entry = self._entry(path)
    if entry is None:
      return None
    if isinstance(entry, str):
      return entry if layer is None else None
    if layer is None or layer >= len(entry):
      return None
    return entry[layer]

  def param_path(self, module: str, leaf: str, scanned: bool = False) -> tuple[str, int | None]:
    for key, entry in self.table.items():
      names = [entry] if isinstance(entry, str) else list(entry)
      if module in names:
        path = key if key.rpartition(paths.SEP)[2] in ADAPTABLE_LEAVES else key + paths.SEP + leaf
        return path, None if isinstance(entry, str) else names.index(module)
    raise ConfigError(f"names table has no entry for PEFT module {short(module)}")


class Function:
  """A name map given as a function ``fn(path, layer) -> module name | None``.

  Example:
    >>> names = Function(lambda path, layer: path.rpartition("/")[0].replace("/", "."))
    >>> names.module_name("encoder/query/kernel", None)
    'encoder.query'
  """

  def __init__(self, fn: Callable[[str, int | None], str | None]):
    self.fn = fn

  def module_name(self, path: str, layer: int | None = None) -> str | None:
    name = self.fn(path, layer)
    if name is not None and not isinstance(name, str):
      raise ConfigError(f"names({path!r}, {layer!r}) returned {short(name)}, not a module "
                        "name (str) or None")
    return name


def resolve(names: Any = None, model: Any = None) -> Any:
  """The name map for ``names`` (see the module docstring); None: ``model``'s, else :data:`DEFAULT`.

  Example:
    >>> resolve({"dense": "fc1"}).module_name("dense/kernel")
    'fc1'
    >>> resolve().module_name("layers_2/mlp/up_proj/kernel")
    'model.layers.2.mlp.up_proj'
  """
  if names is None:
    make = getattr(model, "name_map", None)
    return make() if callable(make) else DEFAULT
  if hasattr(names, "module_name"):
    return names
  if isinstance(names, Mapping):
    return Table(names)
  if callable(names):
    return Function(names)
  raise ConfigError(f"names must be a table {{param path: PEFT module name}}, a function "
                    f"(path, layer) -> name, or a name map object; got {type(names).__name__}")


def param_path(names: Any, module: str, leaf: str, scanned: bool = False
               ) -> tuple[str, int | None]:
  """``names``' inverse: the parameter path (and layer) of PEFT ``module``."""
  inverse = getattr(names, "param_path", None)
  if inverse is None:
    raise ConfigError(f"the name map {type(names).__name__} cannot turn PEFT module names into "
                      "parameter paths (give a table, or an object with a param_path method), "
                      "or pass the model's params instead")
  return inverse(module, leaf, scanned)


def hf_module_name(param_path: str, layer: int | None = None) -> str:
  """The Hugging Face module name of a parameter path in the default layout.

  ``layers_3/self_attn/q_proj/kernel`` -> ``model.layers.3.self_attn.q_proj``;
  a scanned stack ``layers/self_attn/q_proj/kernel`` with ``layer=3`` gives
  the same; ``embed_tokens/embedding`` -> ``model.embed_tokens``;
  ``lm_head/kernel`` -> ``lm_head``.

  Example:
    >>> hf_module_name("layers_0/mlp/down_proj/kernel")
    'model.layers.0.mlp.down_proj'
  """
  return DEFAULT.hf_name(param_path, layer).rpartition(".")[0]


def jlora_param_path(hf_name: str, leaf: str, scanned: bool = False) -> tuple[str, int | None]:
  """Inverse of :func:`hf_module_name`: ``(param_path, layer index or None)``.

  ``leaf`` is the parameter's name ("kernel" for Dense, "embedding" for Embed).

  Example:
    >>> jlora_param_path("model.layers.2.self_attn.q_proj", "kernel")
    ('layers_2/self_attn/q_proj/kernel', None)
    >>> jlora_param_path("model.layers.2.self_attn.q_proj", "kernel", scanned=True)
    ('layers/self_attn/q_proj/kernel', 2)
  """
  return DEFAULT.param_path(hf_name, leaf, scanned)


# ---------------------------------------------------------------- sites

class Site:
  """One PEFT module of the model: where its weight lives in ``params``, and its layout."""

  def __init__(self, path: str, layer: int | None, weight: Any, info: L.LayerInfo, name: str):
    self.path, self.layer, self.weight, self.info, self.name = path, layer, weight, info, name
    shape = tuple(weight.shape)
    self.stack_shape, self.kernel_shape = shape[:info.stack], shape[info.stack:]
    self.in_dims = tuple(self.kernel_shape[i] for i in info.in_axes)
    self.out_dims = tuple(self.kernel_shape[i] for i in info.out_axes)

  @property
  def n_in(self) -> int:
    return math.prod(self.in_dims)

  @property
  def n_out(self) -> int:
    return math.prod(self.out_dims)

  @property
  def is_head(self) -> bool:
    """The output head (which PEFT's "all-linear" leaves out)."""
    return self.name.rpartition(".")[2] in HEAD_MODULES


def _guess_info(path: str, shape: tuple[int, ...]) -> L.LayerInfo | None:
  """Without a trace: 2-D kernels and embeddings, one stacked axis under ``layers/``."""
  stack = 1 if scanned(path) else 0
  if len(shape) - stack != 2:
    return None
  kind = "embed" if path.endswith("/embedding") else "dense"
  return L.LayerInfo(kind, (0,), (1,), stack)


def sites(params: Any, layers: Mapping[str, L.LayerInfo] | None = None, names: Any = None
          ) -> dict[str, Site]:
  """``{PEFT module name: site}`` for every adaptable weight of ``params`` that ``names`` names.

  ``layers`` gives traced layer info; without it, 2-D ``kernel``/``embedding``
  leaves are Dense/Embed weights and leaves under a ``layers`` stack (no
  index) carry one leading stacked axis. A stacked weight gets one module
  per layer.

  Raises:
    ConfigError: two weights (or layers) map to the same module name, or a
      table entry names no adaptable weight of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> table = sites({"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 16, 24))}}}})
    >>> sorted(table), table["model.layers.1.mlp.up_proj"].layer
    (['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'], 1)
  """
  names = resolve(names)
  out: dict[str, Site] = {}
  for path, w in paths.flatten(params).items():
    if path.rpartition(paths.SEP)[2] not in ADAPTABLE_LEAVES or not hasattr(w, "shape"):
      continue
    info = (layers or {}).get(path) or _guess_info(path, tuple(w.shape))
    if not isinstance(info, L.LayerInfo) or info.stack > 1:
      continue   # not a matmul/lookup weight, or several stacked axes: PEFT has no name for it
    for layer in (range(w.shape[0]) if info.stack else [None]):
      name = names.module_name(path, layer)
      if name is None:
        continue
      if name in out:
        other = out[name]
        raise ConfigError(f"the name map gives {short(path)}{_at(layer)} and "
                          f"{short(other.path)}{_at(other.layer)} the same PEFT module name "
                          f"{short(name)}")
      out[name] = Site(path, layer, w, info, name)
  if isinstance(names, Table):
    found = {s.path for s in out.values()} | {paths.module_path(s.path) for s in out.values()}
    unused = sorted(set(names.table) - found)
    if unused:
      raise ConfigError(f"names table entries {unused[:4]} are not adaptable weights of params "
                        f"(kernels or embeddings used by a matmul or lookup; e.g. "
                        f"{sorted({s.path for s in out.values()})[:3]})")
  return out


def _at(layer: int | None) -> str:
  return "" if layer is None else f" (layer {layer})"
