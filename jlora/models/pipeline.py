"""The reference :class:`~jlora.models.llama.Llama` pipelined over the mesh's ``stage`` axis.

The model's code is not changed and holds no pipeline code. Its decoder layers
must be one ``nn.scan`` (``scan_layers=True``: parameters under ``layers/...``
with a leading ``[L]`` axis). While a pipelined function runs, a Flax method
interceptor replaces the model's layer stack (``Llama._layers``) with
:func:`jlora.sharding.pipeline.gpipe`, whose stages run the model's own stack
code on ``L/S`` layers each; the embedding, final norm and head are the
model's own. The 1F1B training loss reuses the same model call three ways: up
to the stack (the embedding), the stack's stages, and from the stack on (the
head and loss, per microbatch on the last stage).

The base and the adapter are split the same way: ``layers/...`` leaves go to
the stages (``[L, ...]`` split over ``stage``, as ``DEFAULT_RULES`` lays them
out), everything else (``embed_tokens``, ``norm``, ``lm_head``) is used
outside the stack, replicated over the stages. Only the adapter is
differentiated; a quantized base (QArray leaves) stays quantized inside each
stage and is dequantized layer by layer where it is used.

::

  mesh = sharding.make_mesh(stage=2, fsdp=4)
  pipe = sharding.Pipeline(microbatches=8, schedule="1f1b")
  loss_fn = pipeline.lm_loss_fn(model, mesh, pipe)       # (adapter, base, batch, rng) -> loss
  step = sharding.shard_train_step(train.make_train_step(loss_fn, opt, jit=False), mesh,
                                   ..., rules=sharding.pipeline_rules())
  logits = pipeline.apply(model, {"params": base}, adapter, ids, mesh=mesh, pipeline=pipe)
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import paths
from jlora.errors import ConfigError
from jlora.flax import apply as adapted_apply
from jlora.lora import LoRA
from jlora.models.config import LlamaConfig
from jlora.models.llama import Llama
from jlora.sharding.pipeline import Pipeline, gpipe, one_f_one_b
from jlora.train import lm_loss

STACK = "layers"
"""The parameter subtree of the scanned decoder layers (``scan_layers=True``)."""


class _Stage(Llama):
  """``n`` consecutive decoder layers: the model's own scanned stack, params under ``layers``."""

  @nn.compact
  def __call__(self, x, positions, masks, kv, index):
    return self._layers(x, positions, masks, kv, index)


@contextlib.contextmanager
def _replace_stack(stack_fn: Callable):
  """Within: a Llama's ``_layers(x, positions, masks, kv, index)`` runs ``stack_fn`` instead
  (a stage's own stack, :class:`_Stage`, is left alone)."""
  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "_layers" and isinstance(context.module, Llama)
        and not isinstance(context.module, _Stage)):
      return stack_fn(context.module, *args, **kwargs)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(interceptor):
    yield


def stage_config(config: LlamaConfig, stages: int) -> LlamaConfig:
  """The config of one stage: ``L/S`` layers (per-layer kinds must repeat from stage to stage).

  Example:
    >>> from jlora.models import preset
    >>> stage_config(preset("tiny", num_hidden_layers=4, scan_layers=True), 2).num_hidden_layers
    2
  """
  if not config.scan_layers:
    raise ConfigError("pipeline: the model's layers must be one nn.scan (scan_layers=True), so "
                      "that they are stacked under 'layers' with a leading [L] axis")
  layers = config.num_hidden_layers
  if layers % stages:
    raise ConfigError(f"pipeline: {layers} layers do not split into {stages} stages (the layer "
                      "count must be a multiple of the stage count)")
  n = layers // stages
  kinds = config.layer_types
  if kinds is not None:
    chunks = {tuple(kinds[i:i + n]) for i in range(0, layers, n)}
    if len(chunks) > 1:
      raise ConfigError(f"pipeline: with {stages} stages of {n} layers the stages would hold "
                        f"different layer kinds ({sorted(chunks)}); every stage runs the same "
                        "program, so choose a stage count whose stages repeat the pattern")
    kinds = kinds[:n]
  return config.replace(num_hidden_layers=n, layer_types=kinds)


