"""The registry of Hugging Face architecture families the reference models read.

``jlora.interop`` (``from_hf`` / ``to_hf``) asks this module, and nothing
else in ``jlora.models``: which ``model_type`` values exist
(:func:`model_types`), a family's model, parameter shapes and tensor names
(:func:`family`), and ``config.json`` <-> :class:`LlamaConfig`
(:func:`config_from_hf`, :func:`config_to_hf`). Each family's maps live in
its own module under :mod:`jlora.models.families`; :func:`register` adds one.

=============  ==========================================  =================
family         model_type                                  transformers class
=============  ==========================================  =================
llama          llama, mistral, qwen2                       LlamaForCausalLM, ...
gemma          gemma, gemma2, gemma3_text                  GemmaForCausalLM, ...
qwen3          qwen3                                       Qwen3ForCausalLM
phi3           phi3                                        Phi3ForCausalLM
=============  ==========================================  =================
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from jlora.errors import ConfigError
from jlora.models.config import LlamaConfig
from jlora.models.families import gemma, llama, phi3, qwen3
from jlora.models.families.common import Family, HFConfig, NameMap, base_to_hf

__all__ = ["Family", "NameMap", "register", "family", "model_types", "config_from_hf",
           "config_to_hf"]

_BY_TYPE: dict[str, Family] = {}
# fields that describe how a model runs here, not what it computes from a config.json
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")


def register(fam: Family, *, replace: bool = False) -> None:
  """Makes ``from_hf`` / ``to_hf`` read and write ``fam``'s ``model_type`` values.

  Raises a :class:`jlora.ConfigError` when one is taken by another family
  (unless ``replace``).
  """
  taken = [t for t in fam.model_types if t in _BY_TYPE and _BY_TYPE[t] is not fam]
  if taken and not replace:
    raise ConfigError(f"register: model_type(s) {taken} already belong to family "
                      f"{_BY_TYPE[taken[0]].name!r}; pass replace=True to override")
  _BY_TYPE.update({t: fam for t in fam.model_types})


for _fam in (llama.FAMILY, gemma.FAMILY, qwen3.FAMILY, phi3.FAMILY):
  register(_fam)


def model_types() -> tuple[str, ...]:
  """Every registered ``model_type``.

  Example:
    >>> model_types()
    ('llama', 'mistral', 'qwen2', 'gemma', 'gemma2', 'gemma3_text', 'qwen3', 'phi3')
  """
  return tuple(_BY_TYPE)


def family(model_type: str, source: str = "config.json") -> Family:
  """The :class:`Family` that reads ``model_type``.

  Example:
    >>> family("gemma2").name, family("gemma2").architectures["gemma2"]
    ('gemma', 'Gemma2ForCausalLM')
  """
  if model_type not in _BY_TYPE:
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported; jlora reads "
                      f"{', '.join(_BY_TYPE)}")
  return _BY_TYPE[model_type]


def config_from_hf(hf: Mapping[str, Any], *, dtype=jnp.float32, scan_layers: bool = False,
                   source: str = "config.json") -> LlamaConfig:
  """Maps a Hugging Face ``config.json`` of any registered family to :class:`LlamaConfig`.

  Fields the file leaves out take its architecture's defaults (those of
  the transformers config class); a field whose value changes the math in a
  way jlora does not implement raises a :class:`jlora.ConfigError` naming
  it. Reads both the transformers 4 layout (``rope_theta``,
  ``rope_scaling``) and the 5 one (``rope_parameters``). ``dtype`` becomes
  both the parameter and the computation dtype.

  Example:
    >>> cfg = config_from_hf({"model_type": "gemma2", "vocab_size": 256, "hidden_size": 64,
    ...                       "intermediate_size": 96, "num_hidden_layers": 2,
    ...                       "num_attention_heads": 4, "head_dim": 16})
    >>> cfg.sliding_layers, cfg.attn_logit_softcapping, cfg.query_pre_attn_scalar
    ((True, False), 50.0, 256.0)
  """
  mt = hf.get("model_type")
  fam = family(mt, source)
  if hf.get("quantization_config"):
    raise ConfigError(f"{source}: a pre-quantized checkpoint (quantization_config) cannot be "
                      "loaded; load the full-precision weights and use from_hf(quantize=...)")
  try:
    fields = fam.read(HFConfig(hf, source, fam.defaults.get(mt, {})))
    return LlamaConfig(**fields, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
  except ConfigError:
    raise
  except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError, AttributeError) as e:
    from jlora.errors import short
    raise ConfigError(f"{source}: a field has a value jlora cannot use ({type(e).__name__}: "
                      f"{short(str(e), 200)})") from None


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
  """The ``config.json`` dict of ``cfg`` (transformers 4 layout, also read by 5).

  Raises a :class:`jlora.ConfigError` naming the fields ``cfg.model_type``
  cannot express (reading the dict back must give ``cfg``).

  Example:
    >>> config_to_hf(LlamaConfig(num_hidden_layers=2))["architectures"]
    ['LlamaForCausalLM']
  """
  fam = family(cfg.model_type, "config_to_hf")
  out = dict(architectures=[fam.architectures[cfg.model_type]], model_type=cfg.model_type,
             **base_to_hf(cfg), **fam.write(cfg), torch_dtype=dtype)
  mine = cfg.replace(head_dim=cfg.head_size)
  back = config_from_hf(out, source="config_to_hf").replace(
      **{k: getattr(cfg, k) for k in _RUNTIME_FIELDS})
  if back != mine:
    wrong = [f"{f.name}={getattr(mine, f.name)!r}" for f in dataclasses.fields(mine)
             if getattr(mine, f.name) != getattr(back, f.name)]
    raise ConfigError(f"config_to_hf: model_type {cfg.model_type!r} cannot express "
                      f"{', '.join(wrong)}")
  return out
