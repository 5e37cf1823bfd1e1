"""Loading a PEFT LoRA adapter directory as a jlora adapter: ``load``, ``read``, ``params_from_file``.

Every tensor of the file and every field of the config is accounted for;
what jlora cannot honour is refused with a message that names it. A scanned
layer stack (``a``/``b`` with a leading ``[L]`` axis) takes PEFT's layer
``i`` at index ``i``.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora import lora as L
from jlora import paths
from jlora.errors import ConfigError, FormatError, short
from jlora.interop import hub
from jlora.interop.peft import config as pc
from jlora.interop.peft import names as N
from jlora.interop.peft.tensors import WEIGHTS_NAME, read_tensors, split_keys

CONFIG_NAME = pc.CONFIG_NAME


def load(directory: str | os.PathLike, params: Any, *, model=None, args=(), kwargs=None,
         layers: Mapping[str, L.LayerInfo] | None = None, names: Any = None, dtype=jnp.float32,
         revision: str | None = None, download: bool = False):
  """Loads a PEFT LoRA adapter directory as a jlora adapter for ``params``.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``;
      or a Hugging Face Hub name (``"org/name"``) found in the local Hugging
      Face cache (:mod:`jlora.interop.hub`).
    params: the base parameter tree (arrays, or ``jax.ShapeDtypeStruct`` when
      the adapter carries no base-weight copies to check).
    model, args, kwargs: optionally the model (Linen, NNX, or a function
      ``fn(params, *args)``) and example inputs, traced abstractly (no FLOPs)
      to learn each weight's layout (needed for kernels of more than 2 axes
      and for stacked layers). A model with an ``example_args()`` method (the
      reference :class:`jlora.models.Llama`) needs no ``args``; for another
      model without ``args`` an :class:`jlora.AdapterError` says to pass them.
    layers: ``{param_path: LayerInfo}`` given directly instead of a trace.
    names: the name map between PEFT's module names and the paths of
      ``params`` (:mod:`jlora.interop.peft.names`): a table ``{param path:
      module name}``, a function ``(path, layer) -> module name``, or None:
      the model's own map (``model.name_map()``), else Hugging Face's
      ``*ForCausalLM`` layout (``layers_{i}/...`` <-> ``model.layers.{i}...``).
    dtype: dtype of the returned ``a``, ``b`` and magnitudes.
    revision, download: for a Hub name: the branch, tag or commit, and
      whether to download it when it is not cached (by default never).

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
    >>> import tempfile, jlora
    >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.ones((16, 24))}}}}
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> jlora.peft.save(out, {"layers_0": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> adapter, cfg = load(out, params)
    >>> lo = adapter["layers_0"]["mlp"]["up_proj"]["kernel"]
    >>> lo.a.shape, lo.b.shape, lo.scale, cfg.targets
    ((16, 4), (4, 24), 2.0, ['layers_0/mlp/up_proj'])

    Your own model's paths, through a name map:

    >>> mine = {"block": {"fc": {"kernel": jnp.ones((16, 24))}}}
    >>> adapter, _ = load(out, mine, names={"block/fc": "model.layers.0.mlp.up_proj"})
    >>> adapter["block"]["fc"]["kernel"].b.shape
    (4, 24)
  """
  directory = hub.resolve(directory, CONFIG_NAME, revision=revision, download=download,
                          what="PEFT adapter")
  if layers is None and model is not None:
    layers = _trace(model, params, args, kwargs)
  return read(directory, params, layers=layers, names=N.resolve(names, model), dtype=dtype)


def read(directory, params, *, layers=None, names: Any = None, dtype=jnp.float32,
         check_base_copies=True):
  """:func:`load` without tracing or Hub names; ``check_base_copies=False`` skips comparing
  embedding base copies in the file with ``params`` (for ``jlora inspect``).

  Example:
    >>> import tempfile, jlora
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), rank=4)
    >>> jlora.peft.save(out, {"lm_head": {"kernel": lora}})
    >>> adapter, cfg = read(out, params_from_file(out))
    >>> adapter["lm_head"]["kernel"].b.shape
    (4, 24)
  """
  d = pc.read(directory)
  table = N.sites(params, layers, names)
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
  return adapter, pc.to_lora_config(d, nodes, table, dtype)


def params_from_file(directory: str | os.PathLike, dtype=jnp.float32, *, names: Any = None) -> dict:
  """The adapted weights' shapes, read from a PEFT adapter's tensors alone.

  Returns a params tree of ``jax.ShapeDtypeStruct`` (Dense ``kernel: [in,
  out]``, Embed ``embedding: [vocab, dim]``, at the paths ``names`` gives
  the modules; by default ``layers_{i}/...``) that :func:`load` accepts in
  place of the real base when the base is not at hand; without the base
  nothing checks that the adapter fits a model, and embedding base copies in
  the file cannot be verified (``load`` refuses them).

  Example:
    >>> import tempfile, jlora
    >>> lora = jlora.LoRA(a=jnp.ones((16, 4)), b=jnp.ones((4, 24)), alpha=8.0, rank=4)
    >>> out = tempfile.mkdtemp() + "/peft"
    >>> jlora.peft.save(out, {"layers_1": {"mlp": {"up_proj": {"kernel": lora}}}})
    >>> params_from_file(out)["layers_1"]["mlp"]["up_proj"]["kernel"]
    ShapeDtypeStruct(shape=(16, 24), dtype=float32)
  """
  names = N.resolve(names)
  flat = {}
  for name, parts in split_keys(read_tensors(directory)).items():
    if "A" not in parts or "B" not in parts:
      raise FormatError(f"{WEIGHTS_NAME}: module {short(name)} lacks its lora_A or lora_B tensor")
    kind = parts["A"][2]
    path, layer = N.param_path(names, name, "embedding" if kind == "embed" else "kernel")
    if layer is not None:
      raise ConfigError(f"params_from_file: the name map puts PEFT module {short(name)} in a "
                        f"stacked weight ({short(path)}); pass the model's params instead")
    shape = (parts["A"][1].shape[-1], parts["B"][1].shape[0])
    flat[path] = jax.ShapeDtypeStruct(shape, dtype)
  return paths.unflatten(flat)


def _trace(model, params, args, kwargs) -> dict[str, L.LayerInfo]:
  """Each weight's layer kind and axes, learnt by tracing ``model`` (no FLOPs)."""
  from jlora.flax import learn_layers
  found = learn_layers(model, params, args, kwargs)
  return {p: info for p, info in found.items() if isinstance(info, L.LayerInfo)}


def _check_coverage(d, modules: Mapping[str, Any], table: Mapping[str, N.Site]) -> None:
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


def _layer_arrays(parts, site: N.Site, dtype):
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


def _stack_layers(path, layers_, site: N.Site, rank, meta, dtype):
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


def _check_module(name: str, parts: dict, site: N.Site, d: Mapping[str, Any]) -> tuple[int, float]:
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


def _check_base_copy(name: str, parts: dict, site: N.Site) -> None:
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


def _torch_layout(kernel: jax.Array, site: N.Site) -> jax.Array:
  """A per-layer kernel as PyTorch's ``[out, in]`` matrix."""
  order = site.info.in_axes + site.info.out_axes
  m = jnp.transpose(kernel, order).reshape(site.n_in, site.n_out)
  return m.T
