"""Hugging Face PEFT IA³ adapters in and out.

PEFT's IA³ files (``peft_type: "IA3"``) hold one vector per adapted module::

  base_model.model.<module>.ia3_l    [out, 1]   outputs scaled (k_proj, v_proj)
                                     [1, in]    inputs scaled (feedforward_modules: down_proj)

and ``adapter_config.json`` names ``target_modules`` and
``feedforward_modules`` (PEFT's matching rules, :mod:`jlora.interop.peft.config`).
jlora's :class:`~jlora.methods.ia3.IA3` holds ``out = ia3_l[:, 0]`` or
``inp = ia3_l[0]``; a scanned layer stack maps PEFT's layer ``i`` to index ``i``.

A layer with a bias whose outputs are scaled is refused: PEFT's forward
scales the bias too, jlora's IA³ scales ``x·W`` only.
"""
from __future__ import annotations

import collections
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora import paths
from jlora.errors import AdapterError, ConfigError, FormatError
from jlora.interop import peft as P
from jlora.interop.peft.load import _trace
from jlora.interop.peft.save import _write_atomic
from jlora.interop.peft import config as pc
from jlora.interop.hf_names import scanned
from jlora.interop.safetensors_io import read_json
from jlora.methods.ia3 import IA3

SUFFIX = ".ia3_l"
SUPPORTED = ("peft_type", "task_type", "target_modules", "feedforward_modules",
             "exclude_modules", "init_ia3_weights", "fan_in_fan_out", "modules_to_save",
             "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
             "peft_version")


def read_config(directory) -> dict:
  """Reads and checks an IA³ ``adapter_config.json``; unsupported settings raise, named.

  Example:
    >>> import tempfile, json
    >>> d = tempfile.mkdtemp()
    >>> json.dump({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": [],
    ...            "fan_in_fan_out": True}, open(os.path.join(d, "adapter_config.json"), "w"))
    >>> read_config(d)
    Traceback (most recent call last):
    ...
    jlora.errors.ConfigError: ...adapter_config.json: unsupported IA³ settings: fan_in_fan_out=True (transposed (GPT-2 Conv1D) base weights)
  """
  path = os.path.join(os.fspath(directory), pc.CONFIG_NAME)
  d = read_json(path)
  bad = []
  if d.get("peft_type") != "IA3":
    bad.append(f"peft_type={d.get('peft_type')!r} (expected 'IA3')")
  if d.get("fan_in_fan_out"):
    bad.append("fan_in_fan_out=True (transposed (GPT-2 Conv1D) base weights)")
  if d.get("modules_to_save"):
    bad.append(f"modules_to_save={d['modules_to_save']!r} (fully trained copies of modules)")
  for name in sorted(set(d) - set(SUPPORTED)):
    if d[name] not in (None, False, [], {}, ""):
      bad.append(f"{name}={d[name]!r} (a field jlora does not know)")
  for field in ("target_modules", "feedforward_modules"):
    v = d.get(field)
    if field == "target_modules" and v is None:
      bad.append("target_modules=None (PEFT fills it in when it saves)")
    elif v is not None and not isinstance(v, str) and not (
        isinstance(v, list) and all(isinstance(s, str) for s in v)):
      bad.append(f"{field}={v!r} (must be a list of module names or a regex string)")
  if bad:
    raise ConfigError(f"{path}: unsupported IA³ settings: " + "; ".join(bad))
  return d


def _matches(spec, name: str) -> bool:
  if spec is None:
    return False
  return pc._name_matches(spec, name)


def load(directory, params: Any, *, model=None, args=(), kwargs=None, dtype=jnp.float32) -> dict:
  """Loads a PEFT IA³ adapter directory as a jlora adapter tree of :class:`IA3` nodes.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``),
      ``layers_{i}/...`` or a scanned ``layers/...`` stack.
    model, args, kwargs: optionally the model and example inputs, traced to
      learn each weight's axes.
    dtype: dtype of the vectors.

  Returns:
    The adapter tree, for ``jlora.apply``/``jlora.merge``.

  Raises:
    ConfigError / FormatError / AdapterError: unsupported settings, keys
      that are not IA³ vectors or name modules the model lacks, shapes that
      disagree with the model or with ``feedforward_modules``, an
      output-scaled layer with a bias. A targeted module without a vector is
      left unscaled (PEFT's initial ones).
  """
  d = read_config(directory)
  layers = _trace(model, params, args, kwargs) if model is not None else None
  table = P.sites(params, layers)
  tensors = P.read_tensors(directory)
  flat = paths.flatten(params)
  by_path: dict = collections.defaultdict(dict)
  for key, t in tensors.items():
    if not (key.startswith(P.PREFIX) and key.endswith(SUFFIX)):
      raise FormatError(f"{P.WEIGHTS_NAME}: {key!r} is not an IA³ vector "
                        f"(expected {P.PREFIX}<module>{SUFFIX})")
    name = key[len(P.PREFIX):-len(SUFFIX)]
    site = table.get(name)
    if site is None:
      raise AdapterError(f"{P.WEIGHTS_NAME}: {key!r} names module {name!r}, which the model lacks "
                         f"(its modules look like {sorted(table)[:4]})")
    if not pc.is_targeted(d, name, True, site.is_head):
      raise FormatError(f"{P.WEIGHTS_NAME} has {key!r}, which target_modules="
                        f"{d['target_modules']!r} does not select")
    ff = _matches(d.get("feedforward_modules"), name)
    want = (1, site.n_in) if ff else (site.n_out, 1)
    if tuple(t.shape) != want:
      raise FormatError(f"{P.WEIGHTS_NAME}: {key!r} is {list(t.shape)}, expected {list(want)} "
                        f"({'input' if ff else 'output'} scales of {site.path!r}, "
                        f"{'a feedforward module' if ff else 'not a feedforward module'})")
    if not ff:
      _refuse_bias(flat, site.path)
    v = np.asarray(t, np.float64).reshape(-1).astype(np.dtype(jnp.dtype(dtype)))
    by_path[site.path][site.layer] = (ff, v.reshape(site.in_dims if ff else site.out_dims), site)
  # a targeted module without a vector keeps PEFT's initial ones: it is left unscaled
  nodes = {}
  for path, per_layer in by_path.items():
    ff, _, site = next(iter(per_layer.values()))
    if site.layer is None:
      v = per_layer[None][1]
    else:
      ones = np.ones(site.in_dims if ff else site.out_dims, per_layer[site.layer][1].dtype)
      v = np.stack([per_layer[i][1] if i in per_layer else ones
                    for i in range(site.stack_shape[0])])
    meta = dict(in_axes=site.info.in_axes, out_axes=site.info.out_axes)
    nodes[path] = IA3(inp=jnp.asarray(v), **meta) if ff else IA3(out=jnp.asarray(v), **meta)
  return paths.unflatten(nodes)


