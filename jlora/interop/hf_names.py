"""Hugging Face names of jlora parameters: the ``*ForCausalLM`` layout.

Hugging Face names a tensor by the dotted path of its module plus
``weight`` or ``bias``; PEFT names an adapted module by the same dotted
path. :class:`NameMap` maps jlora's ``/``-joined parameter paths to both,
for models laid out like the reference :class:`jlora.models.Llama`
(``layers_{i}/...`` or a scanned ``layers/...`` stack). Each model family
holds its own instance (``jlora.models.registry.family(t).names``); this
module holds only the mechanism, so :mod:`jlora.interop` needs nothing from
:mod:`jlora.models` to name tensors and modules.
"""
from __future__ import annotations

import dataclasses

from jlora import paths


def scanned(path: str) -> bool:
  """A scanned layer stack in the reference models' layout: ``layers/...`` (no index).

  Example:
    >>> scanned("layers/mlp/up_proj/kernel"), scanned("layers_0/mlp/up_proj/kernel")
    (True, False)
  """
  return path.split(paths.SEP)[0] == "layers"


@dataclasses.dataclass(frozen=True)
class NameMap:
  """jlora parameter paths <-> Hugging Face tensor and module names, for one layout.

  ``<prefix>.layers.{i}.<module path>.weight|bias`` for the decoder layers,
  ``<prefix>.<module>`` for the other modules but the ``heads`` (kept at the
  top: ``lm_head.weight``). Leaves: ``embedding`` for ``embed_tokens``,
  ``scale`` for modules whose name ends in ``norm``, ``kernel`` otherwise
  (transposed: PyTorch ``[out, in]`` is Flax ``[in, out]``).

  It is also a name map for :func:`jlora.peft.load` / :func:`jlora.peft.save`
  (:meth:`module_name`, :meth:`param_path`).

  Attributes:
    prefix: the base model's attribute in the ``*ForCausalLM`` class.
    heads: top-level modules outside ``prefix``.

  Example:
    >>> names = NameMap()
    >>> names.hf_name("layers_3/self_attn/q_norm/scale")
    'model.layers.3.self_attn.q_norm.weight'
    >>> names.flax_path("model.layers.3.mlp.gate_up_proj.weight", scan_layers=True)
    ('layers/mlp/gate_up_proj/kernel', 3)
    >>> names.module_name("layers/mlp/up_proj/kernel", 1), names.module_name("lm_head/kernel")
    ('model.layers.1.mlp.up_proj', 'lm_head')
  """
  prefix: str = "model"
  heads: tuple[str, ...] = ("lm_head",)

  def hf_name(self, path: str, layer: int | None = None) -> str:
    """The tensor name of the parameter at ``path`` (``layer`` of a scanned ``layers/...``)."""
    *mods, leaf = path.split(paths.SEP)
    if not mods:
      raise ValueError(f"hf_name: {path!r} is not a module/parameter path")
    head = mods[0]
    if head == "layers":
      if layer is None:
        raise ValueError(f"hf_name: {path!r} is a scanned layer stack; pass layer=")
      mods = [self.prefix, "layers", str(layer)] + mods[1:]
    elif head.startswith("layers_"):
      mods = [self.prefix, "layers", head[len("layers_"):]] + mods[1:]
    elif head not in self.heads:
      mods = [self.prefix] + mods
    return ".".join(mods + ["bias" if leaf == "bias" else "weight"])

  def flax_path(self, name: str, *, scan_layers: bool = False) -> tuple[str, int | None]:
    """Inverse of :meth:`hf_name`: ``(jlora path, layer or None)``."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
      raise ValueError(f"flax_path: {name!r} is not a '<module>.weight|bias' tensor name")
    *mods, leaf = parts
    mods = mods[1:] if mods[0] == self.prefix else mods
    layer = None
    if len(mods) > 2 and mods[0] == "layers" and mods[1].isdigit():
      layer = int(mods[1])
      mods = (["layers"] if scan_layers else [f"layers_{layer}"]) + mods[2:]
    last = mods[-1]
    if leaf == "bias":
      leaf = "bias"
    elif last == "embed_tokens":
      leaf = "embedding"
    elif last.endswith("norm"):
      leaf = "scale"
    else:
      leaf = "kernel"
    return paths.SEP.join(mods + [leaf]), (layer if scan_layers else None)

  # -------------------------------------------------------------- as a PEFT name map

  def module_name(self, path: str, layer: int | None = None) -> str | None:
    """The module name PEFT uses for the weight at ``path``; None if it has none.

    A scanned ``layers/...`` weight is named per ``layer``; a weight outside
    ``layers/`` with a ``layer`` (a stack this layout does not know) has no name.
    """
    if (layer is None) == scanned(path):
      return None
    if len(path.split(paths.SEP)) < 2:
      return None
    return self.hf_name(path, layer).rpartition(".")[0]

  def param_path(self, module: str, leaf: str, scanned: bool = False) -> tuple[str, int | None]:
    """Inverse of :meth:`module_name`: ``(param path, layer or None)``; ``leaf`` is the
    parameter's name ("kernel", "embedding")."""
    path, layer = self.flax_path(module + ".weight", scan_layers=scanned)
    return paths.module_path(path) + paths.SEP + leaf, layer
