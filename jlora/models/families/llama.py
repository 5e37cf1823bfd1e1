"""Llama, Mistral and Qwen2 ``config.json`` <-> :class:`LlamaConfig`.

  attention_bias (llama)         -> qkv_bias and o_bias
  mlp_bias (llama)               -> mlp_bias
  (qwen2)                        -> qkv_bias (always)
  sliding_window (mistral)       -> sliding_window, every layer
  use_sliding_window, sliding_window, max_window_layers / layer_types (qwen2)
                                 -> sliding_window, layer_types

Refused by name: ``partial_rotary_factor`` != 1 (Llama's RoPE rotates the
whole head), rope types other than default / linear / llama3.
"""
from __future__ import annotations

from jlora.models.config import LlamaConfig
from jlora.models.families.common import (Family, HFConfig, activation, base_fields,
                                          partial_rotary_factor, sliding_layer_types)

_COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
DEFAULTS = {
    "llama": dict(_COMMON, max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    "mistral": dict(_COMMON, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(_COMMON, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28),
}


def read(cfg: HFConfig) -> dict:
  """The :class:`LlamaConfig` fields of a Llama, Mistral or Qwen2 ``config.json``.

  Example:
    >>> f = read(HFConfig({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 64,
    ...                    "intermediate_size": 96, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "use_sliding_window": True,
    ...                    "sliding_window": 16, "max_window_layers": 1},
    ...                   "config.json", DEFAULTS["qwen2"]))
    >>> f["qkv_bias"], f["sliding_window"], f["layer_types"]
    (True, 16, ('full_attention', 'sliding_attention'))
  """
  mt = cfg.model_type
  if partial_rotary_factor(cfg) != 1.0:
    raise cfg.error(f"partial_rotary_factor={partial_rotary_factor(cfg)} is not supported for "
                    f"model_type {mt!r} (its RoPE rotates the whole head)")
  out = dict(base_fields(cfg), hidden_act=activation(cfg, "hidden_act"))
  if mt == "llama":
    bias = bool(cfg.get("attention_bias"))
    out.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias")))
  elif mt == "mistral":
    out.update(sliding_window=cfg.get("sliding_window"))
  else:
    out.update(qkv_bias=True, **qwen_sliding(cfg, out["num_hidden_layers"]))
  return out


def qwen_sliding(cfg: HFConfig, n_layers: int) -> dict:
  """``sliding_window`` and ``layer_types`` from Qwen2/3's ``use_sliding_window``,
  ``sliding_window`` and ``layer_types`` (by default layers from ``max_window_layers`` on)."""
  window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
  first = cfg.get("max_window_layers")
  default = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
  window, kinds = sliding_layer_types(cfg, window, default)
  return dict(sliding_window=window, layer_types=kinds)


def qwen_sliding_to_hf(cfg: LlamaConfig) -> dict:
  """Inverse of :func:`qwen_sliding`."""
  kinds = cfg.sliding_layers
  return dict(use_sliding_window=any(kinds), sliding_window=cfg.sliding_window,
              max_window_layers=kinds.index(True) if any(kinds) else len(kinds),
              layer_types=["sliding_attention" if k else "full_attention" for k in kinds])


def write(cfg: LlamaConfig) -> dict:
  """The family's ``config.json`` fields of ``cfg`` beyond the common ones.

  Example:
    >>> write(LlamaConfig(num_hidden_layers=2, model_type="mistral", sliding_window=8))
    {'hidden_act': 'silu', 'sliding_window': 8}
  """
  out = dict(hidden_act=cfg.hidden_act)
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  else:
    out.update(qwen_sliding_to_hf(cfg))
  return out


FAMILY = Family(
    name="llama",
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM"},
    defaults=DEFAULTS, read=read, write=write)
