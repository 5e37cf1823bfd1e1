"""Gemma 1, 2 and 3 (text) ``config.json`` <-> :class:`LlamaConfig`.

Every Gemma: ``norm_plus_one`` ((1 + w) RMSNorm), ``scale_embeddings``
(√hidden), GeGLU through ``hidden_act`` (Gemma 1) / ``hidden_activation``
(2, 3; "gelu" means the tanh approximation in Gemma 1, as in transformers),
``attention_bias`` -> q/k/v/o biases. Gemma 2 adds ``sandwich_norms``,
``query_pre_attn_scalar``, ``attn_logit_softcapping``,
``final_logit_softcapping`` and sliding-window layers (``sliding_window``,
``layer_types``; by default every other layer from the first). Gemma 3 adds
``qk_norm`` and a RoPE per layer type: ``rope_parameters.full_attention``
(or the top-level ``rope_theta`` / ``rope_scaling``) for the global layers,
``rope_parameters.sliding_attention.rope_theta`` (or
``rope_local_base_freq``) for the sliding ones; its default layer pattern is
``sliding_window_pattern`` (6: five sliding layers, then a global one).

Refused by name: ``use_bidirectional_attention`` (EmbeddingGemma's encoder
mode), scaled RoPE on the sliding layers, ``partial_rotary_factor`` != 1,
rope types other than default / linear / llama3. Gemma 3's multimodal
``model_type`` "gemma3" is not registered (only "gemma3_text").
"""
from __future__ import annotations

from typing import Any, Mapping

from jlora.models.config import LlamaConfig
from jlora.models.families.common import (Family, HFConfig, activation, base_fields,
                                          partial_rotary_factor, rope, sliding_layer_types)

_COMMON = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=256, attention_bias=False,
               use_bidirectional_attention=None, hidden_activation="gelu_pytorch_tanh")
DEFAULTS = {
    "gemma": dict(_COMMON, max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(_COMMON, max_position_embeddings=8192, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(_COMMON, max_position_embeddings=131072, query_pre_attn_scalar=256,
                        sliding_window=4096, attn_logit_softcapping=None,
                        final_logit_softcapping=None, use_bidirectional_attention=False,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
}


def read(cfg: HFConfig) -> dict:
  """The :class:`LlamaConfig` fields of a Gemma, Gemma 2 or Gemma 3 text ``config.json``.

  Example:
    >>> f = read(HFConfig({"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 64,
    ...                    "intermediate_size": 96, "num_hidden_layers": 2,
    ...                    "num_attention_heads": 4, "head_dim": 16, "sliding_window": 4,
    ...                    "sliding_window_pattern": 2},
    ...                   "config.json", DEFAULTS["gemma3_text"]))
    >>> f["layer_types"], f["rope_theta"], f["rope_local_base_freq"], f["qk_norm"]
    (('sliding_attention', 'full_attention'), 1000000.0, 10000.0, True)
  """
  mt = cfg.model_type
  cfg.refuse("use_bidirectional_attention", None, False,
             why="; only causal language models are supported")
  if partial_rotary_factor(cfg) != 1.0:
    raise cfg.error(f"partial_rotary_factor={partial_rotary_factor(cfg)} is not supported for "
                    f"model_type {mt!r}")
  full, local_theta = _gemma3_rope(cfg) if mt == "gemma3_text" else (None, None)
  out = base_fields(cfg, full)
  bias = bool(cfg.get("attention_bias"))
  out.update(norm_plus_one=True, scale_embeddings=True, qkv_bias=bias, o_bias=bias)
  if mt == "gemma":
    act = cfg.get("hidden_act")
    out["hidden_act"] = "gelu_pytorch_tanh" if act == "gelu" else activation(cfg, "hidden_act")
    return out
  n = out["num_hidden_layers"]
  every = 2 if mt == "gemma2" else cfg.hf.get(   # transformers 5 writes the underscored name
      "sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
  default = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
  window, kinds = sliding_layer_types(cfg, cfg.get("sliding_window"), default)
  out.update(hidden_act=activation(cfg, "hidden_activation"), sandwich_norms=True,
             query_pre_attn_scalar=_number(cfg, "query_pre_attn_scalar"),
             attn_logit_softcapping=_number(cfg, "attn_logit_softcapping"),
             final_logit_softcapping=_number(cfg, "final_logit_softcapping"),
             sliding_window=window, layer_types=kinds)
  if mt == "gemma3_text":
    out.update(qk_norm=True, rope_local_base_freq=local_theta)
  return out


def _number(cfg: HFConfig, name: str) -> float | None:
  v = cfg.get(name)
  return None if v is None else float(v)


def _gemma3_rope(cfg: HFConfig) -> tuple[dict, float]:
  """``(RoPE object of the global layers, rope_theta of the sliding layers)``."""
  params = cfg.hf.get("rope_parameters")
  if params is None:   # transformers 4: rope_theta / rope_scaling global, rope_local_base_freq
    full = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta"))
    local: Mapping[str, Any] = {"rope_theta": cfg.get("rope_local_base_freq")}
  else:
    if not isinstance(params, Mapping) or not set(params) <= {"full_attention",
                                                              "sliding_attention"}:
      raise cfg.error(f"rope_parameters must be keyed by layer type (full_attention, "
                      f"sliding_attention) for model_type 'gemma3_text', got {params!r}")
    full = dict(params.get("full_attention") or {})
    full.setdefault("rope_theta", cfg.get("rope_theta"))
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq"))
  local_theta, local_scaling = rope(cfg, local, what="rope_parameters.sliding_attention")
  if local_scaling is not None:
    raise cfg.error(f"rope_parameters.sliding_attention: rope type {local_scaling.kind!r} is "
                    "not supported on the sliding-window layers (default only)")
  return full, local_theta


def write(cfg: LlamaConfig) -> dict:
  """The family's ``config.json`` fields of ``cfg`` beyond the common ones.

  Example:
    >>> write(LlamaConfig(num_hidden_layers=1, model_type="gemma", hidden_act="gelu_pytorch_tanh"))
    {'attention_bias': False, 'hidden_act': 'gelu_pytorch_tanh'}
  """
  out = dict(attention_bias=cfg.qkv_bias)
  if cfg.model_type == "gemma":
    return dict(out, hidden_act=cfg.hidden_act)
  scalar = cfg.query_pre_attn_scalar   # transformers types it int
  out.update(hidden_activation=cfg.hidden_act,
             query_pre_attn_scalar=(int(scalar) if scalar is not None and float(scalar).is_integer()
                                    else scalar),
             attn_logit_softcapping=cfg.attn_logit_softcapping,
             final_logit_softcapping=cfg.final_logit_softcapping,
             sliding_window=cfg.sliding_window,
             layer_types=["sliding_attention" if s else "full_attention"
                          for s in cfg.sliding_layers])
  if cfg.model_type == "gemma3_text":
    local = cfg.rope_local_base_freq
    out.update(rope_local_base_freq=cfg.rope_theta if local is None else local)
  return out


FAMILY = Family(
    name="gemma",
    architectures={"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                   "gemma3_text": "Gemma3ForCausalLM"},
    defaults=DEFAULTS, read=read, write=write)
