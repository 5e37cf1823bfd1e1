"""Hugging Face checkpoints <-> jlora's reference models.

:func:`from_hf` reads ``config.json`` and the safetensors weights of a
checkpoint directory of any family in :mod:`jlora.models.registry` (Llama,
Mistral, Qwen2, Qwen3, Gemma 1/2/3 text, Phi-3) into its reference model and
``params`` tree, tensor by tensor; :func:`to_hf` writes them back. A
directory may also be named by its Hugging Face Hub id (``"org/name"``),
found in the local Hugging Face cache (:mod:`jlora.interop.hub`).

The registry is all this module knows of ``jlora.models``, and it asks for
it only when a model is built (``from_hf`` / ``to_hf``), so importing
:mod:`jlora.interop` does not import the models: each family's config map
and name map live with that family. Names map as::

  model.embed_tokens.weight [vocab, d]          embed_tokens/embedding [vocab, d]
  model.layers.{i}.self_attn.q_proj.weight      layers_{i}/self_attn/q_proj/kernel
    [out, in]                                     [in, out] (transposed)
  model.layers.{i}.input_layernorm.weight       layers_{i}/input_layernorm/scale
  model.norm.weight, lm_head.weight             norm/scale, lm_head/kernel

and with ``scan_layers=True`` the per-layer tensors are stacked under
``layers/...`` with a leading ``[num_hidden_layers]`` axis.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding

from jlora import paths
from jlora.errors import ConfigError, FormatError, short
from jlora.interop import hub
from jlora.interop import safetensors_io as st
from jlora.interop.hf_names import NameMap, scanned

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # buffers some old checkpoints saved


# ----------------------------------------------------------------------------- names

_NAMES = NameMap()   # the layout every registered family shares (Family.names)


def __getattr__(name: str):
  """``config_from_hf`` / ``config_to_hf``: the registry's, imported when first asked for."""
  if name in ("config_from_hf", "config_to_hf"):
    from jlora.models import registry
    return getattr(registry, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hf_name(path: str, layer: int | None = None) -> str:
  """The Hugging Face tensor name of the jlora parameter at ``path`` (Llama's name map).

  ``layer`` picks the layer of a scanned ``layers/...`` path. Every
  registered family uses this layout (``registry.family(t).names``).

  Example:
    >>> hf_name("layers_3/self_attn/q_proj/kernel")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_name("layers/mlp/down_proj/kernel", layer=1)
    'model.layers.1.mlp.down_proj.weight'
  """
  return _NAMES.hf_name(path, layer)


def flax_path(name: str, *, scan_layers: bool = False) -> tuple[str, int | None]:
  """Inverse of :func:`hf_name`: ``(jlora path, layer or None)`` of an HF tensor name.

  Example:
    >>> flax_path("model.layers.3.self_attn.q_proj.weight")
    ('layers_3/self_attn/q_proj/kernel', None)
    >>> flax_path("model.layers.3.self_attn.q_proj.weight", scan_layers=True)
    ('layers/self_attn/q_proj/kernel', 3)
  """
  return _NAMES.flax_path(name, scan_layers=scan_layers)


def _is_kernel(path: str) -> bool:
  return path.rpartition(paths.SEP)[2] == "kernel"




# ----------------------------------------------------------------------------- loading

def from_hf(directory: str | os.PathLike, dtype=jnp.float32, *, scan_layers: bool = False,
            quantize: str | Mapping[str, Any] | Callable[[str, jax.Array], Any] | None = None,
            shardings: Any = None, progress: bool | None = None, revision: str | None = None,
            download: bool = False) -> tuple[Any, dict]:
  """Loads a Hugging Face safetensors checkpoint of a registered family.

  ``model_type`` in ``config.json`` picks the family
  (:func:`jlora.models.registry.model_types`: llama, mistral, qwen2, qwen3,
  gemma, gemma2, gemma3_text, phi3); a field whose value changes the math
  in a way jlora does not implement raises a :class:`jlora.ConfigError`
  naming it.

  Tensors are read one at a time from the memory-mapped files (single
  ``model.safetensors`` or shards listed in ``model.safetensors.index.json``),
  transposed to Flax's ``[in, out]`` kernels, cast to ``dtype``, placed, and
  handed to ``quantize``; so with a quantizing hook the full-precision model
  never exists in memory at once (with ``scan_layers``, one stacked parameter
  — e.g. every layer's ``q_proj`` — does). Only safetensors and JSON are
  read, never pickle.

  Args:
    directory: the checkpoint directory (``config.json`` + safetensors), or a
      Hugging Face Hub name (``"org/name"``) found in the local Hugging Face
      cache (:func:`jlora.interop.hub.resolve`).
    dtype: parameter and computation dtype of the returned model.
    scan_layers: stack the layers under ``layers/...`` (``[L, ...]``) for an
      ``nn.scan`` model instead of ``layers_{i}/...``.
    quantize: quantize as loading goes: a scheme name ("nf4", "fp4", "int4",
      "int8") or a dict of ``jlora.quantize`` keyword arguments (``scheme``,
      ``block_size``, ``double_quant``, ``targets``, ``min_size``): each
      parameter gets exactly what ``jlora.quantize`` of the whole tree would
      give it (by default every kernel but ``lm_head`` becomes a ``QArray``),
      and its float copy is freed at once. Or any hook ``(path, array) ->
      leaf`` applied to every parameter right after it is loaded (return the
      array unchanged to skip one).
    shardings: where to put each parameter: a ``jax.sharding.Mesh`` (shardings
      from the model's logical axis names, ``jlora.sharding.param_shardings``),
      one ``Sharding`` for all, a tree of ``Sharding`` shaped like the params,
      or a callable ``(path, ShapeDtypeStruct) -> Sharding | None``. Each
      device then reads only its own slice of the file.
    progress: show a tqdm bar (if tqdm is installed); None: when loading 64+ tensors.
    revision: with a Hub name, the branch, tag or commit (default "main").
    download: with a Hub name that is not cached, download its JSON and
      safetensors files (by default nothing is downloaded).

  Returns:
    ``(model, params)``: the family's model (a :class:`jlora.models.Llama`
    with the family's config switches) and its plain (unboxed) parameter tree; ``model.apply({"params": params}, ids)`` gives
    logits ``[batch, seq, vocab]``.

  Raises:
    FileNotFoundError / ValueError naming the file or tensor: no checkpoint
    (a Hub name not in the cache: :class:`jlora.CheckpointError`),
    an unsupported ``model_type`` or config field (``jlora.ConfigError``), a truncated or inconsistent safetensors
    file, missing, unexpected or wrongly shaped tensors.

  Example:
      model, params = from_hf("TinyLlama/TinyLlama-1.1B-Chat-v1.0", dtype=jnp.bfloat16)
      logits = model.apply({"params": params}, ids)
  """
  from jlora.models import registry
  directory = hub.resolve(directory, "config.json", revision=revision, download=download,
                          what="model")
  source = os.path.join(directory, "config.json")
  config = registry.config_from_hf(st.read_json(source), dtype=dtype, scan_layers=scan_layers,
                          source=source)
  fam = registry.family(config.model_type)
  with st.open_checkpoint(directory) as ckpt:
    _check_sizes(ckpt, config, directory)    # before tracing a model of the declared size
    boxed = fam.abstract_params(config)
    specs = paths.flatten(nn.unbox(boxed))
    plan = {p: _names_of(p, config, fam.names) for p in specs}
    place = _placer(shardings, boxed, specs)
    quantize = _quantizer(quantize)
    np_dtype = np.dtype(dtype)
    _check_names(ckpt, plan, config, directory)
    n_tensors = sum(len(v) for v in plan.values())
    flat = {}
    for path in _progress(list(plan), progress, n_tensors, os.path.basename(directory)):
      arr = _load(ckpt, path, plan[path], specs[path], place(path), np_dtype)
      flat[path] = arr if quantize is None else quantize(path, arr)
  return fam.model(config), paths.unflatten(flat)


def _names_of(path: str, config: Any, names: Any) -> list[str]:
  if scanned(path):
    return [names.hf_name(path, i) for i in range(config.num_hidden_layers)]
  return [names.hf_name(path)]


def _check_sizes(ckpt: st.Checkpoint, config: Any, directory: str) -> None:
  """config.json's layer count and embedding size against the files' tensor names and shapes."""
  layers = set()
  for n in ckpt.names:
    parts = n.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
      layers.add(int(parts[2]))
  if layers != set(range(config.num_hidden_layers)):
    raise FormatError(f"{directory}: config.json declares {config.num_hidden_layers} layers but "
                      f"the checkpoint's tensors are for {len(layers)} "
                      f"(layer indices {sorted(layers)[:4]}{' ...' if len(layers) > 4 else ''})")
  embed = "model.embed_tokens.weight"
  want = [config.vocab_size, config.hidden_size]
  if embed in ckpt.names and list(ckpt.shape(embed)) != want:
    raise FormatError(f"{directory}: config.json declares vocab_size x hidden_size = {want}, but "
                      f"{embed} is {list(ckpt.shape(embed))}")


def _check_names(ckpt: st.Checkpoint, plan: dict, config: Any, directory: str) -> None:
  expected = {n for names in plan.values() for n in names}
  missing = sorted(expected - ckpt.names)
  if missing:
    raise FormatError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) that its "
                     f"config.json ({config.model_type}) needs, e.g. {missing[:4]}")
  def ignorable(n):
    return n.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and n == "lm_head.weight")
  extra = sorted(n for n in ckpt.names - expected if not ignorable(n))
  if extra:
    raise FormatError(f"{directory}: unexpected tensor(s) {extra[:4]} (in "
                     f"{ckpt.file_of(extra[0])}) that a {config.model_type} model with this "
                     "config.json does not have")


