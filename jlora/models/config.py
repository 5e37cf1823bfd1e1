"""LlamaConfig: the shape and numerics of a Llama-style decoder, and presets.

Field names follow Hugging Face's configs (``hidden_size``,
``num_attention_heads``, ``query_pre_attn_scalar``, ...) so a ``config.json``
maps onto it field by field (each family's map is in
:mod:`jlora.models.families`). The same class describes Llama 2/3, TinyLlama,
Mistral (``sliding_window``), Qwen2 (``qkv_bias``), Qwen3 (``qk_norm``),
Gemma 1/2/3 (``norm_plus_one``, ``scale_embeddings``, ``sandwich_norms``,
soft-capping, ``layer_types``, ``rope_local_base_freq``) and Phi-3
(``fused_projections``, ``partial_rotary_factor``): a variant is a field, not
a fork of the model code.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
"""``hidden_act`` names (Hugging Face's) -> activation of the gate projection."""

ROPE_KINDS = ("linear", "llama3")

LAYER_TYPES = ("full_attention", "sliding_attention")
"""``layer_types`` entries (Hugging Face's names)."""

REMAT_POLICIES = {
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
    **{n: n for n in ("nothing_saveable", "everything_saveable", "dots_saveable",
                      "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                      "checkpoint_dots_with_no_batch_dims")},
}
"""``LlamaConfig.remat`` names -> ``jax.checkpoint_policies`` attribute names."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling (Hugging Face's ``rope_scaling`` / ``rope_parameters``).

  Attributes:
    kind: "linear" (every frequency divided by ``factor``) or "llama3" (Llama
      3.1's: long wavelengths divided by ``factor``, short ones kept, a smooth
      blend in between).
    factor / low_freq_factor / high_freq_factor / original_max_position_embeddings:
      Hugging Face's fields of the same names (the last three for "llama3").
  """
  kind: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_KINDS:
      raise ValueError(f"RopeScaling.kind must be one of {ROPE_KINDS}, got {self.kind!r}")
    if not self.factor > 0:
      raise ValueError(f"RopeScaling.factor must be positive, got {self.factor!r}")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"RopeScaling: high_freq_factor {self.high_freq_factor} must exceed "
                       f"low_freq_factor {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """A Llama-style decoder's shape and numerics (Llama, Mistral, Qwen, Gemma, Phi-3).

  Attributes:
    vocab_size / hidden_size / intermediate_size / num_hidden_layers: sizes.
    num_attention_heads / num_key_value_heads: query heads and key/value heads
      (grouped-query attention when fewer; None means as many as query heads).
    head_dim: per-head size; None means ``hidden_size // num_attention_heads``.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta / rope_scaling: RoPE base and optional :class:`RopeScaling`.
    max_position_embeddings: longest sequence the model was trained for
      (informational; RoPE has no table to outgrow).
    tie_word_embeddings: logits through the embedding table (``embed.attend``)
      instead of an ``lm_head`` Dense.
    qkv_bias / o_bias / mlp_bias: biases on q/k/v (Qwen2, Llama
      ``attention_bias``), on o_proj (Llama ``attention_bias``), on the MLP.
    sliding_window: attend to at most this many most recent positions
      (Mistral); None for full causal attention.
    layer_types: per layer, "full_attention" or "sliding_attention" (Gemma 2/3,
      Qwen2/3 ``max_window_layers``); None: every layer slides when
      ``sliding_window`` is set (Mistral, Phi-3), none otherwise. A list of
      one kind is stored that way (None, and no window if all are full).
    hidden_act: activation of the gate projection (a key of ``ACTIVATIONS``).
    partial_rotary_factor: RoPE rotates the first ``int(head_size · factor)``
      dims of each head and passes the rest (Phi-3 family).
    rope_local_base_freq: RoPE base of the sliding-window layers, unscaled
      (Gemma 3); None: they use ``rope_theta`` and ``rope_scaling`` too.
    norm_plus_one: every RMSNorm scales by ``1 + w`` in float32 and its weight
      starts at zero (Gemma); else by ``w`` after casting back (Llama).
    scale_embeddings: token embeddings times ``sqrt(hidden_size)``, rounded
      to ``param_dtype`` (Gemma).
    sandwich_norms: Gemma 2/3's block: ``post_attention_layernorm`` normalises
      the attention output before the residual add, and
      ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the
      MLP (in Llama ``post_attention_layernorm`` is the pre-MLP norm).
    qk_norm: an RMSNorm over each head of q and k before RoPE (``q_norm``,
      ``k_norm``: Qwen3, Gemma 3).
    query_pre_attn_scalar: attention scores scaled by ``this ** -0.5``
      (Gemma 2/3); None: ``head_size ** -0.5``.
    attn_logit_softcapping / final_logit_softcapping: ``cap · tanh(s / cap)``
      on the attention scores / the logits (Gemma 2); None: no cap.
    fused_projections: q, k and v as one ``qkv_proj`` (outputs in that order)
      and gate and up as one ``gate_up_proj`` (gate first), Phi-3's layout.
    initializer_range: std of the normal initialiser of kernels and embeddings.
    model_type: the Hugging Face ``model_type`` this mirrors ("llama",
      "mistral", "qwen2"); only used when writing a ``config.json``.
    dtype / param_dtype: computation and parameter dtypes.
    scan_layers: one ``nn.scan`` over the layers (params get a leading
      ``[num_hidden_layers]`` axis under ``layers``) instead of ``layers_{i}``.
    remat: None, or rematerialise each layer with this policy: "full" (save
      nothing), "dots", "dots_no_batch", or a ``jax.checkpoint_policies``
      policy name (a key of ``REMAT_POLICIES``).
    attention_impl: ``implementation=`` of ``jax.nn.dot_product_attention``
      (None: cuDNN on a GPU with 16-bit inputs when it accepts the shapes,
      else XLA; or force "xla" / "cudnn").

  Example:
    >>> cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> cfg.head_size, cfg.num_key_value_heads
    (16, 2)
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  hidden_act: str = "silu"
  partial_rotary_factor: float = 1.0
  rope_local_base_freq: float | None = None
  norm_plus_one: bool = False
  scale_embeddings: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  fused_projections: bool = False
  initializer_range: float = 0.02
  model_type: str = "llama"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str | None = None
  attention_impl: str | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads"):
      _positive_int(getattr(self, name), name)
    for name in ("head_dim", "sliding_window"):
      if getattr(self, name) is not None:
        _positive_int(getattr(self, name), name)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig.num_attention_heads={self.num_attention_heads} must be a "
                       f"multiple of num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}; set head_dim")
    if self.rotary_size % 2 or not 0 < self.rotary_size <= self.head_size:
      raise ValueError(f"LlamaConfig: RoPE rotates {self.rotary_size} of {self.head_size} head "
                       f"dims (partial_rotary_factor={self.partial_rotary_factor}); it must be "
                       "a positive even number")
    self._check_layer_types()
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                 "rope_local_base_freq"):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"LlamaConfig.{name} must be a positive number or None, got {v!r}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"LlamaConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.hidden_act!r}")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise TypeError(f"LlamaConfig.rope_scaling must be a RopeScaling or None, got "
                      f"{type(self.rope_scaling).__name__}")
    if self.remat is not None:
      remat_policy(self.remat)  # validates the name

  def _check_layer_types(self):
    if self.layer_types is None:
      return
    object.__setattr__(self, "layer_types", tuple(self.layer_types))   # hashable
    if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(
        LAYER_TYPES):
      raise ValueError(f"LlamaConfig.layer_types must hold one of {LAYER_TYPES} per layer "
                       f"({self.num_hidden_layers}), got {list(self.layer_types)}")
    if "sliding_attention" in self.layer_types and self.sliding_window is None:
      raise ValueError("LlamaConfig.layer_types has sliding_attention layers but "
                       "sliding_window is None")
    if len(set(self.layer_types)) == 1:   # one kind: stored the Mistral way
      if self.layer_types[0] == "full_attention":
        object.__setattr__(self, "sliding_window", None)
      object.__setattr__(self, "layer_types", None)

  @property
  def head_size(self) -> int:
    """``head_dim``, or ``hidden_size // num_attention_heads`` when that is None."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def rotary_size(self) -> int:
    """How many dims of each head RoPE rotates: ``int(head_size · partial_rotary_factor)``."""
    return int(self.head_size * self.partial_rotary_factor)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window.

    Example:
      >>> preset("tiny", sliding_window=4).sliding_layers
      (True, True)
      >>> preset("tiny", sliding_window=4,
      ...        layer_types=["sliding_attention", "full_attention"]).sliding_layers
      (True, False)
    """
    if self.layer_types is None:
      return (self.sliding_window is not None,) * self.num_hidden_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy for a ``LlamaConfig.remat`` name."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"LlamaConfig.remat={name!r} is not a policy: use None or one of "
                     f"{sorted(REMAT_POLICIES)}")
  return getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


def _positive_int(v, name):
  if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
    raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")


_LLAMA3_SCALING = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS: dict[str, dict] = {
    # a few-KB model for tests: non-square projections, grouped-query attention.
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           rms_norm_eps=1e-5, max_position_embeddings=2048),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
}
# meta-llama/Llama-3.1-8B and -70B: the same shapes with Llama 3.1's RoPE scaling.
PRESETS["llama-3.1-8b"] = dict(PRESETS["llama-3-8b"], rope_scaling=_LLAMA3_SCALING,
                               max_position_embeddings=131072)
PRESETS["llama-3.1-70b"] = dict(PRESETS["llama-3-70b"], rope_scaling=_LLAMA3_SCALING,
                                max_position_embeddings=131072)


def preset(name: str, **overrides) -> LlamaConfig:
  """A :class:`LlamaConfig` by name (a key of ``PRESETS``), with field overrides.

  Example:
    >>> preset("llama-3-8b").num_key_value_heads
    8
    >>> preset("tiny", scan_layers=True).scan_layers
    True
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return LlamaConfig(**{**PRESETS[name], **overrides})
