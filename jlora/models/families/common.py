"""What every family map shares: the tensor-name map and reading ``config.json`` fields.

The name map's class, :class:`jlora.interop.hf_names.NameMap`, is Hugging Face's
``*ForCausalLM`` layout; each family holds its own instance (``Family.names``).

A family module (:mod:`.llama`, :mod:`.gemma`, :mod:`.qwen3`, :mod:`.phi3`)
says, for its ``model_type`` values, which ``config.json`` fields become
which :class:`~jlora.models.config.LlamaConfig` fields, with the
architecture's own defaults (those of its ``transformers`` config class)
where a field is absent, and which values it refuses by name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.errors import ConfigError
from jlora.interop.hf_names import NameMap  # noqa: F401  (each family holds an instance)
from jlora.models.config import ACTIVATIONS, LlamaConfig, RopeScaling
from jlora.models.llama import Llama

# ----------------------------------------------------------------------------- families

@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Family:
  """One architecture family: its ``model_type`` values, config map, name map and model.

  Attributes:
    name: e.g. "gemma".
    architectures: ``model_type`` -> the transformers class ``to_hf`` names
      in ``config.json`` (``"gemma2": "Gemma2ForCausalLM"``).
    defaults: ``model_type`` -> the defaults of its transformers config
      class, used for fields a ``config.json`` leaves out.
    read: ``HFConfig -> dict`` of :class:`LlamaConfig` fields (those of
      :func:`base_fields` and the family's own); raises a
      :class:`jlora.ConfigError` naming any field it does not implement.
    write: ``LlamaConfig -> dict``: the family's ``config.json`` fields beyond
      :func:`base_to_hf`'s.
    names: the tensor-name map.
    model: ``LlamaConfig -> flax module`` (``model.apply({"params": p}, ids)``
      gives logits ``[batch, seq, vocab]``).
  """
  name: str
  architectures: Mapping[str, str]
  defaults: Mapping[str, Mapping[str, Any]]
  read: Callable[["HFConfig"], dict]
  write: Callable[[LlamaConfig], dict]
  names: NameMap = NameMap()
  model: Callable[[LlamaConfig], nn.Module] = Llama

  @property
  def model_types(self) -> tuple[str, ...]:
    return tuple(self.architectures)

  def abstract_params(self, config: LlamaConfig) -> Any:
    """The boxed parameter tree of ``model(config)`` as ``ShapeDtypeStruct`` leaves."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda k, x: self.model(config).init(k, x), jax.random.key(0),
                          ids)["params"]


# ----------------------------------------------------------------------------- config fields

class HFConfig:
  """A ``config.json`` being mapped: fields with the architecture's defaults.

  ``get(name, fallback)`` is the file's value when the key is present
  (``null`` too), else ``defaults[name]`` (the architecture's default), else
  ``fallback``; ``refuse`` raises a :class:`jlora.ConfigError`
  naming a field whose value jlora does not implement.

  Example:
    >>> cfg = HFConfig({"model_type": "x", "sliding_window": None}, "config.json",
    ...                {"sliding_window": 4096, "query_pre_attn_scalar": 256})
    >>> cfg.get("sliding_window"), cfg.get("query_pre_attn_scalar")
    (None, 256)
  """

  def __init__(self, hf: Mapping[str, Any], source: str, defaults: Mapping[str, Any]):
    self.hf, self.source, self.defaults = hf, source, defaults
    self.model_type = hf.get("model_type")

  def get(self, name: str, fallback: Any = None) -> Any:
    if name in self.hf:
      return self.hf[name]
    return self.defaults.get(name, fallback)

  def error(self, message: str) -> ConfigError:
    return ConfigError(f"{self.source}: {message}")

  def refuse(self, name: str, *allowed: Any, why: str = "") -> None:
    """Raises unless ``get(name)`` is one of ``allowed`` (the values that keep the math)."""
    value = self.get(name)
    if value not in allowed:
      raise self.error(f"{name}={value!r} is not supported for model_type {self.model_type!r}"
                       f" (jlora implements {' or '.join(map(repr, allowed))}){why}")


