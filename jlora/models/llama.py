"""A Llama-style decoder in plain Flax Linen: Llama 2/3, TinyLlama, Mistral,
Qwen2/3, Gemma 1/2/3 (text) and Phi-3, one module with config switches.

Nothing here knows about LoRA: projections are ``nn.Dense`` (kernel
``[in, out]``) and the embedding is ``nn.Embed``, so ``jlora.apply`` adapts the
model by intercepting those layers. Module names are Hugging Face's, so
parameter paths read like PEFT's module names::

  embed_tokens/embedding                 [vocab, hidden]
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel, bias
  layers_{i}/self_attn/qkv_proj/kernel   [hidden, (heads + 2 kv_heads) · head]  (Phi-3)
  layers_{i}/self_attn/{q,k}_norm/scale  [head]                    (Qwen3, Gemma 3)
  layers_{i}/mlp/{gate,up,down}_proj/kernel
  layers_{i}/mlp/gate_up_proj/kernel     [hidden, 2 · intermediate]              (Phi-3)
  layers_{i}/{input,post_attention}_layernorm/scale
  layers_{i}/{pre,post}_feedforward_layernorm/scale                  (Gemma 2/3)
  norm/scale, lm_head/kernel             [hidden, vocab] (absent when tied)

With ``scan_layers=True`` the layers are one ``nn.scan`` named ``layers``
whose parameters carry a leading ``[num_hidden_layers]`` axis. Every
parameter is boxed with logical axis names ("vocab", "embed", "heads",
"kv_heads", "mlp", "layers") by ``nn.with_logical_partitioning``;
``jlora.sharding.param_shardings`` maps them onto a mesh (``nn.unbox`` or
:func:`unboxed_init` gives the plain arrays).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.models.config import ACTIVATIONS, LlamaConfig, remat_policy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for incremental decoding.

  Attributes:
    k / v: ``[num_hidden_layers, batch, max_len, num_key_value_heads, head_size]``
      (RoPE already applied to ``k``).
    mask: ``[batch, max_len]`` bool, True where a slot holds a real (non-padding) token.
    index: int32 scalar, the number of slots filled so far (the next write position).
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

    Example:
      >>> from jlora.models.config import preset
      >>> KVCache.init(preset("tiny"), batch=2, max_len=8).k.shape
      (2, 2, 8, 2, 16)
    """
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads,
             config.head_size)
    dtype = config.dtype if dtype is None else dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def _boxed(init, names):
  return nn.with_logical_partitioning(init, names)


def _dense(cfg: LlamaConfig, features: int, names: tuple[str, str], use_bias: bool,
           name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=_boxed(nn.initializers.normal(cfg.initializer_range), names),
                  bias_init=_boxed(nn.initializers.zeros_init(), names[1:]), name=name)


def _lead(x: jax.Array, ndim: int) -> jax.Array:
  """``x`` with leading size-1 axes up to ``ndim`` (explicit broadcasting)."""
  return x.reshape((1,) * (ndim - x.ndim) + x.shape)


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x²) + eps) · scale`` over the last axis, normalised in float32 (as HF).

  Attributes:
    plus_one: Gemma's norm: the factor is ``1 + scale`` (``scale`` starts at
      zero) and the product is taken in float32 before casting back; else
      Llama's: the normalised ``x`` is cast back first, then scaled.
    axis_name: logical axis name of ``scale: [features]``.
  """
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  plus_one: bool = False
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param("scale", _boxed(init, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (y * _lead(1.0 + scale.astype(jnp.float32), x.ndim)).astype(self.dtype)
    return _lead(scale.astype(self.dtype), x.ndim) * y.astype(self.dtype)


def _norm(cfg: LlamaConfig, name: str, axis_name: str = "embed") -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, cfg.norm_plus_one, axis_name,
                 name=name)


def rope_frequencies(cfg: LlamaConfig, local: bool = False) -> np.ndarray:
  """Inverse RoPE frequencies ``[rotary_size // 2]`` (float32), with ``rope_scaling``.

  Matches Hugging Face's "default", "linear" and "llama3" rope types.
  ``local=True``: those of the sliding-window layers, which use
  ``rope_local_base_freq`` unscaled when it is set (Gemma 3).
  """
  dim = cfg.rotary_size
  local = local and cfg.rope_local_base_freq is not None
  theta = cfg.rope_local_base_freq if local else cfg.rope_theta
  inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  sc = None if local else cfg.rope_scaling
  if sc is not None and sc.kind == "linear":
    inv = inv / sc.factor
  elif sc is not None and sc.kind == "llama3":
    old = sc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / sc.low_freq_factor, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= old / sc.high_freq_factor) & (wavelen <= old / sc.low_freq_factor)
    inv = np.where(medium, blended, scaled)
  return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates ``x: [batch, seq, heads, head_size]`` by ``positions: [batch, seq]``.

  Hugging Face's convention: the two halves of the rotated dims are the
  (real, imaginary) parts, ``x·cos + rotate_half(x)·sin``. With
  ``inv_freq: [R / 2]`` only the first ``R`` dims of each head rotate; the
  rest pass unchanged (partial rotary).
  """
  freqs = positions.astype(jnp.float32)[..., None] * _lead(jnp.asarray(inv_freq), 3)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]   # [B, T, 1, R]
  x32 = x.astype(jnp.float32)
  half = inv_freq.shape[-1]
  rot, rest = x32[..., :2 * half], x32[..., 2 * half:]
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * jnp.cos(angles) + rotated * jnp.sin(angles)
  if rest.shape[-1]:
    out = jnp.concatenate([out, rest], axis=-1)
  return out.astype(x.dtype)


