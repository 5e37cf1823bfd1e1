"""Prefix tuning / P-tuning v2: learned keys and values before every layer's own
(Li & Liang, 2021; Liu et al., 2022).

The trainable tree is one :class:`Prefix`: for ``n`` virtual tokens, a key
and a value per layer and key/value head, ``[n, layers · 2 · kv_heads · head]``
flattened as PEFT lays it out (layer-major, then key/value, then heads, then
head dims). Optionally it is reparameterised during training, as PEFT's
``prefix_projection``: a smaller ``embedding: [n, token_dim]`` passes through
an MLP ``tanh(e·W1 + b1)·W2 + b2`` to the flat prefix; :meth:`Prefix.frozen`
replaces the MLP by its output (what PEFT saves).

The prefix enters the model through its own argument for past keys and
values: :func:`apply` builds the reference Llama's :class:`KVCache` with the
prefix in slots ``0 … n-1`` (keys used as they are, without RoPE, as PEFT's
``past_key_values``), so the inputs take RoPE positions ``n … n+T-1`` and
attend to the prefix and causally to each other, exactly as PEFT runs a
Hugging Face Llama. The model's code is not touched.

Example (docs/methods.md runs one through the model):
  >>> from jlora.models import preset
  >>> prefix = init_prefix(jax.random.key(1), preset("tiny"), 4)     # 2 layers, 2 kv heads of 16
  >>> prefix.embedding.shape, prefix.kv(batch=3)[0].shape
  ((4, 128), (2, 3, 4, 2, 16))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora.checkpoint import register_node
from jlora.errors import AdapterError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
  """Per-layer key/value prefixes, optionally through PEFT's reparameterising MLP.

  Attributes:
    embedding: ``[n, layers · 2 · kv_heads · head_size]`` (the flat prefix), or
      with a projection ``[n, token_dim]``.
    w1, b1, w2, b2: the projection ``[token_dim, hidden]``, ``[hidden]``,
      ``[hidden, layers · 2 · kv_heads · head_size]``, ``[...]``; None without.
    num_layers / num_kv_heads / head_size: static.

  Example:
    >>> p = Prefix(jnp.zeros((3, 2 * 2 * 4 * 8)), num_layers=2, num_kv_heads=4, head_size=8)
    >>> p.num_virtual_tokens, p.kv(batch=5)[0].shape       # [layers, batch, n, heads, head]
    (3, (2, 5, 3, 4, 8))
  """
  embedding: jax.Array
  w1: jax.Array | None = None
  b1: jax.Array | None = None
  w2: jax.Array | None = None
  b2: jax.Array | None = None
  num_layers: int = dataclasses.field(default=1, metadata=dict(static=True))
  num_kv_heads: int = dataclasses.field(default=1, metadata=dict(static=True))
  head_size: int = dataclasses.field(default=1, metadata=dict(static=True))
  _jlora_node = True

  @property
  def num_virtual_tokens(self) -> int:
    return int(self.embedding.shape[0])

  @property
  def projection(self) -> bool:
    return self.w1 is not None

  @property
  def width(self) -> int:
    """``layers · 2 · kv_heads · head_size``."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_size

  def flat(self) -> jax.Array:
    """The prefix ``[n, layers · 2 · kv_heads · head_size]`` (through the MLP if any)."""
    if not self.projection:
      return self.embedding
    h = jnp.tanh(self.embedding @ self.w1 + self.b1[None])
    return h @ self.w2 + self.b2[None]

  def frozen(self) -> "Prefix":
    """The same prefix with the MLP evaluated away (PEFT saves this)."""
    return dataclasses.replace(self, embedding=self.flat(), w1=None, b1=None, w2=None, b2=None)

  def kv(self, batch: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Keys and values ``[layers, batch, n, kv_heads, head_size]`` each."""
    f = self.flat()
    n = f.shape[0]
    f = f.reshape(n, self.num_layers, 2, self.num_kv_heads, self.head_size)
    f = jnp.transpose(f, (2, 1, 0, 3, 4))                      # [2, L, n, K, H]
    f = jnp.broadcast_to(f[:, :, None], (2, self.num_layers, batch) + f.shape[2:])
    if dtype is not None:
      f = f.astype(dtype)
    return f[0], f[1]


register_node(Prefix)


def init_prefix(key: jax.Array, config: Any, num_virtual_tokens: int, *,
                projection: int | None = None, dtype=jnp.float32) -> Prefix:
  """A prefix for a model of ``config`` (a ``LlamaConfig``), initialised as PEFT's.

  Args:
    key: PRNG key.
    config: gives ``num_hidden_layers``, ``num_key_value_heads``, ``head_size``.
    num_virtual_tokens: ``n``.
    projection: None for a plain prefix; else the MLP's hidden width (PEFT's
      ``encoder_hidden_size``), with ``token_dim = kv_heads · head_size``.
    dtype: the arrays' dtype.

  PEFT's initialisation: the embedding ~ N(0, 1) (``torch.nn.Embedding``), the
  MLP's weights and biases ~ U(±1/sqrt(fan_in)) (``torch.nn.Linear``).

  Example:
    >>> from jlora.models import preset
    >>> p = init_prefix(jax.random.key(0), preset("tiny"), 4, projection=32)
    >>> p.embedding.shape, p.w2.shape, p.flat().shape
    ((4, 32), (32, 128), (4, 128))
  """
  if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
    raise AdapterError(f"init_prefix: num_virtual_tokens must be a positive int, got "
                       f"{num_virtual_tokens!r}")
  k_heads = config.num_key_value_heads or config.num_attention_heads
  meta = dict(num_layers=config.num_hidden_layers, num_kv_heads=k_heads,
              head_size=config.head_size)
  width = 2 * config.num_hidden_layers * k_heads * config.head_size
  ke, k1, k2, k3, k4 = jax.random.split(key, 5)
  if projection is None:
    return Prefix(jax.random.normal(ke, (num_virtual_tokens, width), dtype), **meta)
  token_dim = k_heads * config.head_size

  def uniform(k, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(k, shape, dtype, -bound, bound)
  return Prefix(jax.random.normal(ke, (num_virtual_tokens, token_dim), dtype),
                w1=uniform(k1, (token_dim, projection), token_dim),
                b1=uniform(k2, (projection,), token_dim),
                w2=uniform(k3, (projection, width), projection),
                b2=uniform(k4, (width,), projection), **meta)


def cache(prefix: Prefix, config: Any, batch: int, length: int):
  """A :class:`~jlora.models.llama.KVCache` of ``n + length`` slots holding the prefix.

  Example:
    >>> from jlora.models import preset
    >>> c = cache(init_prefix(jax.random.key(0), preset("tiny"), 3), preset("tiny"), 2, 5)
    >>> c.k.shape, int(c.index), c.mask.tolist()[0]
    ((2, 2, 8, 2, 16), 3, [True, True, True, False, False, False, False, False])
  """
  from jlora.models.llama import KVCache
  k_heads = config.num_key_value_heads or config.num_attention_heads
  want = (config.num_hidden_layers, k_heads, config.head_size)
  got = (prefix.num_layers, prefix.num_kv_heads, prefix.head_size)
  if want != got:
    raise AdapterError(f"prefix: made for {got[0]} layers of {got[1]} key/value heads of size "
                       f"{got[2]}, but the model has {want[0]} layers of {want[1]} of size {want[2]}")
  n = prefix.num_virtual_tokens
  dtype = config.dtype
  k, v = prefix.kv(batch, dtype)
  pad = jnp.zeros(k.shape[:2] + (length,) + k.shape[3:], dtype)
  mask = jnp.concatenate([jnp.ones((batch, n), bool), jnp.zeros((batch, length), bool)], axis=1)
  return KVCache(k=jnp.concatenate([k, pad], axis=2), v=jnp.concatenate([v, pad], axis=2),
                 mask=mask, index=jnp.asarray(n, jnp.int32))


def apply(model, params: Any, prefix: Prefix | None, input_ids: jax.Array, *,
          attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
          adapter: Any = None):
  """Runs the reference Llama ``model`` on ``input_ids`` after the per-layer prefix.

  Args:
    model: a :class:`~jlora.models.Llama` (anything taking ``cache=`` a
      ``KVCache`` and returning ``(logits, cache)``, with a ``config``).
    params: its ``params`` (may be quantized when ``adapter`` is given).
    prefix: the :class:`Prefix`; None runs the model alone.
    input_ids: ``[batch, T]``.
    attention_mask: optional ``[batch, T]`` (the prefix is always attended to).
    positions: optional ``[batch, T]`` RoPE positions of the inputs; offset
      by ``n`` as PEFT does (default ``n … n+T-1``).
    adapter: optionally an adapter tree applied too (``jlora.apply``).

  Returns:
    logits ``[batch, T, vocab]``.
  """
  def run(**kw):
    if adapter is not None:
      from jlora.flax import apply as jlora_apply
      return jlora_apply(model, {"params": params}, adapter, input_ids, **kw)
    return model.apply({"params": params}, input_ids, **kw)

  kw = {} if attention_mask is None else {"attention_mask": attention_mask}
  if prefix is None:
    return run(positions=positions, **kw)
  b, t = input_ids.shape
  if positions is not None:
    positions = positions + prefix.num_virtual_tokens
  logits, _ = run(positions=positions, cache=cache(prefix, model.config, b, t), **kw)
  return logits
