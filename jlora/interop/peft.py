"""Hugging Face PEFT LoRA adapters in and out: ``load`` and ``save``.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors``; only those two files are ever read (JSON and
safetensors: no pickle, no ``torch.load``). Keys and layouts (PyTorch
``[out, in]`` weights, jlora ``a: [in, r]``, ``b: [r, out]``):

  base_model.model.<module>.lora_A.weight           [r, in]    a = A.T
  base_model.model.<module>.lora_B.weight           [out, r]   b = B.T
  base_model.model.<module>.lora_embedding_A        [r, vocab] a = A.T  (Embed)
  base_model.model.<module>.lora_embedding_B        [dim, r]   b = B.T
  base_model.model.<module>.lora_magnitude_vector   [out]      DoRA magnitude

``<module>`` is the Hugging Face module name (``model.layers.0.self_attn.q_proj``,
``lm_head``); :func:`hf_module_name` maps a jlora parameter path to it. A
scanned layer stack (``layers/...`` with a leading ``[L]`` axis) maps layer
``i`` of PEFT to index ``i`` of the stacked ``a``/``b``.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import adapter as adapter_lib
from jlora import lora as L
from jlora import paths
from jlora.config import LoraConfig
from jlora.interop import hf
from jlora.interop import peft_config as pc
from jlora.errors import AdapterError, ConfigError, FormatError, short

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = pc.CONFIG_NAME
PREFIX = "base_model.model."
HEAD_MODULES = ("lm_head",)
# key suffix -> role; linear and embedding layers use different names.
SUFFIXES = {
    "lora_A.weight": ("A", "dense"), "lora_B.weight": ("B", "dense"),
    "lora_embedding_A": ("A", "embed"), "lora_embedding_B": ("B", "embed"),
    "lora_magnitude_vector": ("magnitude", None), "lora_magnitude_vector.weight": ("magnitude", None),
    "base_layer.weight": ("base", None),
}
ADAPTABLE_LEAVES = ("kernel", "embedding")


# ---------------------------------------------------------------- names

def hf_module_name(param_path: str, layer: int | None = None) -> str:
  """The Hugging Face module name of a jlora parameter path (Llama family).

  ``layers_3/self_attn/q_proj/kernel`` -> ``model.layers.3.self_attn.q_proj``;
  a scanned stack ``layers/self_attn/q_proj/kernel`` with ``layer=3`` gives
  the same; ``embed_tokens/embedding`` -> ``model.embed_tokens``;
  ``lm_head/kernel`` -> ``lm_head``. (The base-weight name map of
  :func:`jlora.interop.hf.hf_name`, without the ``.weight``.)

  Example:
    >>> hf_module_name("layers_0/mlp/down_proj/kernel")
    'model.layers.0.mlp.down_proj'
  """
  return hf.hf_name(param_path, layer).rpartition(".")[0]


def jlora_param_path(hf_name: str, leaf: str, scanned: bool = False) -> tuple[str, int | None]:
  """Inverse of :func:`hf_module_name`: ``(param_path, layer index or None)``.

  ``leaf`` is the parameter's name ("kernel" for Dense, "embedding" for Embed).

  Example:
    >>> jlora_param_path("model.layers.2.self_attn.q_proj", "kernel")
    ('layers_2/self_attn/q_proj/kernel', None)
    >>> jlora_param_path("model.layers.2.self_attn.q_proj", "kernel", scanned=True)
    ('layers/self_attn/q_proj/kernel', 2)
  """
  path, layer = hf.flax_path(hf_name + ".weight", scan_layers=scanned)
  return paths.module_path(path) + paths.SEP + leaf, layer


class _Site:
  """One Hugging Face module of the model: where its weight lives in ``params``."""

  def __init__(self, path: str, layer: int | None, weight: Any, info: L.LayerInfo):
    self.path, self.layer, self.weight, self.info = path, layer, weight, info
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
    return paths.module_path(self.path).rpartition(paths.SEP)[2] in HEAD_MODULES


def _is_stack(path: str) -> bool:
  """A scanned layer stack: the reference Llama's ``layers/...`` (no index)."""
  return path.split(paths.SEP)[0] == "layers"