def _per_layer(sliding, full, local):
  """``local`` for a sliding-window layer, else ``full``.

  ``sliding`` is None when every layer is alike (then ``full`` is the only
  value), or this layer's bool scalar (a traced one under ``nn.scan``).
  """
  if sliding is None:
    return full
  return jnp.where(sliding, local, full)


class Attention(nn.Module):
  """Grouped-query attention with RoPE; optional KV cache (``kv``, ``index``).

  ``masks`` is ``(mask, sliding_mask)``: the first for every layer when
  ``sliding`` is None, else picked per layer by the bool ``sliding``.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, masks, kv=None, index=None, sliding=None):
    c = self.config
    b, t, _ = x.shape
    n, k_heads, h = c.num_attention_heads, c.num_key_value_heads, c.head_size
    if c.fused_projections:
      qkv = _dense(c, (n + 2 * k_heads) * h, ("embed", "heads"), c.qkv_bias, "qkv_proj")(x)
      q, k, v = jnp.split(qkv, [n * h, (n + k_heads) * h], axis=-1)
    else:
      q = _dense(c, n * h, ("embed", "heads"), c.qkv_bias, "q_proj")(x)
      k = _dense(c, k_heads * h, ("embed", "kv_heads"), c.qkv_bias, "k_proj")(x)
      v = _dense(c, k_heads * h, ("embed", "kv_heads"), c.qkv_bias, "v_proj")(x)
    q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, k_heads, h), v.reshape(b, t, k_heads, h)
    if c.qk_norm:
      q, k = _norm(c, "q_norm", "head_dim")(q), _norm(c, "k_norm", "head_dim")(k)
    if sliding is None:   # every layer alike: all sliding or all full
      inv_freq = rope_frequencies(c, local=c.sliding_layers[0])
    else:
      inv_freq = _per_layer(sliding, rope_frequencies(c), rope_frequencies(c, local=True))
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if kv is not None:
      k = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
      kv = (k, v)
    mask = _per_layer(sliding, *masks)
    scale = (c.query_pre_attn_scalar or h) ** -0.5
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale, c.attention_impl,
                    c.attn_logit_softcapping)
    out = _dense(c, c.hidden_size, ("heads", "embed"), c.o_bias, "o_proj")(
        out.reshape(b, t, n * h))
    return out, kv


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def head_logits(config: LlamaConfig, params: dict, hidden: jax.Array) -> jax.Array:
  """The model's output head on ``hidden: [..., hidden_size]`` (what
  ``Llama(..., return_hidden=True)`` returns): ``[..., vocab]`` logits, exactly as
  the model computes them (tied embedding or ``lm_head``, then soft-capping).

  A plain function of the params tree, so a chunked loss can call it chunk by
  chunk (``jlora.train.chunked_lm_loss``), and ``jlora.adapt`` can adapt it.

  Example:
    >>> from jlora.models.config import preset
    >>> model = Llama(preset("tiny"))
    >>> ids = jnp.ones((1, 4), jnp.int32)
    >>> p = unboxed_init(model, jax.random.key(0), ids)
    >>> h = model.apply({"params": p}, ids, return_hidden=True)
    >>> bool(jnp.allclose(head_logits(model.config, p, h), model.apply({"params": p}, ids)))
    True
  """
  c = config
  if c.tie_word_embeddings:
    w = params["embed_tokens"]["embedding"]                  # [vocab, hidden]
    dims = (((hidden.ndim - 1,), (1,)), ((), ()))
  else:
    w = params["lm_head"]["kernel"]                         # [hidden, vocab]
    dims = (((hidden.ndim - 1,), (0,)), ((), ()))
  dtype = c.dtype or jnp.result_type(hidden, w)
  logits = lax.dot_general(hidden.astype(dtype), w.astype(dtype), dims)
  return softcap(logits, c.final_logit_softcapping)


def attention(q, k, v, mask, scale, implementation=None, logit_cap=None):
  """``jax.nn.dot_product_attention``, causal when ``mask`` is None.

  ``q: [B, T, N, H]``, ``k, v: [B, S, K, H]`` (``N`` a multiple of ``K``),
  ``mask: [B, 1, T, S]`` bool or None -> ``[B, T, N, H]``.

  With ``implementation=None`` on a GPU and 16-bit inputs, cuDNN's fused
  (flash) kernel is tried first, since XLA's default materialises the
  [batch, heads, q, k] scores (2.3x slower and 3x the memory for the TinyLlama
  benchmark, benchmarks/NOTES.md). With ``logit_cap`` the scores are
  soft-capped (:func:`softcap`) before masking and softmax, which no fused
  kernel does: that path is plain XLA (``implementation`` is ignored).
  """
  if logit_cap is not None:
    return _softcapped_attention(q, k, v, mask, scale, logit_cap)
  kw = dict(mask=mask, scale=scale, is_causal=mask is None)
  if implementation is None and jax.default_backend() == "gpu" and q.dtype in (
      jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # shapes/masks cuDNN does not take: fall back to XLA
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)


def _softcapped_attention(q, k, v, mask, scale, cap):
  """Attention with soft-capped scores, softmax in float32 (as HF's eager Gemma 2)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)                        # query heads grouped by kv head
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
  scores = softcap(scores, cap)
  if mask is None:
    mask = jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)   # [B, 1, 1, T, S]
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", weights, v).reshape(b, t, n, h)