def _load(ckpt: st.Checkpoint, path: str, names: list[str], spec: jax.ShapeDtypeStruct,
          sharding: Sharding | None, np_dtype: np.dtype) -> jax.Array:
  stacked, kernel = scanned(path), _is_kernel(path)
  layer_shape = tuple(spec.shape[1:] if stacked else spec.shape)
  want = layer_shape[::-1] if kernel else layer_shape
  for n in names:
    if ckpt.shape(n) != want:
      raise FormatError(f"tensor {short(n)} in {ckpt.file_of(n)} has shape {list(ckpt.shape(n))}, "
                       f"but config.json implies {list(want)} (jlora {path}: {list(layer_shape)}"
                       f"{' transposed' if kernel else ''})")
    if ckpt.dtype(n) not in st.FLOAT_DTYPES:
      raise FormatError(f"tensor {short(n)} in {ckpt.file_of(n)} has dtype {ckpt.dtype(n)}; only "
                       f"floating-point weights {st.FLOAT_DTYPES} can be loaded")

  def fetch(name, index=None):   # index: per-layer slices in the jlora layout
    x = ckpt.read(name, None if index is None else tuple(index)[::-1] if kernel else tuple(index))
    return (x.T if kernel else x).astype(np_dtype)

  if sharding is None:
    if not stacked:
      return jnp.asarray(fetch(names[0]))
    host = np.empty(spec.shape, np_dtype)
    for i, n in enumerate(names):
      host[i] = fetch(n)
    return jnp.asarray(host)

  def callback(index):
    if not stacked:
      return fetch(names[0], index)
    return np.stack([fetch(names[i], index[1:]) for i in range(len(names))[index[0]]])
  return jax.make_array_from_callback(tuple(spec.shape), sharding, callback)