def split(tree: Any) -> tuple[Any, Any]:
  """``(everything but the layer stack, the layer stack)`` of a base or adapter tree.

  Example:
    >>> split({"layers": {"w": 1}, "norm": {"scale": 2}})
    ({'norm': {'scale': 2}}, {'w': 1})
  """
  if tree is None:
    return None, None
  return {k: v for k, v in tree.items() if k != STACK}, tree.get(STACK)


def _check(model: Llama, adapter: Any) -> None:
  if not isinstance(model, Llama):
    raise ConfigError(f"pipeline: the model must be a jlora.models.Llama, got "
                      f"{type(model).__name__}")
  for path, lo in paths.flatten(adapter or {}, is_leaf=lambda x: isinstance(x, LoRA)).items():
    if isinstance(lo, LoRA) and lo.dropout > 0 and path.startswith(STACK + "/"):
      raise ConfigError(f"pipeline: the adapter at {path!r} has LoRA dropout {lo.dropout}; "
                        "dropout inside pipeline stages is not supported (set dropout=0)")


def _stage_apply(model: Llama, stages: int):
  """``run(base_chunk, adapter_chunk, x, positions, masks, kv, index) -> (x, kv)``."""
  stage = _Stage(stage_config(model.config, stages))

  def run(base_chunk, ad_chunk, x, positions, masks, kv, index):
    ad = None if ad_chunk is None else {STACK: ad_chunk}
    return adapted_apply(stage, {"params": {STACK: base_chunk}}, ad, x, positions, masks, kv,
                         index)
  return run


def apply(model: Llama, variables: dict, adapter: Any, *args, mesh, pipeline: Pipeline,
          **kwargs):
  """``jlora.apply(model, variables, adapter, *args)`` with the decoder layers pipelined.

  The stack runs as :func:`jlora.sharding.pipeline.gpipe` (differentiable:
  ``jax.grad`` of a loss of it is a GPipe training step); the embedding and
  head run outside it. Every argument of :meth:`Llama.__call__` works,
  ``cache=`` included (KV-cache generation: each stage keeps and updates
  the cache of its own layers), so ``jlora.models.generate(...,
  apply_fn=...)`` decodes through the pipeline.

  Args:
    model: a :class:`~jlora.models.llama.Llama` with ``scan_layers=True``.
    variables: ``{"params": base}`` (the base may be quantized).
    adapter: the adapter tree or None.
    *args, **kwargs: the model's inputs (``input_ids``, ``attention_mask=``,
      ``positions=``, ``cache=``) and ``jlora.apply``'s keywords.
    mesh: a mesh with a ``stage`` axis (``make_mesh(stage=S, ...)``).
    pipeline: the :class:`~jlora.sharding.pipeline.Pipeline` (its microbatch
      count must divide the batch).

  Returns:
    What the model returns: logits ``[batch, seq, vocab]`` (with ``cache=``,
    ``(logits, cache)``).

  Example (``tests/test_pipeline.py`` runs it)::

    mesh = sharding.make_mesh(stage=2, data=4)
    logits = apply(model, {"params": params}, adapter, ids, mesh=mesh,
                   pipeline=sharding.Pipeline(microbatches=2))   # == jlora.apply(model, ...)
  """
  _check(model, adapter)
  stages = pipeline.stages(mesh)
  outer_base, layer_base = split(variables["params"])
  outer_ad, layer_ad = split(adapter)
  if layer_base is None:
    raise ConfigError("pipeline: the base has no 'layers' stack (build the model with "
                      "scan_layers=True)")
  run = _stage_apply(model, stages)

  def stage_fn(chunk, x, rows, kv, index):
    positions, masks = rows
    return run(chunk[0], chunk[1], x, positions, masks, kv, index)

  def stack(module, x, positions, masks, kv, index):
    return gpipe(stage_fn, (layer_base, layer_ad), x, (positions, masks), kv, index,
                 mesh=mesh, pipeline=pipeline)

  with _replace_stack(stack):
    return adapted_apply(model, {**variables, "params": outer_base}, outer_ad, *args, **kwargs)


