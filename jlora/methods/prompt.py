"""Prompt tuning: learned virtual-token embeddings prepended to the input (Lester et al., 2021).

The trainable tree is one :class:`Prompt`, ``embeddings: [n, hidden]``; the
base model is unchanged and frozen. As PEFT does for a causal LM, the model
then runs on ``[prompt; embed(ids)]`` (``n + T`` positions, RoPE positions
``0 … n+T-1``), with the attention mask extended by ``n`` ones, and returns
outputs for all ``n + T`` positions (drop the first ``n`` for the inputs'
own logits: ``logits[:, n:]``).

- Any model that takes input embeddings: :func:`prepend` gives the extended
  embeddings and mask.
- A Flax Linen model that embeds token ids itself with an ``nn.Embed`` (the
  reference Llama, and most): :func:`apply` runs it on ``n`` placeholder ids
  followed by ``ids`` and replaces the embedding module's output at the
  placeholders by the prompt (``flax.linen.intercept_methods``); the model's
  code is not touched.

Example:
  >>> class LM(nn.Module):             # any Linen model that embeds its ids with nn.Embed
  ...   @nn.compact
  ...   def __call__(self, ids):
  ...     return nn.Dense(10)(nn.Embed(10, 4, name="embed_tokens")(ids))
  >>> ids = jnp.array([[5, 6, 7]])
  >>> params = LM().init(jax.random.key(0), ids)["params"]
  >>> prompt = init_prompt(jax.random.key(1), 2, params["embed_tokens"]["embedding"])
  >>> apply(LM(), params, prompt, ids).shape        # [batch, n + T, vocab]
  (1, 5, 10)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.checkpoint import register_node
from jlora.errors import AdapterError

INITS = ("random", "vocab")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompt:
  """Soft prompt: ``embeddings: [num_virtual_tokens, hidden]`` (PEFT's ``prompt_embeddings``).

  Example:
    >>> Prompt(jnp.zeros((4, 16))).num_virtual_tokens
    4
  """
  embeddings: jax.Array
  _jlora_node = True

  @property
  def num_virtual_tokens(self) -> int:
    return int(self.embeddings.shape[0])

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])


register_node(Prompt)


def init_prompt(key: jax.Array, num_virtual_tokens: int, embedding: jax.Array, *,
                init: str = "vocab", dtype=jnp.float32) -> Prompt:
  """A prompt of ``num_virtual_tokens`` vectors for a model with this embedding table.

  Args:
    key: PRNG key.
    num_virtual_tokens: ``n``.
    embedding: the model's token embedding table ``[vocab, hidden]`` (its
      values are read only by "vocab").
    init: "vocab" (PEFT's ``SAMPLE_VOCAB``: rows of random tokens, which
      start the prompt on the embeddings' manifold) or "random" (PEFT's
      ``RANDOM``: N(0, 1), as ``torch.nn.Embedding``).
    dtype: the prompt's dtype.

  Example:
    >>> table = jnp.arange(12.0).reshape(6, 2)
    >>> p = init_prompt(jax.random.key(0), 3, table)
    >>> p.embeddings.shape, bool(jnp.isin(p.embeddings[:, 0], table[:, 0]).all())
    ((3, 2), True)
  """
  if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
    raise AdapterError(f"init_prompt: num_virtual_tokens must be a positive int, got "
                       f"{num_virtual_tokens!r}")
  vocab, dim = embedding.shape
  if init == "vocab":
    rows = jax.random.randint(key, (num_virtual_tokens,), 0, vocab)
    return Prompt(jnp.asarray(embedding)[rows].astype(dtype))
  if init == "random":
    return Prompt(jax.random.normal(key, (num_virtual_tokens, dim), dtype))
  raise AdapterError(f"init_prompt: init must be one of {INITS}, got {init!r}")


def _broadcast(prompt: Prompt, batch: int, dtype) -> jax.Array:
  e = prompt.embeddings.astype(dtype)
  return jnp.broadcast_to(e[None], (batch,) + e.shape)


def extend_mask(prompt: Prompt, attention_mask: jax.Array | None) -> jax.Array | None:
  """``[ones(n); mask]`` along the sequence (None stays None).

  Example:
    >>> extend_mask(Prompt(jnp.zeros((2, 4))), jnp.array([[0, 1]]))
    Array([[1, 1, 0, 1]], dtype=int32)
  """
  if attention_mask is None:
    return None
  m = jnp.asarray(attention_mask)
  ones = jnp.ones((m.shape[0], prompt.num_virtual_tokens), m.dtype)
  return jnp.concatenate([ones, m], axis=1)


def prepend(prompt: Prompt, embeds: jax.Array, attention_mask: jax.Array | None = None):
  """``([prompt; embeds], [ones; mask])`` for a model that takes input embeddings.

  Args:
    prompt: the :class:`Prompt`.
    embeds: ``[batch, T, hidden]`` input embeddings.
    attention_mask: optional ``[batch, T]``.

  Returns:
    ``embeds: [batch, n + T, hidden]`` (the prompt cast to ``embeds``' dtype)
    and the mask ``[batch, n + T]`` (or None).

  Example:
    >>> e, m = prepend(Prompt(jnp.ones((2, 4))), jnp.zeros((3, 5, 4)), jnp.ones((3, 5)))
    >>> e.shape, m.shape
    ((3, 7, 4), (3, 7))
  """
  if embeds.ndim != 3 or embeds.shape[-1] != prompt.dim:
    raise AdapterError(f"prepend: embeds must be [batch, T, {prompt.dim}] for a prompt of "
                       f"{list(prompt.embeddings.shape)}, got {list(embeds.shape)}")
  out = jnp.concatenate([_broadcast(prompt, embeds.shape[0], embeds.dtype), embeds], axis=1)
  return out, extend_mask(prompt, attention_mask)


def apply(model: nn.Module, params: Any, prompt: Prompt | None, input_ids: jax.Array, *,
          attention_mask: jax.Array | None = None, adapter: Any = None,
          embed_path: str | None = None, **kwargs):
  """Runs a Linen ``model`` on ``input_ids`` with ``prompt`` prepended to its input embeddings.

  The model sees ``n`` placeholder ids (0) before ``input_ids``; the output
  of its embedding module (an ``nn.Embed`` called on ids) at those positions
  is replaced by the prompt, so anything the model does to its embeddings
  afterwards (Gemma's ``sqrt(hidden)`` scale) applies to the prompt too, as
  in PEFT.

  Args:
    model: a Linen module taking ``input_ids`` first.
    params: its ``params`` tree (may be quantized when ``adapter`` is given).
    prompt: the :class:`Prompt`; None runs the model alone.
    input_ids: ``[batch, T]``.
    attention_mask: optional ``[batch, T]``; extended by ``n`` ones.
    adapter: optionally an adapter tree applied too (``jlora.apply``).
    embed_path: the embedding module's path (e.g. "embed_tokens") when the
      model has more than one ``nn.Embed``.
    **kwargs: passed to the model.

  Returns:
    The model's output for ``n + T`` positions (logits ``[batch, n + T, vocab]``).

  Raises:
    AdapterError: no (or, without ``embed_path``, more than one) ``nn.Embed``
      embeds the ids, or the prompt's width is not the embeddings'.
  """
  def run(ids, mask):
    if mask is not None:
      kwargs["attention_mask"] = mask
    if adapter is not None:
      from jlora.flax import apply as jlora_apply
      return jlora_apply(model, {"params": params}, adapter, ids, **kwargs)
    return model.apply({"params": params}, ids, **kwargs)

  if prompt is None:
    return run(input_ids, attention_mask)
  n = prompt.num_virtual_tokens
  b = input_ids.shape[0]
  ids = jnp.concatenate([jnp.zeros((b, n), input_ids.dtype), input_ids], axis=1)
  seen = set()

  def intercept(next_fun, args, kw, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Embed):
      return next_fun(*args, **kw)
    name = "/".join(module.path)
    if embed_path is not None and name != embed_path:
      return next_fun(*args, **kw)
    seen.add(name)
    y = next_fun(*args, **kw)
    if y.ndim != 3 or y.shape[:2] != ids.shape or y.shape[-1] != prompt.dim:
      raise AdapterError(f"prompt.apply: the embedding {name!r} gave {list(y.shape)}, not "
                         f"[batch, n + T, {prompt.dim}] for the prompt {list(prompt.embeddings.shape)}")
    return jnp.concatenate([_broadcast(prompt, b, y.dtype), y[:, n:]], axis=1)

  with nn.intercept_methods(intercept):
    out = run(ids, extend_mask(prompt, attention_mask))
  if len(seen) != 1:
    raise AdapterError(
        f"prompt.apply: {'no nn.Embed' if not seen else f'{len(seen)} nn.Embed modules ' + str(sorted(seen))} "
        "embedded the input ids" + ("" if not seen else "; pass embed_path= to pick one"))
  return out
