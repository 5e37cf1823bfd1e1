"""Hugging Face ``config.json`` (Llama, Mistral, Qwen2) <-> :class:`LlamaConfig`."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from jlora.errors import ConfigError, short
from jlora.models.config import ACTIVATIONS, LlamaConfig, RopeScaling

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def config_from_hf(hf: Mapping[str, Any], *, dtype=jnp.float32, scan_layers: bool = False,
                   source: str = "config.json") -> LlamaConfig:
  """Maps a Hugging Face ``config.json`` (Llama, Mistral, Qwen2) to :class:`LlamaConfig`.

  Reads both the transformers 4 layout (``rope_theta``, ``rope_scaling``) and
  the transformers 5 one (``rope_parameters``). ``dtype`` becomes both the
  parameter and the computation dtype. Any missing or malformed value is a
  ConfigError naming ``source``.

  Example:
    >>> cfg = config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    ...                       "intermediate_size": 96, "num_hidden_layers": 2,
    ...                       "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> cfg.head_size, cfg.rope_theta
    (16, 10000.0)
  """
  try:
    return _config_from_hf(hf, dtype=dtype, scan_layers=scan_layers, source=source)
  except ConfigError:
    raise
  except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError, AttributeError) as e:
    raise ConfigError(f"{source}: a field has a value jlora cannot use ({type(e).__name__}: "
                      f"{short(str(e), 200)})") from None


def _config_from_hf(hf: Mapping[str, Any], *, dtype=jnp.float32, scan_layers: bool = False,
                    source: str = "config.json") -> LlamaConfig:
  mt = hf.get("model_type")
  if mt not in MODEL_TYPES:
    raise ConfigError(f"{source}: model_type {mt!r} is not supported; jlora reads "
                     f"{', '.join(MODEL_TYPES)}")
  if hf.get("quantization_config"):
    raise ConfigError(f"{source}: a pre-quantized checkpoint (quantization_config) cannot be "
                     "loaded; load the full-precision weights and use from_hf(quantize=...)")
  need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
  missing = [k for k in need if hf.get(k) is None]
  if missing:
    raise ConfigError(f"{source}: missing required field(s) {missing}")
  act = hf.get("hidden_act", "silu")
  if act not in ACTIVATIONS:
    raise ConfigError(f"{source}: hidden_act {act!r} is not supported ({sorted(ACTIVATIONS)})")
  theta, scaling = _rope(hf, source)
  bias = bool(hf.get("attention_bias", False)) if mt == "llama" else False
  try:
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else bias, o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
        sliding_window=_sliding_window(hf, mt, source), hidden_act=act,
        initializer_range=float(hf.get("initializer_range", 0.02)), model_type=mt,
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{source}: {e}") from None


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if not isinstance(params, Mapping):
    raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object, got {params!r}")
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
    raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        kind="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))))
  raise ConfigError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")


def _sliding_window(hf: Mapping[str, Any], mt: str, source: str) -> int | None:
  if mt == "mistral":
    return hf.get("sliding_window")
  if mt != "qwen2":
    return None
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  n = hf["num_hidden_layers"]
  kinds = hf.get("layer_types") or [
      "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
      else "full_attention" for i in range(n)]
  if all(k == "full_attention" for k in kinds):
    return None
  if all(k == "sliding_attention" for k in kinds) and window is not None:
    return window
  raise ConfigError(f"{source}: layers mixing sliding-window and full attention "
                   f"(layer_types={kinds}) are not supported")


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
  """The ``config.json`` dict of ``cfg`` (transformers 4 layout, also read by 5).

  Example:
    >>> config_to_hf(LlamaConfig(num_hidden_layers=2))["architectures"]
    ['LlamaForCausalLM']
  """
  mt = cfg.model_type
  if mt not in MODEL_TYPES:
    raise ConfigError(f"config_to_hf: model_type {mt!r} is not one of {MODEL_TYPES}")
  out = dict(
      architectures=[ARCHITECTURES[mt]], model_type=mt, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_size,
      rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, hidden_act=cfg.hidden_act,
      initializer_range=cfg.initializer_range, torch_dtype=dtype)
  sc = cfg.rope_scaling
  if sc is not None:
    out["rope_scaling"] = (dict(rope_type="linear", factor=sc.factor) if sc.kind == "linear" else
                           dict(rope_type="llama3", factor=sc.factor,
                                low_freq_factor=sc.low_freq_factor,
                                high_freq_factor=sc.high_freq_factor,
                                original_max_position_embeddings=sc.original_max_position_embeddings))
  _biases_to_hf(cfg, out)
  return out


def _biases_to_hf(cfg: LlamaConfig, out: dict) -> None:
  mt, biases = cfg.model_type, (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
  fits = {"llama": cfg.qkv_bias == cfg.o_bias and cfg.sliding_window is None,
          "qwen2": biases == (True, False, False),
          "mistral": biases == (False, False, False)}[mt]
  if not fits:
    raise ConfigError(f"config_to_hf: model_type {mt!r} cannot express qkv_bias={cfg.qkv_bias}, "
                     f"o_bias={cfg.o_bias}, mlp_bias={cfg.mlp_bias}, "
                     f"sliding_window={cfg.sliding_window}")
  if mt == "llama":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif mt == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  else:
    sliding = cfg.sliding_window is not None
    out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
               max_window_layers=0 if sliding else cfg.num_hidden_layers)
