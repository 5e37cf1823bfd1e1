"""Hugging Face PEFT prompt tuning and prefix tuning adapters in and out.

Both write one tensor, ``prompt_embeddings``, to ``adapter_model.safetensors``:

  PROMPT_TUNING   [n, hidden]                              jlora ``Prompt.embeddings``
  PREFIX_TUNING   [n, layers · 2 · kv_heads · head_size]   jlora ``Prefix.flat()``

(for a prefix trained through PEFT's ``prefix_projection`` MLP, the MLP's
output, which is all PEFT needs to run it). ``adapter_config.json`` carries
``num_virtual_tokens``, ``token_dim`` (hidden size; for a prefix
``kv_heads · head_size``), ``num_attention_heads`` (for a prefix the
key/value heads), ``num_layers`` and ``num_transformer_submodules`` (1 for a
decoder-only model).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import ConfigError, FormatError
from jlora.interop import peft as P
from jlora.interop.peft.save import _write_atomic
from jlora.interop.peft import config as pc
from jlora.interop.safetensors_io import read_json
from jlora.methods.prefix import Prefix
from jlora.methods.prompt import Prompt

KEY = "prompt_embeddings"
KINDS = ("PROMPT_TUNING", "PREFIX_TUNING")
KNOWN = ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
         "num_attention_heads", "num_layers", "base_model_name_or_path", "revision",
         "inference_mode", "auto_mapping", "peft_version", "modules_to_save",
         # prompt tuning's init (no effect on trained values)
         "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
         "tokenizer_kwargs",
         # prefix tuning
         "encoder_hidden_size", "prefix_projection", "init_weights")


def read_config(directory) -> dict:
  """Reads and checks a prompt- or prefix-tuning ``adapter_config.json``.

  Example:
    >>> import tempfile, json
    >>> d = tempfile.mkdtemp()
    >>> json.dump({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
    ...            "num_virtual_tokens": 4, "num_transformer_submodules": 2},
    ...           open(os.path.join(d, "adapter_config.json"), "w"))
    >>> read_config(d)
    Traceback (most recent call last):
    ...
    jlora.errors.ConfigError: ...: num_transformer_submodules=2 (an encoder-decoder model; jlora's are decoder-only)
  """
  path = os.path.join(os.fspath(directory), pc.CONFIG_NAME)
  d = read_json(path)
  bad = []
  if d.get("peft_type") not in KINDS:
    bad.append(f"peft_type={d.get('peft_type')!r} (expected one of {KINDS})")
  if d.get("num_transformer_submodules", 1) not in (1, None):
    bad.append(f"num_transformer_submodules={d['num_transformer_submodules']!r} (an "
               "encoder-decoder model; jlora's are decoder-only)")
  if d.get("task_type") not in (None, "CAUSAL_LM"):
    bad.append(f"task_type={d['task_type']!r} (jlora runs causal language models)")
  if d.get("modules_to_save"):
    bad.append(f"modules_to_save={d['modules_to_save']!r} (fully trained copies of modules)")
  n = d.get("num_virtual_tokens")
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    bad.append(f"num_virtual_tokens={n!r} (must be a positive int)")
  for name in sorted(set(d) - set(KNOWN)):
    if d[name] not in (None, False, [], {}, ""):
      bad.append(f"{name}={d[name]!r} (a field jlora does not know)")
  if bad:
    raise ConfigError(f"{path}: unsupported prompt-learning settings: " + "; ".join(bad))
  return d


def load(directory, config: Any = None, *, dtype=jnp.float32) -> Prompt | Prefix:
  """Reads a PEFT prompt-tuning (-> :class:`Prompt`) or prefix-tuning (-> :class:`Prefix`) adapter.

  Args:
    directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
    config: the model's ``LlamaConfig``, to check the adapter fits it (hidden
      size; layers, key/value heads and head size); None skips the checks
      and takes the sizes from the file.
    dtype: the arrays' dtype.

  Raises:
    ConfigError / FormatError: unsupported settings, a missing or misshapen
      ``prompt_embeddings``, sizes that disagree with ``config``.
  """
  d = read_config(directory)
  tensors = P.read_tensors(directory)
  if set(tensors) != {KEY}:
    raise FormatError(f"{P.WEIGHTS_NAME}: expected the one tensor {KEY!r}, got {sorted(tensors)[:4]}")
  t = np.asarray(tensors[KEY], np.float32).astype(np.dtype(jnp.dtype(dtype)))
  n, token_dim = d["num_virtual_tokens"], d.get("token_dim")
  if d["peft_type"] == "PROMPT_TUNING":
    want = (n, token_dim if token_dim is not None else t.shape[-1])
    if config is not None and want[1] != config.hidden_size:
      raise FormatError(f"{pc.CONFIG_NAME}: token_dim={token_dim} but the model's hidden_size is "
                        f"{config.hidden_size}")
    if tuple(t.shape) != want:
      raise FormatError(f"{P.WEIGHTS_NAME}: {KEY!r} is {list(t.shape)}, expected {list(want)}")
    return Prompt(jnp.asarray(t))
  layers, heads = d.get("num_layers"), d.get("num_attention_heads")
  if None in (layers, heads, token_dim) or token_dim % heads:
    raise FormatError(f"{pc.CONFIG_NAME}: a prefix needs num_layers, num_attention_heads and "
                      f"token_dim (a multiple of the heads); got {layers}, {heads}, {token_dim}")
  meta = dict(num_layers=layers, num_kv_heads=heads, head_size=token_dim // heads)
  if config is not None:
    k_heads = config.num_key_value_heads or config.num_attention_heads
    have = dict(num_layers=config.num_hidden_layers, num_kv_heads=k_heads,
                head_size=config.head_size)
    if have != meta:
      raise FormatError(f"{pc.CONFIG_NAME}: the prefix is for {meta}, the model has {have}")
  want = (n, 2 * layers * token_dim)
  if tuple(t.shape) != want:
    raise FormatError(f"{P.WEIGHTS_NAME}: {KEY!r} is {list(t.shape)}, expected {list(want)} "
                      "(num_virtual_tokens × num_layers · 2 · token_dim)")
  return Prefix(jnp.asarray(t), **meta)


def export(adapter: Prompt | Prefix, config: Any = None, *, base_model_name_or_path=None):
  """``(tensors, config)`` that :func:`save` writes.

  Example:
    >>> tensors, cfg = export(Prompt(jnp.zeros((4, 16))))
    >>> tensors["prompt_embeddings"].shape, cfg["peft_type"], cfg["token_dim"]
    ((4, 16), 'PROMPT_TUNING', 16)
  """
  common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "num_transformer_submodules": 1,
            "modules_to_save": None}
  if config is not None:
    common["num_layers"] = config.num_hidden_layers
  if isinstance(adapter, Prompt):
    e = adapter.embeddings
    cfg = {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(e.shape[0]),
           "token_dim": int(e.shape[1]), "prompt_tuning_init": "RANDOM",
           "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
           "tokenizer_kwargs": None}
    if config is not None:
      cfg["num_attention_heads"] = config.num_attention_heads
    return {KEY: _np(e)}, cfg
  if isinstance(adapter, Prefix):
    token_dim = adapter.num_kv_heads * adapter.head_size
    cfg = {**common, "peft_type": "PREFIX_TUNING",
           "num_virtual_tokens": adapter.num_virtual_tokens, "token_dim": token_dim,
           "num_attention_heads": adapter.num_kv_heads, "num_layers": adapter.num_layers,
           "prefix_projection": adapter.projection, "init_weights": None,
           "encoder_hidden_size": int(adapter.w1.shape[1]) if adapter.projection else token_dim}
    return {KEY: _np(adapter.flat())}, cfg
  raise ConfigError(f"peft_prompt.export: expected a Prompt or a Prefix, got {type(adapter).__name__}")


def _np(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32))


def save(directory, adapter: Prompt | Prefix, config: Any = None, *,
         base_model_name_or_path: str | None = None, overwrite: bool = True) -> None:
  """Writes a :class:`Prompt` or :class:`Prefix` as a PEFT adapter directory (atomically).

  Args:
    directory: output directory.
    adapter: the prompt or prefix (a prefix with a projection is saved as
      its MLP's output, as PEFT does).
    config: the model's ``LlamaConfig`` (fills ``num_layers`` and, for a
      prompt, ``num_attention_heads`` in the config, as PEFT writes them).
    base_model_name_or_path: written to the config.
    overwrite: replace an adapter already in ``directory`` (else refuse, as
      ``jlora.peft.save``).

  Example:
    >>> import tempfile
    >>> out = tempfile.mkdtemp() + "/prompt"
    >>> save(out, Prompt(jnp.ones((4, 16))))
    >>> load(out).embeddings.shape
    (4, 16)
  """
  tensors, cfg = export(adapter, config, base_model_name_or_path=base_model_name_or_path)
  _write_atomic(os.fspath(directory), tensors, cfg, overwrite)