def base_fields(cfg: HFConfig, rope_params: Any = None) -> dict:
  """The :class:`LlamaConfig` fields every family reads the same way (sizes, norms, RoPE).

  ``rope_params``: the RoPE object to read (default: ``rope_parameters`` or
  ``rope_scaling``).

  Example:
    >>> f = base_fields(HFConfig({"vocab_size": 8, "hidden_size": 64, "intermediate_size": 96,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 4},
    ...                          "config.json", {}))
    >>> f["head_dim"], f["num_key_value_heads"], f["rope_theta"]
    (16, 4, 10000.0)
  """
  need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
  missing = [k for k in need if cfg.get(k) is None]
  if missing:
    raise cfg.error(f"missing required field(s) {missing}")
  heads = cfg.get("num_attention_heads")
  if rope_params is None:
    rope_params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  theta, scaling = rope(cfg, rope_params)
  return dict(
      vocab_size=cfg.get("vocab_size"), hidden_size=cfg.get("hidden_size"),
      intermediate_size=cfg.get("intermediate_size"),
      num_hidden_layers=cfg.get("num_hidden_layers"), num_attention_heads=heads,
      num_key_value_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or cfg.get("hidden_size") // heads,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=theta, rope_scaling=scaling,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      initializer_range=float(cfg.get("initializer_range", 0.02)),
      model_type=cfg.model_type)


def rope(cfg: HFConfig, params: Any, what: str = "rope_parameters"
         ) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, RopeScaling or None)`` of a ``rope_parameters`` / ``rope_scaling`` object.

  Reads the transformers 5 layout (``rope_theta`` inside) and the 4 one
  (``rope_theta`` at the top); rope types "default", "linear" and "llama3";
  refuses other types by name. ``partial_rotary_factor`` is the caller's.
  """
  if not isinstance(params, Mapping):
    raise cfg.error(f"{what} must be an object, got {params!r}")
  theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
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
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))))
  raise cfg.error(f"{what}: rope type {kind!r} is not supported (default, linear, llama3)")


def partial_rotary_factor(cfg: HFConfig) -> float:
  """``partial_rotary_factor`` from ``rope_parameters`` or the top level (default 1)."""
  params = cfg.get("rope_parameters") or {}
  inner = params.get("partial_rotary_factor") if isinstance(params, Mapping) else None
  return float(inner if inner is not None else cfg.get("partial_rotary_factor") or 1.0)


def activation(cfg: HFConfig, name: str) -> str:
  """The activation field ``name`` (``hidden_act`` or Gemma 2/3's ``hidden_activation``)."""
  act = cfg.get(name)
  if act not in ACTIVATIONS:
    raise cfg.error(f"{name} {act!r} is not supported ({sorted(ACTIVATIONS)})")
  return act


def sliding_layer_types(cfg: HFConfig, window: int | None,
                        default_types: list[str]) -> tuple[int | None, tuple[str, ...] | None]:
  """``(sliding_window, layer_types)`` for :class:`LlamaConfig`, from ``layer_types``
  (or ``default_types`` when the file has none); ``(None, None)`` when no layer slides."""
  kinds = cfg.get("layer_types") or default_types
  if window is None or "sliding_attention" not in kinds:
    return None, None
  return int(window), tuple(kinds)


def base_to_hf(cfg: LlamaConfig) -> dict:
  """The ``config.json`` fields :func:`base_fields` reads (transformers 4 layout, read by 5 too)."""
  out = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
      num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
      head_dim=cfg.head_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range)
  sc = cfg.rope_scaling
  if sc is not None:
    out["rope_scaling"] = (dict(rope_type="linear", factor=sc.factor) if sc.kind == "linear" else
                           dict(rope_type="llama3", factor=sc.factor,
                                low_freq_factor=sc.low_freq_factor,
                                high_freq_factor=sc.high_freq_factor,
                                original_max_position_embeddings=sc.original_max_position_embeddings))
  return out