def _guess_info(path: str, shape: tuple[int, ...]) -> L.LayerInfo | None:
  stack = 1 if _is_stack(path) else 0
  if len(shape) - stack != 2:
    return None
  kind = "embed" if path.endswith("/embedding") else "dense"
  return L.LayerInfo(kind, (0,), (1,), stack)


def sites(params: Any, layers: Mapping[str, L.LayerInfo] | None = None) -> dict[str, _Site]:
  """``{hf_module_name: site}`` for every adaptable weight of ``params``.

  ``layers`` gives traced layer info; without it, 2-D ``kernel``/``embedding``
  leaves are Dense/Embed weights and leaves under a ``layers`` stack (no
  index) carry one leading stacked axis.

  Example:
    >>> table = sites({"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 16, 24))}}}})
    >>> sorted(table), table["model.layers.1.mlp.up_proj"].layer
    (['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'], 1)
  """
  out = {}
  for path, w in paths.flatten(params).items():
    if path.rpartition(paths.SEP)[2] not in ADAPTABLE_LEAVES or not hasattr(w, "shape"):
      continue
    info = (layers or {}).get(path) or _guess_info(path, tuple(w.shape))
    if info is None or info.stack > 1 or info.stack != _is_stack(path):
      continue   # no Hugging Face module name: PEFT cannot address it
    if info.stack == 1:
      for i in range(w.shape[0]):
        out[hf_module_name(path, i)] = _Site(path, i, w, info)
    else:
      out[hf_module_name(path)] = _Site(path, None, w, info)
  return out


# ---------------------------------------------------------------- reading

def read_tensors(directory: str | os.PathLike) -> dict[str, jax.Array]:
  """Reads ``adapter_model.safetensors`` (and nothing else) as ``{key: array}``.

  Raises a ValueError naming the file when it is truncated or corrupt, and
  when the directory only has a pickled ``adapter_model.bin``.

  Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"lm_head": {"kernel": L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), rank=4)}})
    >>> sorted(read_tensors(out))
    ['base_model.model.lm_head.lora_A.weight', 'base_model.model.lm_head.lora_B.weight']
  """
  from safetensors import SafetensorError
  from safetensors.flax import load_file
  d = os.fspath(directory)
  path = os.path.join(d, WEIGHTS_NAME)
  if not os.path.isfile(path):
    if os.path.isfile(os.path.join(d, "adapter_model.bin")):
      raise FormatError(f"{short(d)} has only a pickled adapter_model.bin; jlora reads safetensors only "
                       "(never pickle): re-save it from PEFT with safe_serialization=True")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {short(d)}")
  _check_header(path)
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                      f"{short(str(e), 300)}") from None


MAX_KEY_LENGTH = 1024
MAX_KEYS = 100_000
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_header(path: str) -> None:
  """Names, count and dtypes of the file's tensors, from its header alone (no data read)."""
  from safetensors import safe_open
  try:
    with safe_open(path, framework="numpy") as f:
      keys = list(f.keys())
      if len(keys) > MAX_KEYS:
        raise FormatError(f"{short(path)}: {len(keys):,} tensors; a LoRA adapter has at most "
                          f"{MAX_KEYS:,}")
      for k in keys:
        if len(k) > MAX_KEY_LENGTH:
          raise FormatError(f"{short(path)}: tensor name {short(k, 100)} is {len(k):,} "
                            f"characters long (at most {MAX_KEY_LENGTH})")
        dtype = f.get_slice(k).get_dtype()
        if dtype not in FLOAT_DTYPES:
          raise FormatError(f"{short(path)}: tensor {short(k)} has dtype {dtype}; LoRA weights "
                            f"are floating point {FLOAT_DTYPES}")
  except FormatError:
    raise
  except Exception as e:  # noqa: BLE001 (safetensors raises its own and builtin kinds)
    raise FormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                      f"{short(str(e), 300)}") from None