def _quantizer(spec: Any) -> Callable[[str, jax.Array], Any] | None:
  if spec is None or callable(spec):
    return spec
  if isinstance(spec, str):
    spec = {"scheme": spec}
  if not isinstance(spec, Mapping):
    raise TypeError(f"from_hf: quantize must be a scheme name, a dict of jlora.quantize "
                    f"arguments or a callable, got {type(spec).__name__}")
  from jlora.quant import quantize as quantize_tree
  kwargs = dict(spec)

  def hook(path, x):
    tree = quantize_tree(paths.unflatten({path: x}), donate=True, **kwargs)
    return paths.flatten(tree)[path]
  return hook


def _placer(shardings: Any, boxed: Any, specs: dict) -> Callable[[str], Sharding | None]:
  if shardings is None:
    return lambda path: None
  if isinstance(shardings, Mesh):
    from jlora.sharding import param_shardings
    shardings = param_shardings(boxed, shardings)
  if isinstance(shardings, Sharding):
    return lambda path: shardings
  if callable(shardings):
    return lambda path: shardings(path, specs[path])
  flat = paths.flatten(shardings, is_leaf=lambda x: isinstance(x, Sharding) or x is None)
  absent = [p for p in specs if p not in flat]
  if absent:
    raise ConfigError(f"from_hf: shardings has no entry for {absent[:3]} (it must mirror the "
                     f"params tree, e.g. jlora.sharding.param_shardings(abstract_params(cfg), mesh))")
  return flat.get


