"""Compiled, sharded training steps and greedy generation."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.sharding.mesh import DEFAULT_RULES, _batch_spec
# names the docstring examples use
from jlora import lora as L  # noqa: F401
from jlora.sharding.derive import adapter_shardings, state_shardings  # noqa: F401
from jlora.sharding.mesh import make_mesh, shard_batch  # noqa: F401


def shard_train_step(step: Callable, mesh: Mesh, *, base_shardings: Any,
                     adapter_shardings: Any, state_shardings: Any,
                     batch_sharding: NamedSharding | None = None, rules=None,
                     donate: bool = True, compiler_options: dict | None = None) -> Callable:
  """Compiles a training step with explicit shardings for every argument.

  ``step(adapter, opt_state, base, batch, rng) -> (adapter, opt_state, metrics)``
  is the *un-jitted* step (``jlora.train.make_train_step(..., jit=False)``).
  The result is ``jax.jit`` of it with ``in_shardings``/``out_shardings``
  pinned — adapter and optimizer state keep their shardings from step to
  step, the base stays where it is (never donated), the batch is split over
  the batch axes and metrics come back replicated — and the adapter's and
  state's buffers donated. It traces under ``jax.set_mesh(mesh)`` and
  ``nn.logical_axis_rules(rules)``, so a model's
  ``nn.with_logical_constraint`` on activations takes effect.

  Args:
    step: the un-jitted step function.
    mesh: the device mesh.
    base_shardings: shardings of the base tree (:func:`param_shardings`, with
      :func:`quantized_shardings` for a quantized base).
    adapter_shardings: :func:`adapter_shardings`.
    state_shardings: :func:`state_shardings` of the optimizer state.
    batch_sharding: one sharding for every batch leaf (default: the batch
      axis over the "batch" rule's mesh axes, the rest replicated); the batch
      size must divide evenly.
    rules: logical axis rules (:data:`DEFAULT_RULES`).
    donate: donate the adapter's and optimizer state's buffers.
    compiler_options: passed to ``jax.jit`` (XLA options for this step only).

  Returns:
    ``sharded_step(adapter, opt_state, base, batch, rng=None)``; its
    ``.lower(...)`` (same arguments) lowers it for inspection.

  Example:
    >>> import optax
    >>> mesh = make_mesh(fsdp=2, tensor=4)
    >>> base = {"d": {"kernel": jnp.ones((16, 8))}}
    >>> ad = {"d": {"kernel": L.LoRA(a=jnp.ones((16, 2)), b=jnp.ones((2, 8)), rank=2)}}
    >>> base_sh = {"d": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}}
    >>> ad_sh = adapter_shardings(ad, base_sh)
    >>> opt = optax.sgd(1e-3)
    >>> def step(ad, state, base, x, rng):     # make_train_step(..., jit=False) builds these
    ...   def loss(ad):
    ...     lo = ad["d"]["kernel"]
    ...     return jnp.mean((x @ base["d"]["kernel"] + lo.scale * (x @ lo.a) @ lo.b) ** 2)
    ...   value, grads = jax.value_and_grad(loss)(ad)
    ...   updates, state = opt.update(grads, state)
    ...   return optax.apply_updates(ad, updates), state, {"loss": value}
    >>> state = opt.init(ad)
    >>> sharded = shard_train_step(step, mesh, base_shardings=base_sh, adapter_shardings=ad_sh,
    ...                            state_shardings=state_shardings(state, ad_sh))
    >>> ad, state, metrics = sharded(ad, state, base, jnp.ones((8, 16)))
    >>> ad["d"]["kernel"].b.sharding.spec
    P(None, 'tensor')
  """
  rules = DEFAULT_RULES if rules is None else rules
  rep = NamedSharding(mesh, P())
  batch_sharding = batch_sharding or NamedSharding(mesh, _batch_spec(rules, 1))
  jitted = jax.jit(
      step,
      in_shardings=(adapter_shardings, state_shardings, base_shardings, batch_sharding, rep),
      out_shardings=(adapter_shardings, state_shardings, rep),
      donate_argnums=(0, 1) if donate else (), compiler_options=compiler_options)

  def sharded_step(adapter, opt_state, base, batch, rng=None):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(adapter, opt_state, base, batch, rng)

  def lower(adapter, opt_state, base, batch, rng=None):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(adapter, opt_state, base, batch, rng)
  sharded_step.lower = lower
  return sharded_step


def greedy_decode(logits_fn: Callable, base: Any, adapter: Any, prompt: jax.Array,
                  max_new_tokens: int) -> jax.Array:
  """Greedy decoding by re-running a causal model on a fixed-size buffer.

  ``logits_fn(base, adapter, ids) -> logits`` maps ``ids: [batch, T]`` to
  ``[batch, T, vocab]``; it must be causal (position t sees positions <= t),
  so the padding after the tokens produced so far never changes them. Every
  step has the same shapes, hence one compile; without a KV cache each step
  costs a full forward pass (fine for tests and short outputs).

  Args:
    logits_fn: the model's forward pass, e.g. ``lambda p, ad, ids:
      jlora.apply(model, {"params": p}, ad, ids)``.
    base / adapter: passed to ``logits_fn``.
    prompt: ``[batch, P]`` integer token ids.
    max_new_tokens: number of tokens to append.

  Returns:
    ``[batch, P + max_new_tokens]``: the prompt then the greedy tokens.

  Example:
    >>> table = jnp.eye(5)[jnp.array([1, 2, 3, 4, 0])]    # next token = id + 1 mod 5
    >>> fn = lambda base, ad, ids: table[ids]
    >>> greedy_decode(fn, None, None, jnp.array([[0, 1]]), 3).tolist()
    [[0, 1, 2, 3, 4]]
  """
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"greedy_decode: prompt must be [batch, length] integer ids, got "
                     f"{prompt.dtype} {list(prompt.shape)}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"greedy_decode: max_new_tokens must be a positive int, got "
                     f"{max_new_tokens!r}")
  length = prompt.shape[1]
  ids = jnp.pad(prompt, ((0, 0), (0, max_new_tokens)))

  def body(i, ids):
    logits = logits_fn(base, adapter, ids)
    last = jax.lax.dynamic_index_in_dim(logits, length + i - 1, axis=1, keepdims=False)
    token = jnp.argmax(last, axis=-1).astype(ids.dtype)
    return jax.lax.dynamic_update_index_in_dim(ids, token, length + i, axis=1)
  return jax.lax.fori_loop(0, max_new_tokens, body, ids)


def shard_generate(logits_fn: Callable, mesh: Mesh, *, base_shardings: Any,
                   adapter_shardings: Any, max_new_tokens: int, rules=None,
                   compiler_options: dict | None = None) -> Callable:
  """A compiled, sharded :func:`greedy_decode`: ``generate(base, adapter, prompt) -> ids``.

  The base and adapter stay in their shardings, the prompt and the output are
  split over the batch axes, and the model's logical activation constraints
  apply (traced under ``jax.set_mesh`` and ``nn.logical_axis_rules``).

  Example:
    >>> mesh = make_mesh(data=8)
    >>> table = jnp.eye(5)[jnp.array([1, 2, 3, 4, 0])]    # next token = id + 1 mod 5
    >>> fn = lambda base, ad, ids: base[ids]
    >>> everywhere = NamedSharding(mesh, P())
    >>> gen = shard_generate(fn, mesh, base_shardings=everywhere, adapter_shardings=everywhere,
    ...                      max_new_tokens=3)
    >>> gen(table, None, shard_batch(np.zeros((8, 1), np.int32), mesh))[0].tolist()
    [0, 1, 2, 3]
  """
  rules = DEFAULT_RULES if rules is None else rules
  batch = NamedSharding(mesh, _batch_spec(rules, 2))
  jitted = jax.jit(lambda b, ad, ids: greedy_decode(logits_fn, b, ad, ids, max_new_tokens),
                   in_shardings=(base_shardings, adapter_shardings, batch), out_shardings=batch,
                   compiler_options=compiler_options)

  def generate(base, adapter, prompt):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(base, adapter, prompt)
  return generate