def split_keys(tensors: Mapping[str, Any]) -> dict[str, dict[str, tuple[str, Any]]]:
  """Groups file keys by module: ``{hf_name: {role: (key, tensor)}}``.

  Roles: "A", "B", "magnitude", "base"; each also records whether it came
  from a linear or an embedding key. Unknown keys raise, naming them.

  Example:
    >>> parts = split_keys({"base_model.model.lm_head.lora_A.weight": np.ones((4, 16))})
    >>> parts["lm_head"]["A"][0], parts["lm_head"]["A"][2]
    ('base_model.model.lm_head.lora_A.weight', 'dense')
  """
  out: dict = collections.defaultdict(dict)
  unknown = []
  for key, t in tensors.items():
    if not key.startswith(PREFIX):
      unknown.append(key)
      continue
    rest = key[len(PREFIX):]
    for suffix, (role, kind) in SUFFIXES.items():
      if rest.endswith("." + suffix):
        name = rest[:-len(suffix) - 1]
        if role in out[name]:
          raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} has two {role} tensors "
                           f"({out[name][role][0]!r} and {short(key)})")
        out[name][role] = (key, t, kind)
        break
    else:
      unknown.append(key)
  if unknown:
    raise FormatError(f"{WEIGHTS_NAME}: keys jlora does not understand (only LoRA A/B, "
                     f"DoRA magnitudes and embedding base copies are supported): {sorted(unknown)[:8]}"
                     + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
  return dict(out)


def _check_module(name: str, parts: dict, site: _Site, d: Mapping[str, Any]) -> tuple[int, float]:
  """Checks one module's tensors against the model and config; returns (rank, alpha)."""
  if "A" not in parts or "B" not in parts:
    missing = [r for r in ("A", "B") if r not in parts]
    raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} lacks its lora_{'/'.join(missing)} tensor")
  kind = parts["A"][2]
  if (kind == "embed") != (site.info.kind == "embed") or parts["B"][2] != kind:
    raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} has {kind} LoRA keys but the model's "
                     f"{site.path!r} is a {site.info.kind} weight")
  (ka, A, _), (kb, B, _) = parts["A"], parts["B"]
  if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
    raise FormatError(f"{WEIGHTS_NAME}: {short(ka)} is {list(A.shape)} and {short(kb)} is {list(B.shape)}: "
                     "expected [r, in] and [out, r] with the same r")
  if A.shape[1] != site.n_in or B.shape[0] != site.n_out:
    raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} has lora_A {list(A.shape)} and lora_B "
                     f"{list(B.shape)}, but the model's {site.path!r} is {list(site.kernel_shape)} "
                     f"(a [{site.n_in} in, {site.n_out} out] matrix)")
  rank, alpha = pc.rank_alpha(d, name)
  if A.shape[0] != rank:
    raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} has rank {A.shape[0]} (lora_A "
                     f"{list(A.shape)}) but {CONFIG_NAME} gives it r={rank} (r={d.get('r')}, "
                     f"rank_pattern={d.get('rank_pattern') or {}})")
  if bool(d.get("use_dora")) != ("magnitude" in parts):
    what = "lacks" if d.get("use_dora") else "has"
    raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} {what} a lora_magnitude_vector but "
                     f"use_dora={bool(d.get('use_dora'))} in {CONFIG_NAME}")
  if "magnitude" in parts and tuple(parts["magnitude"][1].shape) != (site.n_out,):
    raise FormatError(f"{WEIGHTS_NAME}: {short(parts['magnitude'][0])} is {list(parts['magnitude'][1].shape)}, "
                     f"expected [{site.n_out}] (one per output feature of {site.path!r})")
  return rank, alpha