def _progress(items: list, progress: bool | None, n_tensors: int, desc: str,
              verb: str = "loading"):
  if progress is False or (progress is None and n_tensors < 64):
    return items
  try:
    from tqdm import tqdm
  except ImportError:
    return items
  return tqdm(items, desc=f"{verb} {desc}", unit="param")


# ----------------------------------------------------------------------------- writing

def to_hf(directory: str | os.PathLike, config: Any, params: Any, *,
          max_shard_size: int | None = None, dtype=None,
          extra_config: Mapping[str, Any] | None = None, keep_quantized: bool = False,
          progress: bool | None = None) -> list[str]:
  """Writes ``params`` as a Hugging Face checkpoint: ``config.json`` + safetensors.

  The inverse of :func:`from_hf` (kernels transposed back to ``[out, in]``,
  scanned stacks split per layer); transformers' ``from_pretrained`` reads
  the result. Quantized leaves (``QArray``) are dequantized first, unless
  ``keep_quantized``: then NF4/FP4 kernels are written as bitsandbytes 4-bit
  weights (:mod:`jlora.quant.bnb_format`, bit for bit) and ``config.json``
  gets the ``quantization_config`` under which transformers (with
  bitsandbytes installed) loads them as ``Linear4bit`` layers.

  Args:
    directory: created if needed.
    config: the model's :class:`jlora.models.LlamaConfig` (``model_type``
      picks the family; a :class:`jlora.ConfigError` names fields that
      ``model_type`` cannot express).
    params: the (boxed or plain) parameter tree of the family's model.
    max_shard_size: bytes per safetensors shard (with an index); None: one file.
    dtype: cast every tensor to this dtype; None keeps each one's dtype.
    extra_config: more ``config.json`` fields that the model does not hold
      (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...); one that
      contradicts a field jlora writes raises a :class:`jlora.ConfigError`.
    keep_quantized: write NF4/FP4 ``QArray`` kernels in bitsandbytes' layout
      (all of one scheme and double-quantization setting; int8/int4 have no
      transformers equivalent and raise a :class:`jlora.ConfigError`).
    progress: show a tqdm bar (if tqdm is installed); None: for 64+ parameters.

  Returns:
    The names of the files written.

  Example:
      to_hf("out", model.config, params, max_shard_size=2**30,
            extra_config={"eos_token_id": 2})
  """
  from jlora.models import registry
  directory = os.fspath(directory)
  fam = registry.family(config.model_type, "to_hf")
  hf_config = registry.config_to_hf(config)       # refuses what the model_type cannot express
  clash = {k: v for k, v in (extra_config or {}).items() if k in hf_config and hf_config[k] != v}
  if clash:
    raise ConfigError(f"to_hf: extra_config {clash} contradicts the model's config.json fields "
                      f"{ {k: hf_config[k] for k in clash} }")
  hf_config = {**hf_config, **(extra_config or {})}
  specs = paths.flatten(nn.unbox(fam.abstract_params(config)))
  flat = paths.flatten(nn.unbox(params))
  missing, extra = sorted(set(specs) - set(flat)), sorted(set(flat) - set(specs))
  if missing or extra:
    raise ConfigError(f"to_hf: params do not match the config's model: missing {missing[:4]}, "
                     f"unexpected {extra[:4]}")
  for p, spec in specs.items():
    if tuple(flat[p].shape) != tuple(spec.shape):
      raise ConfigError(f"to_hf: parameter {p!r} has shape {list(flat[p].shape)}, but the "
                       f"config implies {list(spec.shape)}")

  from jlora.quant.qarray import QArray
  quantized = {p for p, x in flat.items() if isinstance(x, QArray)} if keep_quantized else set()
  if quantized:
    hf_config["quantization_config"] = _bnb_config(flat, quantized, fam.names, config.num_hidden_layers)

  def host(x):
    x = x.dequantize() if hasattr(x, "dequantize") else x
    x = np.asarray(jax.device_get(x))
    return x if dtype is None else x.astype(np.dtype(dtype))

  def bnb(q, name):
    from jlora.quant import bnb_format
    return bnb_format.to_bnb(jax.device_get(q), name).items()

  def tensors():
    for p in _progress(list(specs), progress, len(specs), os.path.basename(directory), "writing"):
      layers = range(config.num_hidden_layers) if scanned(p) else [None]
      if p in quantized:
        for i in layers:
          yield from bnb(flat[p] if i is None else flat[p][i], fam.names.hf_name(p, i))
        continue
      x, kernel = host(flat[p]), _is_kernel(p)
      for i in layers:
        xi = x if i is None else x[i]
        yield fam.names.hf_name(p, i), (xi.T if kernel else xi)

  first = np.dtype(dtype if dtype is not None else flat["embed_tokens/embedding"].dtype)
  files = st.write_checkpoint(directory, tensors(), max_shard_size=max_shard_size)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(hf_config, torch_dtype=first.name), f, indent=2)
  return files + ["config.json"]