class MLP(nn.Module):
  """Gated MLP: ``down(act(gate(x)) · up(x))`` (SwiGLU; GeGLU with a GELU ``hidden_act``)."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    m = c.intermediate_size
    if c.fused_projections:
      gate, up = jnp.split(
          _dense(c, 2 * m, ("embed", "mlp"), c.mlp_bias, "gate_up_proj")(x), 2, axis=-1)
    else:
      gate = _dense(c, m, ("embed", "mlp"), c.mlp_bias, "gate_proj")(x)
      up = _dense(c, m, ("embed", "mlp"), c.mlp_bias, "up_proj")(x)
    return _dense(c, c.hidden_size, ("mlp", "embed"), c.mlp_bias, "down_proj")(
        ACTIVATIONS[c.hidden_act](gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  With ``sandwich_norms`` (Gemma 2/3) each branch's output is normalised too:
  ``x + norm(attn(norm(x)))``, then ``x + norm(mlp(norm(x)))``.
  """
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, masks, kv=None, index=None, sliding=None):
    c = self.config
    if not isinstance(masks, tuple):   # one mask for every layer
      masks = (masks, None)
    h, kv = Attention(c, name="self_attn")(_norm(c, "input_layernorm")(x), positions, masks, kv,
                                           index, sliding)
    if c.sandwich_norms:
      x = x + _norm(c, "post_attention_layernorm")(h)
      x = x + _norm(c, "post_feedforward_layernorm")(
          MLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(x)))
    else:
      x = x + h
      x = x + MLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv


def _layer_class(cfg: LlamaConfig):
  if cfg.remat is None:
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)