def _check_base_copy(name: str, parts: dict, site: _Site) -> None:
  """PEFT saves embedding layers' base weights with the adapter; they must equal ours."""
  if "base" not in parts:
    return
  key, t, _ = parts["base"]
  w = site.weight
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise FormatError(f"{WEIGHTS_NAME}: {short(key)} is a copy of the base weight, which jlora can only "
                     f"accept after checking it equals the model's {site.path!r}: pass concrete "
                     "(unquantized) params")
  w = w if site.layer is None else w[site.layer]
  w = w if site.info.kind == "embed" else _torch_layout(w, site)
  if tuple(t.shape) != tuple(w.shape):
    raise FormatError(f"{WEIGHTS_NAME}: {short(key)} is {list(t.shape)} but the model's weight is "
                     f"{list(w.shape)} (resized embeddings are not supported)")
  low = min(jnp.dtype(t.dtype), jnp.dtype(w.dtype), key=lambda x: x.itemsize)
  if not bool(jnp.array_equal(jnp.asarray(t).astype(low), jnp.asarray(w).astype(low))):
    raise FormatError(f"{WEIGHTS_NAME}: {short(key)} (the base weight PEFT saved with the adapter) "
                     f"differs from the model's {site.path!r}: the adapter was trained with "
                     "changed or resized base weights, which jlora does not load")


def _torch_layout(kernel: jax.Array, site: _Site) -> jax.Array:
  """A per-layer kernel as PyTorch's ``[out, in]`` matrix."""
  order = site.info.in_axes + site.info.out_axes
  m = jnp.transpose(kernel, order).reshape(site.n_in, site.n_out)
  return m.T


def params_from_file(directory: str | os.PathLike, dtype=jnp.float32) -> dict:
  """The adapted weights' shapes, read from a PEFT adapter's tensors alone.

  Returns a params tree of ``jax.ShapeDtypeStruct`` (``layers_{i}/...``
  naming, Dense ``kernel: [in, out]``, Embed ``embedding: [vocab, dim]``) that
  :func:`load` accepts in place of the real base when the base is not at
  hand; without the base nothing checks that the adapter fits a model, and
  embedding base copies in the file cannot be verified (``load`` refuses them).

  Example:
    >>> import tempfile
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"layers_1": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> params_from_file(out)["layers_1"]["mlp"]["up_proj"]["kernel"]
    ShapeDtypeStruct(shape=(16, 24), dtype=float32)
  """
  flat = {}
  for name, parts in split_keys(read_tensors(directory)).items():
    if "A" not in parts or "B" not in parts:
      raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} lacks its lora_A or lora_B tensor")
    kind = parts["A"][2]
    path, _ = jlora_param_path(name, "embedding" if kind == "embed" else "kernel")
    shape = (parts["A"][1].shape[-1], parts["B"][1].shape[0])
    flat[path] = jax.ShapeDtypeStruct(shape, dtype)
  return paths.unflatten(flat)


# ---------------------------------------------------------------- load

def load(directory: str | os.PathLike, params: Any, *, model=None, args=(), kwargs=None,
         layers: Mapping[str, L.LayerInfo] | None = None, dtype=jnp.float32):
  """Loads a PEFT LoRA adapter directory as a jlora adapter for ``params``.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base parameter tree (arrays, or ``jax.ShapeDtypeStruct`` when
      the adapter carries no base-weight copies to check) whose paths follow
      :func:`hf_module_name`: ``layers_{i}/...`` or a scanned ``layers/...``
      stack with a leading ``[L]`` axis.
    model, args, kwargs: optionally the Flax model and example inputs, traced
      to learn each weight's layout (needed for kernels of more than 2 axes).
    layers: ``{param_path: LayerInfo}`` given directly instead of a trace.
    dtype: dtype of the returned ``a``, ``b`` and magnitudes.

  Returns:
    ``(adapter, cfg)``: the adapter tree (``a: [*stack, *in_dims, r]``,
    ``b: [*stack, r, *out_dims]`` at each adapted path) and a
    :class:`~jlora.LoraConfig` that adapts exactly those paths with the same
    ranks, alphas, rsLoRA, DoRA and dropout.

  Raises:
    ValueError: unsupported config fields (named), truncated or corrupt
      files, keys or modules the model lacks, shapes or ranks that disagree
      with the model or the config.

  Example:
    >>> import tempfile
    >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.ones((16, 24))}}}}
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> adapter, cfg = load(out, params)
    >>> lo = adapter["layers_0"]["mlp"]["up_proj"]["kernel"]
    >>> lo.a.shape, lo.b.shape, lo.scale, cfg.targets
    ((16, 4), (4, 24), 2.0, ['layers_0/mlp/up_proj'])
  """
  if layers is None and model is not None:
    layers = _trace(model, params, args, kwargs)
  return read(directory, params, layers=layers, dtype=dtype)


