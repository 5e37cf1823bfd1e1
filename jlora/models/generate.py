"""Greedy generation with a KV cache for the reference :class:`~jlora.models.llama.Llama`."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jlora.models.llama import KVCache, Llama


def generate(model: Llama, params: Any, input_ids: jax.Array, max_new_tokens: int, *,
             attention_mask: jax.Array | None = None, eos_token_id: int | None = None,
             apply_fn: Callable | None = None) -> jax.Array:
  """Greedy decoding: prefill the prompt once, then one cached step per token.

  Prompts of different lengths are left-padded: pass ``attention_mask`` (0 at
  the padding); RoPE positions then start at each prompt's first real token
  (``cumsum(mask) - 1``), so a padded row decodes exactly like the same
  prompt alone. The whole loop is one ``jax.jit`` (compiled once per model,
  shapes, ``max_new_tokens`` and ``apply_fn``).

  Args:
    model: the :class:`Llama` module.
    params: what ``apply_fn`` takes first; by default the ``params`` tree.
    input_ids: ``[batch, T]`` prompt token ids.
    max_new_tokens: number of tokens to append (>= 1).
    attention_mask: optional ``[batch, T]``, 1 for real tokens, 0 for (left) padding.
    eos_token_id: once a row produces it, the row continues with it.
    apply_fn: ``apply_fn(params, ids, attention_mask=, positions=, cache=)
      -> (logits, cache)``; default ``model.apply({"params": params}, ...)``.
      To decode with an adapter: ``params=(base, adapter)`` and
      ``apply_fn=lambda pa, ids, **kw: jlora.apply(model, {"params": pa[0]}, pa[1], ids, **kw)``
      (define it once: a new function object compiles anew).

  Returns:
    ``[batch, T + max_new_tokens]``: the prompt, then the greedy tokens.

  Example:
    >>> from jlora.models import preset, unboxed_init
    >>> model = Llama(preset("tiny"))
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = unboxed_init(model, jax.random.key(0), ids)
    >>> generate(model, params, ids, 4).shape
    (1, 7)
  """
  if getattr(input_ids, "ndim", None) != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"generate: input_ids must be [batch, T] integer ids, got "
                     f"{getattr(input_ids, 'dtype', None)} {getattr(input_ids, 'shape', None)}")
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  elif tuple(attention_mask.shape) != tuple(input_ids.shape):
    raise ValueError(f"generate: attention_mask {list(attention_mask.shape)} must match "
                     f"input_ids {list(input_ids.shape)}")
  eos = jnp.asarray(-1 if eos_token_id is None else eos_token_id, jnp.int32)
  return _generate(model, max_new_tokens, apply_fn, params, input_ids,
                   jnp.asarray(attention_mask), eos)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(model, max_new_tokens, apply_fn, params, ids, mask, eos):
  if apply_fn is None:
    apply_fn = lambda p, x, **kw: model.apply({"params": p}, x, **kw)
  b, t = ids.shape
  mask = mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = KVCache.init(model.config, b, t + max_new_tokens)
  logits, cache = apply_fn(params, ids, attention_mask=mask, positions=positions, cache=cache)
  token = jnp.argmax(logits[:, -1], axis=-1).astype(ids.dtype)
  done = (eos >= 0) & (token == eos)

  def step(carry, _):
    token, pos, cache, done = carry
    logits, cache = apply_fn(params, token[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                             positions=pos[:, None], cache=cache)
    new = jnp.argmax(logits[:, -1], axis=-1).astype(ids.dtype)
    new = jnp.where(done, eos.astype(new.dtype), new)
    done = done | ((eos >= 0) & (new == eos))
    return (new, pos + 1, cache, done), new

  carry = (token, positions[:, -1] + 1, cache, done)
  _, rest = jax.lax.scan(step, carry, None, length=max_new_tokens - 1)
  return jnp.concatenate([ids, token[:, None], rest.T], axis=1)
