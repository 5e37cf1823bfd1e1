"""``jlora convert`` (PEFT <-> jlora adapters) and ``jlora inspect`` (what a directory holds).

``convert`` reads a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) and writes a jlora (orbax) adapter checkpoint,
or the other way round; the direction follows from what SRC is (``--to``
states it explicitly). ``--base`` names the Hugging Face model the adapter
belongs to: with it the adapter is checked against the model's weights (and
may target a scanned layer stack with ``--scan-layers``); without it the
shapes come from the adapter file alone. An existing DST is replaced only
with ``--force`` (and then atomically: a failed conversion leaves it as it
was).
"""
from __future__ import annotations

import os
import sys
from typing import Any

from jlora.errors import AdapterError, CheckpointError

PEFT, JLORA, HF = "peft", "jlora", "hf"


def locate(name: str) -> tuple[str, str]:
  """``(kind, directory)``: what ``name`` holds ("peft", "jlora" or "hf", a Hugging Face
  model) and where; a Hub name (``org/name``) is looked up in the local Hugging Face cache."""
  from jlora.interop import hub
  from jlora.interop.peft import config as peft_config
  if not os.path.isdir(name) and hub.is_repo_id(name):
    for marker, what in ((peft_config.CONFIG_NAME, "PEFT adapter"), ("config.json", "model")):
      try:
        name = hub.resolve(name, marker, what=what)
        break
      except CheckpointError:
        if marker == "config.json":
          raise
  if not os.path.isdir(name):
    raise FileNotFoundError(f"{name!r} is not a directory")
  if os.path.isfile(os.path.join(name, peft_config.CONFIG_NAME)):
    return PEFT, name
  if os.path.isfile(os.path.join(name, "config.json")):
    return HF, name
  return JLORA, name


def _kind_of(directory: str) -> str:
  """"peft" or "jlora": what the adapter directory holds (by its PEFT config)."""
  kind, _ = locate(directory)
  if kind == HF:
    raise AdapterError(f"{directory!r} is a Hugging Face model (config.json), not an adapter")
  return kind


def _base_params(base: str | None, scan_layers: bool) -> Any:
  from jlora.interop import from_hf
  _, params = from_hf(base, scan_layers=scan_layers)
  return params


def _load_peft(src: str, base: str | None, scan_layers: bool):
  from jlora.interop import peft
  if scan_layers and base is None:
    raise ValueError("--scan-layers needs --base: the number of layers of the stack comes "
                     "from the model")
  if base is not None:
    return peft.load(src, _base_params(base, scan_layers))
  copies = sorted(n for n, parts in peft.split_keys(peft.read_tensors(src)).items()
                  if "base" in parts)
  if copies:
    raise ValueError(f"{src!r} carries copies of base weights ({', '.join(copies)}), which PEFT "
                     "saves for embedding layers; pass --base HF_DIR so they can be checked "
                     "against the model")
  return peft.load(src, peft.params_from_file(src))


def _check_fits(adapter: Any, base: str, scan_layers: bool) -> None:
  _check_fits_params(adapter, _base_params(base, scan_layers), base)


def _check_fits_params(adapter: Any, params: Any, base: str) -> None:
  """Every adapter path is a weight of ``params`` with a shape the LoRA node fits."""
  from jlora import adapter as adapter_lib
  from jlora import lora as L
  from jlora import paths
  flat = paths.flatten(params)
  for path, lo in adapter_lib.loras(adapter).items():
    if path not in flat:
      raise AdapterError(f"adapter path {path!r} is not a weight of the model in {base!r}")
    L.check_weight(tuple(flat[path].shape), lo, path)


def convert(src: str, dst: str, *, to: str | None = None, base: str | None = None,
            scan_layers: bool = False, base_model_name: str | None = None,
            task_type: str | None = "CAUSAL_LM", force: bool = False, out=None) -> None:
  """Converts the adapter in ``src`` (PEFT or jlora) into the other format at ``dst``.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> jlora.save(f"{d}/ours", {"lm_head": {"kernel": lora}})
    >>> convert(f"{d}/ours", f"{d}/peft")
    read jlora adapter ...: 1 weight, 160 parameters, rank 4
    wrote PEFT adapter ... (adapter_config.json, adapter_model.safetensors)
    path            a        b        rank  alpha  scale  kind   dora
    lm_head/kernel  [16, 4]  [4, 24]  4     8      2      dense  no
  """
  import jlora
  from jlora import adapter as adapter_lib
  out = out or sys.stdout
  if os.path.lexists(dst) and not force:
    raise CheckpointError(f"{dst} exists; pass --force to replace it")
  source = _kind_of(src)
  target = to or (JLORA if source == PEFT else PEFT)
  if target == source:
    raise ValueError(f"{src!r} already is a {source} adapter; --to {target} converts nothing")
  if source == PEFT:
    adapter, cfg = _load_peft(src, base, scan_layers)
    print(f"read PEFT adapter {src}: {_summary(adapter)}", file=out)
    jlora.save(dst, adapter, overwrite=force)
    print(f"wrote jlora adapter checkpoint {dst}", file=out)
  else:
    adapter = jlora.restore(src)
    adapter_lib.loras(adapter)   # an adapter, not some other tree
    print(f"read jlora adapter {src}: {_summary(adapter)}", file=out)
    if base is not None:
      _check_fits(adapter, base, scan_layers)
      print(f"checked against the model in {base}", file=out)
    jlora.peft.save(dst, adapter, None, task_type=task_type,
                    base_model_name_or_path=base_model_name or base, overwrite=force)
    print(f"wrote PEFT adapter {dst} (adapter_config.json, adapter_model.safetensors)", file=out)
  _print_table(adapter, out)