def read(directory, params, *, layers=None, dtype=jnp.float32, check_base_copies=True):
  """:func:`load` without tracing; ``check_base_copies=False`` skips comparing
  embedding base copies in the file with ``params`` (for ``jlora inspect``).

  Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"lm_head": {"kernel": L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), rank=4)}})
    >>> adapter, cfg = read(out, params_from_file(out))
    >>> adapter["lm_head"]["kernel"].b.shape
    (4, 24)
  """
  d = pc.read(directory)
  table = sites(params, layers)
  modules = split_keys(read_tensors(directory))
  _check_coverage(d, modules, table)
  per_layer = {}
  for name, parts in modules.items():
    site = table[name]
    rank, alpha = _check_module(name, parts, site, d)
    if check_base_copies:
      _check_base_copy(name, parts, site)
    per_layer[name] = (rank, alpha, parts)
  nodes = _build_nodes(per_layer, table, d, dtype)
  adapter = paths.unflatten(nodes)
  return adapter, _jlora_config(d, nodes, table, dtype)


def _trace(model, params, args, kwargs) -> dict[str, L.LayerInfo]:
  """Each weight's layer kind and axes, learnt by tracing ``model`` (no FLOPs)."""
  from jlora.flax import learn_layers
  found = learn_layers(model, params, args, kwargs)
  return {p: info for p, info in found.items() if isinstance(info, L.LayerInfo)}


def _check_coverage(d, modules: Mapping[str, Any], table: Mapping[str, _Site]) -> None:
  """The file's modules, the config's targets and the model's modules must agree."""
  lacking = sorted(set(modules) - set(table))
  if lacking:
    raise FormatError(f"{WEIGHTS_NAME} has weights for modules the model lacks: {lacking[:6]}"
                     f"{' ...' if len(lacking) > 6 else ''} (the model's modules look like: "
                     f"{sorted(table)[:4]})")
  unused = pc.unused_targets(d, table)
  if unused:
    raise ConfigError(f"{CONFIG_NAME}: target_modules names {unused} but the model has no such "
                     f"module (its modules look like: {sorted(table)[:4]})")
  targeted = {n for n, s in table.items() if pc.is_targeted(d, n, s.info.kind != "embed", s.is_head)}
  untargeted = sorted(set(modules) - targeted)
  if untargeted:
    raise FormatError(f"{WEIGHTS_NAME} has weights for {untargeted[:6]}, which target_modules="
                     f"{d['target_modules']!r} does not select")
  missing = sorted(targeted - set(modules))
  if missing:
    raise ConfigError(f"{CONFIG_NAME}: target_modules={d['target_modules']!r} selects "
                     f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, but {WEIGHTS_NAME} "
                     "has no weights for them")


def _layer_arrays(parts, site: _Site, dtype):
  """One layer's ``a: [*in_dims, r]``, ``b: [r, *out_dims]``, magnitude (NumPy: no
  per-shape compilation)."""
  dtype = np.dtype(jnp.dtype(dtype))
  a = np.asarray(parts["A"][1]).T.astype(dtype).reshape(site.in_dims + (-1,))
  b = np.asarray(parts["B"][1]).T.astype(dtype).reshape((-1,) + site.out_dims)
  m = parts.get("magnitude")
  m = None if m is None else np.asarray(m[1]).astype(dtype).reshape(site.out_dims)
  return a, b, m


