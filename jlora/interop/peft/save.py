"""Writing a jlora adapter as a PEFT LoRA adapter directory: ``save`` and ``export``."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from jlora import adapter as adapter_lib
from jlora import lora as L
from jlora.config import LoraConfig
from jlora.errors import AdapterError, short
from jlora.interop.hf_names import NameMap
from jlora.interop.peft import config as pc
from jlora.interop.peft import names as N
from jlora.interop.peft.tensors import WEIGHTS_NAME, host, module_tensors

CONFIG_NAME = pc.CONFIG_NAME


def save(directory: str | os.PathLike, adapter: Any, cfg: LoraConfig | None = None, *,
         names: Any = None, base_model_name_or_path: str | None = None,
         task_type: str | None = "CAUSAL_LM", overwrite: bool = True) -> None:
  """Writes ``adapter`` as a PEFT LoRA adapter directory.

  ``adapter_model.safetensors`` gets PEFT's keys and layouts (``lora_A.weight
  = a.T``, ``lora_B.weight = b.T``, ``lora_embedding_A/B`` for Embed weights,
  ``lora_magnitude_vector`` for DoRA, one key per layer of a scanned stack);
  ``adapter_config.json`` gets ``r``, ``lora_alpha``, ``use_rslora``,
  ``use_dora``, ``lora_dropout``, ``target_modules`` and rank/alpha patterns
  that reproduce every adapted module's rank and alpha under PEFT's rules.

  The directory is replaced as a whole, atomically (the same helper as
  ``jlora.save``): the files are written to a temporary directory beside it,
  the old directory's other files (a README, say) are linked into it, and it
  is swapped in with one rename. A failed or killed save leaves the old
  adapter, config and weights together, as they were.

  Args:
    directory: output directory (created; an existing adapter there is replaced).
    overwrite: replace an existing ``directory`` (else CheckpointError).
    adapter: the jlora adapter tree (Dense/Einsum and Embed weights; at most one
      stacked axis).
    cfg: the LoraConfig it was made with (for ``r``/``lora_alpha`` defaults,
      bare target names and init); None derives everything from the adapter.
    names: the name map from the adapter's paths to PEFT module names (see
      :func:`jlora.peft.load`; e.g. ``model.name_map()``, a table or a
      function); None: Hugging Face's ``*ForCausalLM`` layout.
    base_model_name_or_path, task_type: written to the config for PEFT.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.zeros((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}},
    ...      base_model_name_or_path="meta-llama/Llama-3.2-1B")
    >>> sorted(os.listdir(out))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> json.load(open(f"{out}/adapter_config.json"))["target_modules"]
    ['model.layers.0.mlp.up_proj']
  """
  tensors, config = export(adapter, cfg, names=names,
                           base_model_name_or_path=base_model_name_or_path, task_type=task_type)
  _write_atomic(directory, tensors, config, overwrite)


def export(adapter: Any, cfg: LoraConfig | None = None, *, names: Any = None,
           base_model_name_or_path=None, task_type="CAUSAL_LM"
           ) -> tuple[dict[str, np.ndarray], dict]:
  """The ``(tensors, config)`` that :func:`save` writes, as ``{key: array}`` and a dict.

  Example:
    >>> import jax.numpy as jnp
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> tensors, config = export({"lm_head": {"kernel": lora}})
    >>> {k: v.shape for k, v in sorted(tensors.items())}
    {'base_model.model.lm_head.lora_A.weight': (4, 16), 'base_model.model.lm_head.lora_B.weight': (24, 4)}
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (4, 8, ['lm_head'])
  """
  names = N.resolve(names)
  nodes = adapter_lib.loras(adapter)
  if not nodes:
    raise AdapterError("save: the adapter has no LoRA nodes")
  for path, lo in nodes.items():
    _check_exportable(path, lo)
  _check_uniform(nodes, cfg)
  tensors, settings = {}, {}
  for path, lo in nodes.items():
    lo = jax.tree.map(host, lo)   # to host once; slicing and transposes in NumPy
    for layer in range(lo.stack_dims[0]) if lo.stack else [None]:
      name = names.module_name(path, layer)
      if name is None:
        where = f"layer {layer} of the stacked " if layer is not None else ""
        raise AdapterError(f"save: the name map gives {where}{short(path)} no PEFT module name"
                           + (" (only a scanned 'layers/...' stack has per-layer names in the "
                              "default layout)" if isinstance(names, NameMap) else ""))
      if name in settings:
        raise AdapterError(f"save: {short(path)} and {short(settings[name][2])} both map to PEFT "
                           f"module {short(name)}")
      settings[name] = (lo.rank, float(lo.alpha), path)
      tensors.update(module_tensors(name, lo, layer))
  config = pc.to_peft_config(nodes, settings, cfg, base_model_name_or_path, task_type,
                             bare_names=isinstance(names, NameMap))
  return tensors, config


def _check_exportable(path: str, lo: L.LoRA) -> None:
  if lo.kind not in ("dense", "einsum", "embed"):
    raise AdapterError(f"save: {short(path)} is a {lo.kind} LoRA; PEFT export supports Dense/Einsum "
                     "(nn.Linear) and Embed (nn.Embedding) weights")
  if lo.stack > 1:
    raise AdapterError(f"save: {short(path)} has {lo.stack} stacked axes {list(lo.stack_dims)}; "
                     "PEFT export supports at most one (a scanned layer stack)")
  if lo.a.shape[-1] != lo.rank:
    raise AdapterError(f"save: {short(path)} has a: {list(lo.a.shape)} padded beyond its rank "
                     f"{lo.rank} (an AdapterBank slot?); PEFT needs the unpadded adapter")
  if lo.kind == "embed" and (len(lo.in_dims) != 1 or len(lo.out_dims) != 1):
    raise AdapterError(f"save: embedding {short(path)} must be [vocab, dim], got {list(lo.kernel_shape)}")


def _check_uniform(nodes: Mapping[str, L.LoRA], cfg: LoraConfig | None) -> None:
  """PEFT has one use_rslora and one use_dora per adapter."""
  for what, get, want in (("rsLoRA", lambda lo: lo.rslora, cfg and cfg.use_rslora),
                          ("DoRA", lambda lo: lo.use_dora, cfg and cfg.use_dora)):
    values = {get(lo) for lo in nodes.values()}
    if len(values) > 1:
      some = sorted(p for p, lo in nodes.items() if get(lo))[:3]
      raise AdapterError(f"save: PEFT needs {what} on all adapted weights or none; it is on "
                       f"only some (e.g. {some})")
    if cfg is not None and values != {bool(want)}:
      raise AdapterError(f"save: the adapter's {what} setting {values.pop()} disagrees with cfg's "
                       f"{bool(want)}")
  if cfg is not None and cfg.init == "pissa":
    raise AdapterError("save: a PiSSA adapter (init='pissa') is relative to the residual base "
                     "unmerge(params, adapter); merge it, or save the residual base with it")


def _write_atomic(directory, tensors: Mapping[str, np.ndarray], config: dict,
                  overwrite: bool) -> None:
  """Both files into a new directory that replaces ``directory`` in one rename."""
  from safetensors.numpy import save_file
  from jlora.checkpoint import files
  target = files.local_path(directory)
  with files.atomic_directory(target, overwrite=overwrite, owned=lambda _: None,
                              carry_over=True) as tmp:
    if not files.is_primary():
      return
    weights = os.path.join(tmp, WEIGHTS_NAME)
    save_file(dict(tensors), weights, metadata={"format": "pt"})
    with open(weights, "rb+") as f:
      os.fsync(f.fileno())
    with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