def next_token_loss(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting each token from those before it.

  Example:
    >>> round(float(next_token_loss(jnp.zeros((2, 5, 10)), jnp.ones((2, 5), jnp.int32))), 4)
    2.3026
  """
  return lm_loss(logits[:, :-1], input_ids[:, 1:])


def lm_loss_fn(model: Llama, mesh, pipeline: Pipeline,
               loss: Callable[[jax.Array, Any], jax.Array] = next_token_loss,
               inputs: Callable[[Any], jax.Array] | None = None) -> Callable:
  """A pipelined training loss ``loss_fn(adapter, base, batch, rng) -> scalar``.

  For ``jlora.train.make_train_step(loss_fn, ...)`` (and
  ``jlora.sharding.shard_train_step``): its value and adapter gradient are
  those of ``loss(model(inputs(batch)), batch)``.

  * "gpipe": the model runs through :func:`apply`; ``jax.grad`` of it is
    the GPipe backward pass.
  * "1f1b": :func:`jlora.sharding.pipeline.one_f_one_b` computes the loss
    and the gradients together (a ``jax.custom_vjp``: the gradient comes out
    of the forward computation). The loss is the mean over microbatches of
    ``loss(logits_m, batch_m)``, which is the batch's mean loss whenever
    every microbatch counts the same number of tokens (always, without a
    mask).

  Args:
    model: a :class:`~jlora.models.llama.Llama` with ``scan_layers=True``.
    mesh / pipeline: as for :func:`apply`.
    loss: ``loss(logits, batch) -> scalar``; by default
      :func:`next_token_loss` of a batch of token ids ``[B, T]``.
    inputs: ``inputs(batch) -> input_ids`` (default: the batch itself).

  Example (``tests/test_pipeline.py`` runs it)::

    pipe = sharding.Pipeline(microbatches=8, schedule="1f1b")
    step = train.make_train_step(lm_loss_fn(model, mesh, pipe), optimizer)
  """
  inputs = inputs or (lambda batch: batch)

  if pipeline.schedule == "gpipe":
    def gpipe_loss(adapter, base, batch, rng=None):
      del rng
      logits = apply(model, {"params": base}, adapter, inputs(batch), mesh=mesh,
                     pipeline=pipeline)
      return loss(logits, batch)
    return gpipe_loss

  def loss_and_grads(adapter, base, batch):
    _check(model, adapter)
    stages = pipeline.stages(mesh)
    outer_base, layer_base = split(base)
    outer_ad, layer_ad = split(adapter)
    run = _stage_apply(model, stages)
    ids = inputs(batch)

    def embed(ad):          # the model up to its layer stack; the head's result is unused
      def capture(module, x, positions, masks, kv, index):
        module.sow("intermediates", "stack_inputs", (x, (positions, masks)))
        return x, None
      with _replace_stack(capture):
        _, state = adapted_apply(model, {"params": outer_base}, ad, ids,
                                 mutable=["intermediates"])
      return state["intermediates"]["stack_inputs"][0]

    def stage_fn(base_chunk, ad_chunk, x, rows):
      return run(base_chunk, ad_chunk, x, rows[0], rows[1], None, None)[0]

    def head_fn(outer_base, ad, y, batch_m):      # the model from its layer stack on
      with _replace_stack(lambda module, x, *rest: (y, None)):
        logits = adapted_apply(model, {"params": outer_base}, ad, inputs(batch_m))
      return loss(logits, batch_m)

    x, embed_vjp, rows = jax.vjp(embed, outer_ad, has_aux=True)
    value, d_layers, d_head, d_x = one_f_one_b(
        stage_fn, head_fn, layer_base, layer_ad, outer_base, outer_ad, x, rows, batch,
        mesh=mesh, pipeline=pipeline)
    d_outer = jax.tree.map(jnp.add, d_head, embed_vjp(d_x)[0])
    grads = dict(d_outer)
    if layer_ad is not None:
      grads[STACK] = d_layers
    return value, grads

  @jax.custom_vjp
  def one_f_one_b_loss(adapter, base, batch):
    return loss_and_grads(adapter, base, batch)[0]

  def fwd(adapter, base, batch):
    return loss_and_grads(adapter, base, batch)

  def bwd(grads, g):
    return jax.tree.map(lambda d: (g * d).astype(d.dtype), grads), None, None

  one_f_one_b_loss.defvjp(fwd, bwd)

  def loss_fn(adapter, base, batch, rng=None):
    del rng
    return one_f_one_b_loss(adapter, base, batch)
  return loss_fn