def _refuse_bias(flat, path: str) -> None:
  bias = paths.module_path(path) + paths.SEP + "bias"
  if bias in flat:
    raise AdapterError(f"IA³ on {paths.module_path(path)!r}: the layer has a bias, which PEFT's "
                       "IA³ scales with the outputs and jlora's does not; this adapter would not "
                       "load exactly")


def export(adapter: Any, *, base_model_name_or_path=None, task_type="CAUSAL_LM"):
  """``(tensors, config)`` of :func:`save` as ``{key: array}`` and a dict.

  Example:
    >>> ad = {"layers_0": {"self_attn": {"k_proj": {"kernel": IA3(out=jnp.ones(4))}}}}
    >>> tensors, config = export(ad)
    >>> {k: v.shape for k, v in tensors.items()}, config["target_modules"]
    ({'base_model.model.model.layers.0.self_attn.k_proj.ia3_l': (4, 1)}, ['k_proj'])
  """
  from jlora.adapter import loras
  nodes = loras(adapter)
  if not nodes or not all(isinstance(n, IA3) for n in nodes.values()):
    raise AdapterError("IA³ export: the adapter must hold IA3 nodes only")
  tensors, ff_names, names = {}, set(), set()
  for path, node in nodes.items():
    if node.stack > 1 or node.stack != scanned(path):
      raise AdapterError(f"IA³ export: {path!r} has {node.stack} stacked axes; only a scanned "
                         "'layers/...' stack (one axis) has per-layer Hugging Face names")
    v = np.asarray(jax.device_get(node.vector))
    for layer in range(v.shape[0]) if node.stack else [None]:
      name = P.hf_module_name(path, layer)
      x = (v if layer is None else v[layer]).reshape(-1)
      tensors[P.PREFIX + name + SUFFIX] = np.ascontiguousarray(
          x[None, :] if node.feedforward else x[:, None])
      (ff_names if node.feedforward else names).add(name)
  def short(ns):
    return sorted({n.rpartition(".")[2] for n in ns})
  all_names = names | ff_names
  bare_t, bare_f = short(all_names), short(ff_names)
  # bare names only when they select exactly these modules (and the ff split) under PEFT's rule
  exact = ({n.rpartition(".")[2] for n in names}.isdisjoint(bare_f))
  config = {
      "peft_type": "IA3", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "revision": None, "inference_mode": True, "init_ia3_weights": True, "fan_in_fan_out": False,
      "modules_to_save": None, "exclude_modules": None,
      "target_modules": bare_t if exact else sorted(all_names),
      "feedforward_modules": bare_f if exact else sorted(ff_names),
  }
  return tensors, config


def save(directory, adapter: Any, *, base_model_name_or_path=None, task_type="CAUSAL_LM",
         overwrite: bool = True) -> None:
  """Writes an IA³ adapter tree as a PEFT IA³ adapter directory (atomically).

  Bare module names (``["k_proj", "v_proj", "down_proj"]``) are written when
  they mean the same modules; PEFT then adapts exactly those in the base model,
  so every layer of those kinds must be in the adapter. ``overwrite=False``
  refuses an existing directory (as ``jlora.peft.save``).

  Example:
    >>> import tempfile
    >>> ad = {"layers_0": {"mlp": {"down_proj": {"kernel": IA3(inp=jnp.full(6, 2.0))}}}}
    >>> out = tempfile.mkdtemp() + "/ia3"
    >>> save(out, ad)
    >>> load(out, {"layers_0": {"mlp": {"down_proj": {"kernel": jnp.ones((6, 4))}}}}
    ...      )["layers_0"]["mlp"]["down_proj"]["kernel"].inp
    Array([2., 2., 2., 2., 2., 2.], dtype=float32)
  """
  tensors, config = export(adapter, base_model_name_or_path=base_model_name_or_path,
                           task_type=task_type)
  _write_atomic(os.fspath(directory), tensors, config, overwrite)