def _build_nodes(per_layer, table, d, dtype) -> dict[str, L.LoRA]:
  by_path = collections.defaultdict(dict)
  for name, (rank, alpha, parts) in per_layer.items():
    site = table[name]
    by_path[site.path][site.layer] = (rank, alpha, _layer_arrays(parts, site, dtype), site)
  nodes = {}
  for path, layers_ in by_path.items():
    site = next(iter(layers_.values()))[3]
    settings = {(r, al) for r, al, _, _ in layers_.values()}
    if len(settings) > 1:
      raise FormatError(f"the layers of the stacked weight {short(path)} have different (rank, alpha) "
                       f"in the PEFT adapter: {sorted(settings)}; one stacked LoRA needs one "
                       "rank and alpha (load into unscanned params instead)")
    (rank, alpha), = settings
    meta = dict(alpha=alpha, rank=rank, in_axes=site.info.in_axes, out_axes=site.info.out_axes,
                kind=site.info.kind, rslora=bool(d.get("use_rslora")),
                dropout=float(d.get("lora_dropout") or 0.0))
    if site.layer is None:
      a, b, m = layers_[None][2]
    else:
      a, b, m = _stack_layers(path, layers_, site, rank, meta, dtype)
    nodes[path] = L.LoRA(a=jnp.asarray(a), b=jnp.asarray(b),
                         magnitude=None if m is None else jnp.asarray(m), **meta)
  return nodes


def _stack_layers(path, layers_, site: _Site, rank, meta, dtype):
  """Stacks per-layer arrays along axis 0; layers the adapter leaves out get a
  zero update (and, with DoRA, the magnitude ‖W‖ that leaves W unchanged)."""
  n, dtype = site.stack_shape[0], np.dtype(jnp.dtype(dtype))
  zeros_a = np.zeros(site.in_dims + (rank,), dtype)
  zeros_b = np.zeros((rank,) + site.out_dims, dtype)
  a = np.stack([layers_[i][2][0] if i in layers_ else zeros_a for i in range(n)])
  b = np.stack([layers_[i][2][1] if i in layers_ else zeros_b for i in range(n)])
  if next(iter(layers_.values()))[2][2] is None:
    return a, b, None
  mags = []
  for i in range(n):
    if i in layers_:
      mags.append(layers_[i][2][2])
      continue
    if not isinstance(site.weight, (jax.Array, np.ndarray)):
      raise FormatError(f"DoRA adapter leaves layer {i} of {short(path)} out: its magnitude ‖W‖ needs "
                       "concrete (unquantized) params")
    probe = L.LoRA(a=jnp.asarray(zeros_a), b=jnp.asarray(zeros_b), **meta)
    mags.append(np.asarray(L.dora_norm(jnp.asarray(site.weight[i]), probe)).astype(dtype))
  return a, b, np.stack(mags)


# ---------------------------------------------------------------- config

def _portable(key: str) -> bool:
  """A pattern key that means the same on "." and "/" joined names (no separators)."""
  return re.fullmatch(r"[A-Za-z0-9_|()]+", key) is not None


def _jlora_config(d, nodes: Mapping[str, L.LoRA], table, dtype) -> LoraConfig:
  """A LoraConfig that adapts exactly ``nodes`` with their ranks and alphas.

  PEFT's bare module names ("q_proj") and separator-free pattern keys mean the
  same in jlora and are kept; anything else (regexes over "."-joined names,
  dotted names, exclude_modules) becomes the explicit list of adapted module
  paths and per-module patterns.
  """
  r, alpha = int(d.get("r", 8)), float(d.get("lora_alpha", 8))
  init = d.get("init_lora_weights", True)
  base = dict(rank=r, alpha=alpha, use_rslora=bool(d.get("use_rslora")),
              use_dora=bool(d.get("use_dora")), dropout=float(d.get("lora_dropout") or 0.0),
              init="gaussian" if init == "gaussian" else "default", dtype=dtype)
  tm, rank_pattern = d["target_modules"], dict(d.get("rank_pattern") or {})
  alpha_pattern = dict(d.get("alpha_pattern") or {})
  if (not isinstance(tm, str) and all("." not in t for t in tm) and not d.get("exclude_modules")
      and all(map(_portable, list(rank_pattern) + list(alpha_pattern)))):
    cfg = LoraConfig(targets=list(tm), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     **base)
    if _selects(cfg, nodes, table):
      return cfg
  rp = {re.escape(paths.module_path(p)): lo.rank for p, lo in nodes.items() if lo.rank != r}
  ap = {re.escape(paths.module_path(p)): lo.alpha for p, lo in nodes.items() if lo.alpha != alpha}
  cfg = LoraConfig(targets=sorted(paths.module_path(p) for p in nodes), rank_pattern=rp,
                   alpha_pattern=ap, **base)
  if not _selects(cfg, nodes, table):
    raise FormatError("internal: the translated LoraConfig does not select exactly the PEFT "
                     "adapter's modules; please report this")
  return cfg