def _summary(adapter: Any) -> str:
  from jlora import adapter as adapter_lib
  nodes = adapter_lib.loras(adapter)
  n = adapter_lib.count_params(adapter)
  flags = [name for name, on in (("rsLoRA", any(lo.rslora for lo in nodes.values())),
                                 ("DoRA", any(lo.use_dora for lo in nodes.values()))) if on]
  ranks = sorted({lo.rank for lo in nodes.values()})
  return (f"{len(nodes)} weight{'s' if len(nodes) != 1 else ''}, {n:,} parameters, rank {'/'.join(map(str, ranks))}"
          + (f", {' + '.join(flags)}" if flags else ""))


def _print_table(adapter: Any, out) -> None:
  from jlora import adapter as adapter_lib
  from jlora.summary import format_table
  rows = [("path", "a", "b", "rank", "alpha", "scale", "kind", "dora")]
  for path, lo in sorted(adapter_lib.loras(adapter).items()):
    rows.append((path, str(list(lo.a.shape)), str(list(lo.b.shape)), str(lo.rank),
                 f"{lo.alpha:g}", f"{lo.scale:.4g}", lo.kind + (" (stacked)" if lo.stack else ""),
                 "yes" if lo.use_dora else "no"))
  print(format_table(rows), file=out)


def inspect(directory: str, *, out=None) -> None:
  """Prints what ``directory`` holds: an adapter's paths, shapes, ranks, alphas and size
  (PEFT or jlora); a Hugging Face model's layout, tensors and size; a jlora base checkpoint's size.

  Example:
    >>> import tempfile, jax.numpy as jnp, jlora
    >>> d = tempfile.mkdtemp()
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> jlora.peft.save(f"{d}/peft", {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> inspect(f"{d}/peft")
    PEFT LoRA adapter ...: 1 weight, 160 parameters, rank 4
    path                          a        b        rank  alpha  scale  kind   dora
    layers_0/mlp/up_proj/kernel   [16, 4]  [4, 24]  4     8      2      dense  no
  """
  import jlora
  from jlora.interop import peft
  out = out or sys.stdout
  kind, directory = locate(directory)
  if kind == HF:
    from jlora.cli.models import inspect_model
    inspect_model(directory, out=out)
    return
  if kind == PEFT:
    adapter, cfg = peft.read(directory, peft.params_from_file(directory), check_base_copies=False)
    print(f"PEFT LoRA adapter {directory}: {_summary(adapter)}", file=out)
    copies = sorted(n for n, parts in peft.split_keys(peft.read_tensors(directory)).items()
                    if "base" in parts)
    if copies:
      print(f"also carries base weight copies (PEFT's save_embedding_layers) of: "
            f"{', '.join(copies)}", file=out)
  else:
    tree = jlora.restore(directory)
    try:
      adapter = tree
      summary = _summary(adapter)
    except AdapterError:
      print(f"jlora checkpoint {directory}: {_tree_summary(tree)}", file=out)
      return
    print(f"jlora adapter checkpoint {directory}: {summary}", file=out)
  _print_table(adapter, out)


def _tree_summary(tree: Any) -> str:
  """A base tree's size: values, bytes, and its quantized weights by scheme."""
  import collections
  import jax
  import jlora
  from jlora.summary import count_base
  qs = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jlora.QArray))
        if isinstance(x, jlora.QArray)]
  schemes = collections.Counter(q.scheme for q in qs)
  quant = ", ".join(f"{n} {s}" for s, n in sorted(schemes.items()))
  return (f"a parameter tree of {count_base(tree):,} values in {jlora.nbytes(tree):,} bytes"
          + (f" ({len(qs)} quantized weights: {quant})" if qs else ""))