def causal_mask(query_slots: jax.Array, key_valid: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
  """Boolean mask ``[batch, 1, T, S]``: causal by slot, padding keys and window excluded.

  Args:
    query_slots: ``[T]`` slot (cache position) of each query.
    key_valid: ``[batch, S]`` True where the key slot holds a real token.
    sliding_window: keep only keys with ``slot > query_slot - sliding_window``.
  """
  keys = jnp.arange(key_valid.shape[1])[None, :]
  allowed = keys <= query_slots[:, None]
  if sliding_window is not None:
    allowed = allowed & (keys > query_slots[:, None] - sliding_window)
  return allowed[None, None, :, :] & key_valid[:, None, None, :]


class Llama(nn.Module):
  """Llama-style causal language model (every family of :class:`LlamaConfig`).

  ``model.apply({"params": p}, input_ids)`` -> logits ``[batch, seq, vocab]``.

  Args (of ``__call__``):
    input_ids: ``[batch, seq]`` integer token ids.
    attention_mask: optional ``[batch, seq]`` (1/True = real token, 0 =
      padding); padding keys are never attended to.
    positions: optional ``[batch, seq]`` RoPE positions; by default the slot
      index (``arange(seq)``, offset by ``cache.index``), as Hugging Face's
      forward does. With left padding pass ``cumsum(mask) - 1``.
    cache: optional :class:`KVCache`; then returns ``(logits, new_cache)``
      with the new keys/values written at ``cache.index``.

  Example:
    >>> from jlora.models.config import preset
    >>> model = Llama(preset("tiny"))
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> params = unboxed_init(model, jax.random.key(0), ids)
    >>> model.apply({"params": params}, ids).shape
    (2, 5, 128)
  """
  config: LlamaConfig

  def example_args(self) -> tuple[jax.ShapeDtypeStruct]:
    """Example inputs for tracing (``jlora.init_adapter``, ``jlora.peft.load``): ``input_ids
    [1, 8]`` as a ``jax.ShapeDtypeStruct`` (nothing is computed).

    Example:
      >>> from jlora.models.config import preset
      >>> Llama(preset("tiny")).example_args()
      (ShapeDtypeStruct(shape=(1, 8), dtype=int32),)
    """
    return (jax.ShapeDtypeStruct((1, 8), jnp.int32),)

  def name_map(self):
    """The family's name map between parameter paths and Hugging Face tensor / PEFT module
    names (:class:`jlora.interop.hf_names.NameMap`), for ``jlora.peft.load`` / ``save``.

    Example:
      >>> from jlora.models.config import preset
      >>> Llama(preset("tiny")).name_map().module_name("layers_1/self_attn/q_proj/kernel")
      'model.layers.1.self_attn.q_proj'
    """
    from jlora.models import registry   # the registry imports this module
    return registry.family(self.config.model_type).names

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
               return_hidden=False):
    c = self.config
    _check_inputs(input_ids, attention_mask, positions)
    b, t = input_ids.shape
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=_boxed(nn.initializers.normal(c.initializer_range),
                                           ("vocab", "embed")), name="embed_tokens")
    x = embed(input_ids)
    if c.scale_embeddings:   # sqrt(hidden) rounded to the weights' dtype, as HF's Gemma
      x = x * jnp.asarray(math.sqrt(c.hidden_size), c.param_dtype).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    valid = (jnp.ones((b, t), bool) if attention_mask is None
             else jnp.asarray(attention_mask).astype(bool))
    index = None if cache is None else cache.index
    slots = jnp.arange(t) if cache is None else cache.index + jnp.arange(t)
    key_valid = valid if cache is None else lax.dynamic_update_slice(cache.mask, valid,
                                                                     (0, cache.index))
    if positions is None:
      positions = jnp.broadcast_to(slots[None, :], (b, t))
    kinds = set(c.sliding_layers)
    if kinds == {False} and attention_mask is None and cache is None:
      # Unpadded, uncached, unwindowed: plain causal attention, which cuDNN's
      # flash kernel masks itself (no [batch, 1, T, T] mask array).
      masks = (None, None)
    elif len(kinds) == 1:
      masks = (causal_mask(slots, key_valid, c.sliding_window if True in kinds else None), None)
    else:   # Gemma 2/3: both masks, each layer picks its own
      masks = (causal_mask(slots, key_valid), causal_mask(slots, key_valid, c.sliding_window))
    kv = None if cache is None else (cache.k, cache.v)
    x, kv = self._layers(x, positions, masks, kv, index)
    x = _norm(c, "norm")(x)
    if return_hidden:      # the head's input, for a loss that makes logits chunk by chunk
      x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
      return x if cache is None else (x, KVCache(k=kv[0], v=kv[1], mask=key_valid,
                                                  index=cache.index + t))
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(c, c.vocab_size, ("embed", "vocab"), False, "lm_head")(x)
    logits = softcap(logits, c.final_logit_softcapping)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    if cache is None:
      return logits
    return logits, KVCache(k=kv[0], v=kv[1], mask=key_valid, index=cache.index + t)

  def _layers(self, x, positions, masks, kv, index):
    c, layer = self.config, _layer_class(self.config)
    # per-layer sliding flags only where layers differ (uniform: one mask, one RoPE)
    sliding = None if len(set(c.sliding_layers)) == 1 else np.asarray(c.sliding_layers)
    if c.scan_layers:
      stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
                      length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      return stack(c, name="layers")(x, positions, masks, kv, index,
                                     None if sliding is None else jnp.asarray(sliding))
    new = []
    for i in range(c.num_hidden_layers):
      x, kv_i = layer(c, name=f"layers_{i}")(
          x, positions, masks, None if kv is None else (kv[0][i], kv[1][i]), index,
          None if sliding is None else jnp.asarray(sliding[i]))
      new.append(kv_i)
    if kv is None:
      return x, None
    return x, (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))


