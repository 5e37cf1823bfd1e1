"""Optax glue: adapter-only training steps, LoRA+ learning rates, token loss.

Training differentiates only the adapter tree. The base parameters are a
plain, non-differentiated argument of the step (so they may be quantized,
sharded or shared by many adapters), and no gradient of a base weight is ever
formed::

  optimizer = make_optimizer(1e-3, loraplus_ratio=16, grad_accum=4)
  opt_state = init_train_state(adapter, optimizer)
  step = make_train_step(loss_fn, optimizer)      # loss_fn(adapter, base, batch, rng)
  for batch in data:
    adapter, opt_state, metrics = step(adapter, opt_state, base, batch, rng)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jlora import paths
from jlora.lora import LoRA

LABELS = ("lora_a", "lora_b", "magnitude", "other")
"""Optimizer labels of the trainable leaves, see :func:`param_labels`."""


def param_labels(adapter: Any) -> Any:
  """A tree like ``adapter`` naming each trainable array's role.

  Each LoRA node's ``a`` is labelled "lora_a", ``b`` "lora_b" and a DoRA
  ``magnitude`` "magnitude"; any other array (e.g. a prompt embedding or a
  bias trained beside the adapter) is "other". Use it with
  ``optax.multi_transform`` to treat the factors differently.

  Example:
    >>> lo = LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))
    >>> param_labels({"d": {"kernel": lo}})["d"]["kernel"].b
    'lora_b'
  """
  def label(x):
    if isinstance(x, LoRA):
      mag = None if x.magnitude is None else "magnitude"
      return x.replace(a="lora_a", b="lora_b", magnitude=mag)
    return "other"
  return jax.tree.map(label, adapter, is_leaf=lambda x: isinstance(x, LoRA))


def _times(learning_rate, factor: float):
  if callable(learning_rate):
    return lambda count: factor * learning_rate(count)
  return factor * learning_rate


def _check_optimizer_args(learning_rate, weight_decay, loraplus_ratio, grad_accum, clip_norm):
  if not callable(learning_rate) and not learning_rate > 0:
    raise ValueError(f"make_optimizer: learning_rate must be positive or a schedule, "
                     f"got {learning_rate!r}")
  if not weight_decay >= 0:
    raise ValueError(f"make_optimizer: weight_decay must be >= 0, got {weight_decay!r}")
  if loraplus_ratio is not None and not loraplus_ratio > 0:
    raise ValueError(f"make_optimizer: loraplus_ratio must be positive or None, "
                     f"got {loraplus_ratio!r}")
  if not isinstance(grad_accum, int) or isinstance(grad_accum, bool) or grad_accum < 1:
    raise ValueError(f"make_optimizer: grad_accum must be an int >= 1, got {grad_accum!r}")
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"make_optimizer: clip_norm must be positive or None, got {clip_norm!r}")


def make_optimizer(learning_rate: float | optax.Schedule = 1e-4, *, weight_decay: float = 0.0,
                   loraplus_ratio: float | None = None, grad_accum: int = 1,
                   clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW for adapters, with optional LoRA+, clipping and gradient accumulation.

  The chain is: clip the global gradient norm to ``clip_norm`` (if given;
  with accumulation, the norm of the averaged gradient), Adam, decoupled
  weight decay, then the learning rate. With LoRA+
  (``loraplus_ratio=λ``, Hayou et al. 2024) every LoRA ``b`` is stepped with
  ``λ · learning_rate`` (its weight decay too, as in AdamW parameter groups)
  and everything else — ``a``, DoRA magnitudes, other arrays — with
  ``learning_rate``. With ``grad_accum=k`` the gradients of ``k`` calls are
  averaged (``optax.MultiSteps``) and the adapter changes only on every k-th
  call, equal to one step on the k-times batch when the loss is a mean over
  equally sized micro-batches.

  Args:
    learning_rate: a float or an optax schedule (of the optimizer step).
    weight_decay: AdamW's decoupled weight decay on every trainable array.
    loraplus_ratio: λ, the learning-rate ratio of ``b`` to ``a``; None for plain LoRA.
    grad_accum: number of micro-batches per optimizer step.
    clip_norm: clip the global norm of each optimizer step's gradient to this value.
    b1, b2, eps: Adam's hyper-parameters.

  Returns:
    An ``optax.GradientTransformation`` over adapter trees.

  Example:
    >>> opt = make_optimizer(1e-3, loraplus_ratio=16, grad_accum=2)
    >>> ad = {"d": {"kernel": LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))}}
    >>> state = opt.init(ad)
  """
  _check_optimizer_args(learning_rate, weight_decay, loraplus_ratio, grad_accum, clip_norm)
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if loraplus_ratio is None:
    parts.append(optax.scale_by_learning_rate(learning_rate))
  else:
    rates = {name: optax.scale_by_learning_rate(learning_rate) for name in LABELS}
    rates["lora_b"] = optax.scale_by_learning_rate(_times(learning_rate, loraplus_ratio))
    parts.append(optax.multi_transform(rates, param_labels))
  opt = optax.chain(*parts)
  if grad_accum > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=grad_accum).gradient_transformation()
  return opt


