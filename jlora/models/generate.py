"""Generation with a KV cache for the reference :class:`~jlora.models.llama.Llama`:
greedy or sampled, with an adapter or a mixed batch of a bank's adapters."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.llama import KVCache, Llama


def generate(model: Llama, params: Any, input_ids: jax.Array, max_new_tokens: int, *,
             attention_mask: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             apply_fn: Callable | None = None, adapter: Any = None,
             adapter_ids: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None) -> jax.Array:
  """Decoding with a KV cache: prefill the prompt once, then one cached step per token.

  Greedy by default; with ``temperature > 0`` each token is sampled from
  ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely
  tokens and to the smallest set whose probability reaches ``top_p``
  (nucleus), drawing from ``key``. Prompts of different lengths are
  left-padded: pass ``attention_mask`` (0 at the padding); RoPE positions then
  start at each prompt's first real token, so a padded row decodes exactly
  like the same prompt alone. The whole loop is one ``jax.jit``.

  Args:
    model: the :class:`Llama` module.
    params: the base parameter tree (or what ``apply_fn`` takes first).
    input_ids: ``[batch, T]`` prompt token ids.
    max_new_tokens: number of tokens to append (>= 1).
    attention_mask: optional ``[batch, T]``, 1 for real tokens, 0 for (left) padding.
    eos_token_id: a stop token or several; once a row produces one, it repeats it.
    apply_fn: ``apply_fn(params, ids, attention_mask=, positions=, cache=)
      -> (logits, cache)``; default ``model.apply`` with ``adapter``.
    adapter: an adapter tree, or a :class:`jlora.AdapterBank` with
      ``adapter_ids`` (one slot per row, ``-1`` for the base alone).
    adapter_ids: ``[batch]`` slot ids for a bank.
    temperature / top_k / top_p: sampling (``temperature=0``: greedy).
    key: PRNG key for sampling.

  Returns:
    ``[batch, T + max_new_tokens]``: the prompt, then the new tokens.

  Example:
    >>> from jlora.models import preset, unboxed_init
    >>> model = Llama(preset("tiny"))
    >>> ids = jnp.array([[1, 2, 3]])
    >>> params = unboxed_init(model, jax.random.key(0), ids)
    >>> generate(model, params, ids, 4).shape
    (1, 7)
    >>> generate(model, params, ids, 4, temperature=0.8, top_k=20, key=jax.random.key(1)).shape
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
  if not float(temperature) >= 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
  sampling = float(temperature) > 0
  if sampling and key is None:
    raise ValueError("generate: sampling (temperature > 0) needs key=")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"generate: top_k must be a positive int, got {top_k!r}")
  if top_p is not None and not 0 < float(top_p) <= 1:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
  stops = [] if eos_token_id is None else (
      [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
  if apply_fn is not None and (adapter is not None or adapter_ids is not None):
    raise ValueError("generate: give apply_fn or adapter, not both")
  sample = (float(temperature), top_k, None if top_p is None else float(top_p)) if sampling \
      else None
  return _generate(model, max_new_tokens, apply_fn, sample, params, adapter, adapter_ids,
                   input_ids, jnp.asarray(attention_mask), jnp.asarray(stops, jnp.int32),
                   key if key is not None else jax.random.key(0))


def pick(logits: jax.Array, sample, key: jax.Array) -> jax.Array:
  """The next token of each row: argmax, or a sample (``sample = (temperature,
  top_k, top_p)``) from the tempered, top-k and nucleus-restricted distribution.

  Example:
    >>> pick(jnp.array([[0.0, 3.0, 1.0]]), None, jax.random.key(0)).tolist()
    [1]
    >>> pick(jnp.array([[0.0, 3.0, 1.0]]), (1.0, 1, None), jax.random.key(0)).tolist()
    [1]
  """
  if sample is None:
    return jnp.argmax(logits, axis=-1)
  temperature, top_k, top_p = sample
  z = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z < kth, neg, z)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-z, axis=-1)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(sorted_z, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs            # mass of the more likely tokens
    drop_sorted = before >= top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(z.shape[0])[:, None], order].set(drop_sorted)
    z = jnp.where(drop, neg, z)
  return jax.random.categorical(key, z, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(model, max_new_tokens, apply_fn, sample, params, adapter, adapter_ids, ids, mask,
              stops, key):
  if apply_fn is None:
    if adapter is None:
      apply_fn = lambda p, x, **kw: model.apply({"params": p}, x, **kw)
    else:
      from jlora.flax import apply as adapted
      apply_fn = lambda p, x, **kw: adapted(model, {"params": p}, adapter, x,
                                            adapter_ids=adapter_ids, **kw)
  b, t = ids.shape
  mask = mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  cache = KVCache.init(model.config, b, t + max_new_tokens)
  logits, cache = apply_fn(params, ids, attention_mask=mask, positions=positions, cache=cache)
  key, sub = jax.random.split(key)
  token = pick(logits[:, -1], sample, sub).astype(ids.dtype)
  is_stop = lambda tok: jnp.any(tok[:, None] == stops[None, :], axis=-1)
  done = is_stop(token)

  def step(carry, _):
    token, pos, cache, done, key = carry
    logits, cache = apply_fn(params, token[:, None], attention_mask=jnp.ones((b, 1), jnp.int32),
                             positions=pos[:, None], cache=cache)
    key, sub = jax.random.split(key)
    new = pick(logits[:, -1], sample, sub).astype(ids.dtype)
    new = jnp.where(done, token, new)                # a finished row repeats its stop token
    done = done | is_stop(new)
    return (new, pos + 1, cache, done, key), new

  carry = (token, positions[:, -1] + 1, cache, done, key)
  _, rest = jax.lax.scan(step, carry, None, length=max_new_tokens - 1)
  return jnp.concatenate([ids, token[:, None], rest.T], axis=1)