def _selects(cfg: LoraConfig, nodes: Mapping[str, L.LoRA], table) -> bool:
  """Whether ``cfg`` adapts exactly the paths of ``nodes``, with their ranks and alphas."""
  by_path = {s.path: s for s in table.values()}
  chosen = {p for p, s in by_path.items()
            if cfg.matches(p, len(s.kernel_shape) + s.info.stack, s.info.kind)}
  return chosen == set(nodes) and all(cfg.resolve(p) == (lo.rank, lo.alpha)
                                      for p, lo in nodes.items())


# ---------------------------------------------------------------- save

def save(directory: str | os.PathLike, adapter: Any, cfg: LoraConfig | None = None, *,
         base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
         overwrite: bool = True) -> None:
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
    base_model_name_or_path, task_type: written to the config for PEFT.

  Example:
    >>> import tempfile
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.zeros((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> save(out, {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}},
    ...      base_model_name_or_path="meta-llama/Llama-3.2-1B")
    >>> sorted(os.listdir(out))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> json.load(open(f"{out}/adapter_config.json"))["target_modules"]
    ['model.layers.0.mlp.up_proj']
  """
  tensors, config = export(adapter, cfg, base_model_name_or_path=base_model_name_or_path,
                           task_type=task_type)
  _write_atomic(directory, tensors, config, overwrite)


def export(adapter: Any, cfg: LoraConfig | None = None, *, base_model_name_or_path=None,
           task_type="CAUSAL_LM") -> tuple[dict[str, np.ndarray], dict]:
  """The ``(tensors, config)`` that :func:`save` writes, as ``{key: array}`` and a dict.

  Example:
    >>> lora = L.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> tensors, config = export({"lm_head": {"kernel": lora}})
    >>> {k: v.shape for k, v in sorted(tensors.items())}
    {'base_model.model.lm_head.lora_A.weight': (4, 16), 'base_model.model.lm_head.lora_B.weight': (24, 4)}
    >>> config["r"], config["lora_alpha"], config["target_modules"]
    (4, 8, ['lm_head'])
  """
  nodes = adapter_lib.loras(adapter)
  if not nodes:
    raise AdapterError("save: the adapter has no LoRA nodes")
  for path, lo in nodes.items():
    _check_exportable(path, lo)
  _check_uniform(nodes, cfg)
  tensors, settings = {}, {}
  for path, lo in nodes.items():
    lo = jax.tree.map(_np, lo)   # to host once; slicing and transposes in NumPy
    for layer in range(lo.stack_dims[0]) if lo.stack else [None]:
      name = hf_module_name(path, layer)
      if name in settings:
        raise AdapterError(f"save: {short(path)} and another path both map to PEFT module {short(name)}")
      settings[name] = (lo.rank, float(lo.alpha), path)
      tensors.update(_module_tensors(name, lo, layer))
  config = _peft_config(nodes, settings, cfg, base_model_name_or_path, task_type)
  return tensors, config


def _check_exportable(path: str, lo: L.LoRA) -> None:
  if lo.kind not in ("dense", "einsum", "embed"):
    raise AdapterError(f"save: {short(path)} is a {lo.kind} LoRA; PEFT export supports Dense/Einsum "
                     "(nn.Linear) and Embed (nn.Embedding) weights")
  if lo.stack > 1:
    raise AdapterError(f"save: {short(path)} has {lo.stack} stacked axes {list(lo.stack_dims)}; "
                     "PEFT export supports at most one (a scanned layer stack)")
  if lo.stack != _is_stack(path):
    raise AdapterError(f"save: {short(path)} has {lo.stack} stacked axes; only a scanned 'layers/...' "
                     "stack (one axis) has per-layer Hugging Face module names")
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


def _np(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _module_tensors(name: str, lo: L.LoRA, layer: int | None) -> dict[str, np.ndarray]:
  """PEFT's tensors of one module (NumPy: no per-shape compilation)."""
  pick = (lambda x: x) if layer is None else (lambda x: x[layer])
  r = lo.a.shape[-1]
  A = pick(lo.a).reshape(-1, r).T        # [r, in]
  B = pick(lo.b).reshape(r, -1).T        # [out, r]
  stem = PREFIX + name
  names = ("lora_embedding_A", "lora_embedding_B") if lo.kind == "embed" else (
      "lora_A.weight", "lora_B.weight")
  out = {f"{stem}.{names[0]}": _np(A), f"{stem}.{names[1]}": _np(B)}
  if lo.magnitude is not None:
    out[f"{stem}.lora_magnitude_vector"] = _np(pick(lo.magnitude).reshape(-1))
  return out


def _num(x: float):
  return int(x) if float(x).is_integer() else float(x)


def _peft_config(nodes, settings, cfg, base_model_name_or_path, task_type) -> dict:
  """PEFT's adapter_config.json for ``settings``: ``{hf_name: (rank, alpha, path)}``."""
  common = collections.Counter((r, a) for r, a, _ in settings.values()).most_common(1)[0][0]
  r, alpha = (cfg.rank, float(cfg.alpha)) if cfg is not None else common
  dropouts = collections.Counter(lo.dropout for lo in nodes.values()).most_common(1)[0][0]
  any_lo = next(iter(nodes.values()))
  d = {
      "peft_type": "LORA", "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "r": int(r), "lora_alpha": _num(alpha),
      "target_modules": _targets(cfg, settings),
      "exclude_modules": None,
      "use_rslora": bool(any_lo.rslora), "use_dora": bool(any_lo.use_dora),
      "lora_dropout": float(cfg.dropout if cfg is not None else dropouts),
      "init_lora_weights": "gaussian" if cfg is not None and cfg.init == "gaussian" else True,
      "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "lora_bias": False,
      "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
  }
  d["rank_pattern"], d["alpha_pattern"] = _patterns(cfg, settings, d)
  return d


def _targets(cfg: LoraConfig | None, settings) -> list[str]:
  """Bare names from ``cfg`` when they name exactly the adapted modules' kinds,
  else the full module names (always exact)."""
  last = {name.rpartition(".")[2] for name in settings}
  if (cfg is not None and not isinstance(cfg.targets, str) and cfg.exclude is None
      and all("/" not in t and "." not in t for t in cfg.targets) and last == set(cfg.targets)):
    return sorted(cfg.targets)
  return sorted(settings)


def _patterns(cfg: LoraConfig | None, settings, d) -> tuple[dict, dict]:
  """rank/alpha patterns under which PEFT gives every module its (rank, alpha)."""
  if cfg is not None:
    rp, ap = dict(cfg.rank_pattern), {k: _num(v) for k, v in cfg.alpha_pattern.items()}
    if all(map(_portable, list(rp) + list(ap))):
      trial = {**d, "rank_pattern": rp, "alpha_pattern": ap}
      if all(pc.rank_alpha(trial, n) == (r, a) for n, (r, a, _) in settings.items()):
        return rp, ap
  rp = {re.escape(n): r for n, (r, a, _) in sorted(settings.items()) if r != d["r"]}
  ap = {re.escape(n): _num(a) for n, (r, a, _) in sorted(settings.items())
        if a != float(d["lora_alpha"])}
  return rp, ap


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