def init_train_state(adapter: Any, optimizer: optax.GradientTransformation) -> Any:
  """The optimizer state for training ``adapter``: ``optimizer.init(adapter)``.

  Checks first that every array in ``adapter`` is floating point (only those
  can be trained); raises a TypeError naming the first path that is not.

  Example:
    >>> ad = {"d": {"kernel": LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))}}
    >>> state = init_train_state(ad, make_optimizer(1e-3))
  """
  for path, x in paths.flatten(adapter, is_leaf=None).items():
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"init_train_state: the trainable tree has a {type(x).__name__} "
                      f"of dtype {dtype} at {path!r}; only floating-point arrays can be "
                      "trained (pass the adapter, not the base parameters)")
  return optimizer.init(adapter)


def make_train_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, jit: bool = True):
  """Builds ``step(adapter, opt_state, base, batch, rng=None) -> (adapter, opt_state, metrics)``.

  ``loss_fn(adapter, base, batch, rng)`` returns a scalar loss (or
  ``(loss, aux)`` with ``has_aux=True``). Only the adapter is differentiated:
  the base enters as a constant, so no base-weight gradient is computed and
  the base may hold quantized ``QArray`` nodes or integer arrays. ``rng`` is
  passed through for dropout (or None).

  Args:
    loss_fn: ``(adapter, base, batch, rng) -> loss`` or ``-> (loss, aux)``.
    optimizer: e.g. :func:`make_optimizer`.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is put in the metrics.
    donate: donate the adapter's and optimizer state's buffers to the step
      (the arrays passed in are deleted; keep using the ones returned). The
      base is never donated.
    jit: compile the step with ``jax.jit`` (turn off only to debug).

  Returns:
    The step function. ``metrics`` holds "loss", "grad_norm" (global norm of
    this call's adapter gradient) and, with ``has_aux``, "aux".

  Example:
    >>> def loss_fn(ad, base, batch, rng):
    ...   lo = ad["d"]["kernel"]
    ...   y = batch["x"] @ base["d"]["kernel"] + lo.scale * (batch["x"] @ lo.a) @ lo.b
    ...   return jnp.mean((y - batch["y"]) ** 2)
    >>> opt = make_optimizer(1e-2)
    >>> step = make_train_step(loss_fn, opt)
    >>> base = {"d": {"kernel": jnp.ones((4, 6))}}
    >>> ad = {"d": {"kernel": LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))}}
    >>> batch = {"x": jnp.ones((3, 4)), "y": jnp.zeros((3, 6))}
    >>> ad, state, m = step(ad, init_train_state(ad, opt), base, batch)
  """
  grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=has_aux)

  def step(adapter, opt_state, base, batch, rng=None):
    out, grads = grad_fn(adapter, base, batch, rng)
    loss, aux = out if has_aux else (out, None)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    if has_aux:
      metrics["aux"] = aux
    return adapter, opt_state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean token cross-entropy, computed in float32.

  Args:
    logits: ``[*batch, vocab]`` (e.g. ``[batch, seq, vocab]``), any float dtype.
    targets: ``[*batch]`` integer token ids, aligned with ``logits`` (for a
      causal LM, shift first: ``lm_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:])``).
    mask: optional ``[*batch]``, bool or 0/1 weights; the loss is averaged over
      the masked-in tokens (0 when there are none).

  Returns:
    A float32 scalar.

  Example:
    >>> logits = jnp.zeros((2, 5, 10))
    >>> round(float(lm_loss(logits, jnp.ones((2, 5), jnp.int32))), 4)   # log(10)
    2.3026
  """
  lead = tuple(logits.shape[:-1])
  if logits.ndim < 1 or tuple(targets.shape) != lead:
    raise ValueError(f"lm_loss: targets {list(targets.shape)} must be logits' leading shape "
                     f"{list(lead)} (logits are {list(logits.shape)})")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"lm_loss: targets must be integer token ids, got dtype {targets.dtype}")
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if mask is None:
    return jnp.mean(ce)
  if tuple(mask.shape) != lead:
    raise ValueError(f"lm_loss: mask {list(mask.shape)} must be logits' leading shape "
                     f"{list(lead)} (logits are {list(logits.shape)})")
  w = mask.astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