def _check_inputs(input_ids, attention_mask, positions):
  shape = getattr(input_ids, "shape", None)
  if shape is None or len(shape) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"Llama: input_ids must be [batch, seq] integer ids, got "
                     f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {shape}")
  for name, x in (("attention_mask", attention_mask), ("positions", positions)):
    if x is not None and tuple(jnp.shape(x)) != tuple(shape):
      raise ValueError(f"Llama: {name} has shape {list(jnp.shape(x))} but input_ids is "
                       f"{list(shape)}")


def unboxed_init(model: Llama, key: jax.Array, input_ids: jax.Array) -> dict:
  """``model.init`` (jitted) without the logical-axis boxes: the plain ``params`` tree.

  Example:
    >>> from jlora.models.config import preset
    >>> p = unboxed_init(Llama(preset("tiny")), jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    >>> p["layers_0"]["self_attn"]["q_proj"]["kernel"].shape
    (64, 64)
  """
  return nn.unbox(jax.jit(model.init)(key, input_ids)["params"])


def abstract_params(config: LlamaConfig) -> dict:
  """The boxed parameter tree as ``jax.ShapeDtypeStruct`` leaves (no memory spent).

  Each leaf is an ``nn.LogicallyPartitioned`` whose ``names`` are the logical
  axes: pass the tree to ``jlora.sharding.param_shardings`` for a mesh.

  Example:
    >>> from jlora.models.config import preset
    >>> tree = abstract_params(preset("llama-3-8b"))
    >>> tree["embed_tokens"]["embedding"].names
    ('vocab', 'embed')
  """
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda k, x: Llama(config).init(k, x), jax.random.key(0), ids)["params"]


def quantized_init(config: LlamaConfig, key: jax.Array, **quantize_kwargs) -> dict:
  """Random parameters with the layers' kernels quantized as each layer is made.

  ``quantize(unboxed_init(...))`` needs the whole full-precision model in
  memory first; this builds one decoder layer at a time (with the model's own
  initializers, inside ``jit``), quantizes it at once with
  ``jlora.quantize(layer, **quantize_kwargs)`` and stacks the results, so the
  peak is the quantized model plus one full-precision layer. That is how a
  70B-shape base (140 GB in bf16) is made on one 80 GB GPU. The embedding,
  final norm and ``lm_head`` come from a one-layer model and are left as they
  are (``jlora.quantize`` skips output heads by default).

  The tree has :func:`unboxed_init`'s structure and shapes (stacked under
  ``layers`` with ``scan_layers``, else ``layers_{i}``); layer ``i`` is
  ``quantize(DecoderLayer.init(jax.random.split(k, n)[i]))``, not the same
  random draw as ``model.init``.

  Example:
    >>> from jlora.models.config import preset
    >>> p = quantized_init(preset("tiny"), jax.random.key(0), scheme="nf4")
    >>> type(p["layers_0"]["mlp"]["up_proj"]["kernel"]).__name__
    'QArray'
  """
  from jlora.quant import quantize
  from jlora.quant.tree import MIN_SIZE

  n = config.num_hidden_layers
  if config.scan_layers:  # targets by the stacked size, as quantize(unboxed_init(...)) does
    quantize_kwargs["min_size"] = -(-quantize_kwargs.get("min_size", MIN_SIZE) // n)
  k_outer, k_layers = jax.random.split(key)
  ids = jnp.zeros((1, 1), jnp.int32)
  outer = unboxed_init(Llama(dataclasses.replace(config, num_hidden_layers=1,
                                                 scan_layers=False)), k_outer, ids)
  del outer["layers_0"]
  layer = DecoderLayer(dataclasses.replace(config, remat=None))
  x = jnp.zeros((1, 1, config.hidden_size), config.dtype)

  def one(k):
    return quantize(nn.unbox(layer.init(k, x, jnp.zeros((1, 1), jnp.int32), None)["params"]),
                    **quantize_kwargs)

  keys = jax.random.split(k_layers, n)
  if config.scan_layers:
    return {**outer, "layers": jax.jit(lambda ks: lax.map(one, ks))(keys)}
  make = jax.jit(one)
  return {**outer, **{f"layers_{i}": make(keys[i]) for i in range(n)}}