def _bnb_config(flat: Mapping[str, Any], quantized: set, names: NameMap, n_layers: int) -> dict:
  """transformers' ``quantization_config`` for bitsandbytes 4-bit weights at ``quantized``."""
  qs = {p: flat[p] for p in sorted(quantized)}
  kinds = {(q.scheme, q.double_quant, np.dtype(q.dtype).name) for q in qs.values()}
  if len(kinds) > 1 or next(iter(kinds))[0] not in ("nf4", "fp4"):
    raise ConfigError(f"to_hf(keep_quantized=True): transformers holds one bitsandbytes 4-bit "
                      f"scheme per model (nf4 or fp4, one double-quantization setting, one "
                      f"dtype); these weights have (scheme, double_quant, dtype) {sorted(kinds)}")
  odd = [p for p in qs if not _is_kernel(p)]
  if odd:
    raise ConfigError(f"to_hf(keep_quantized=True): only Dense kernels become bitsandbytes "
                      f"Linear4bit layers; {odd[:3]} are quantized too (dequantize them)")
  (scheme, double_quant, dtype), = kinds
  skip = sorted(names.hf_name(p, i).rpartition(".")[0]
                for p in flat if _is_kernel(p) and p not in quantized
                for i in (range(n_layers) if scanned(p) else [None]))
  return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
          "bnb_4bit_quant_type": scheme, "bnb_4bit_use_double_quant": bool(double_quant),
          "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8",
          "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
          "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
