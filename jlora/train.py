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

A run that can be stopped and resumed keeps everything in one
:class:`TrainState` (adapter, optimizer state, step, PRNG key, data position)
and checkpoints it with :class:`TrainCheckpointer` (orbax's
``CheckpointManager``: every N steps, asynchronous, last K and best kept)::

  ckpt = TrainCheckpointer(run_dir, every=100, keep=3, best="loss")
  state = ckpt.resume(init_state(adapter, optimizer, rng=key))   # or the last checkpoint
  step = make_state_step(loss_fn, optimizer)
  while state.step < total:
    state, metrics = step(state, base, batch_at(state.data_position))
    ckpt.save(state, metrics)
  ckpt.close()

Every step checks its loss and gradients: a NaN or Inf skips the update and is
counted (``nonfinite="skip"``, the default), or stops the run naming the step
and the leaf (``"raise"``).

What is trained can also be a part of the first argument, chosen by path
(``trainable=``, see :mod:`jlora.methods.select`): the full model
(``"all"``), its biases (BitFit, ``"biases"``), an adapter plus the norm
scales (``{"adapter": ad, "params": p}`` with ``["adapter", "norms"]``)::

  opt_state = init_train_state(params, optimizer, trainable="biases")
  step = make_train_step(loss_fn, optimizer, trainable="biases")  # loss_fn(params, None, ...)
  params, opt_state, metrics = step(params, opt_state, None, batch)

Only the selected leaves are differentiated and have optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import paths
from jlora.checkpoint.training import TrainCheckpointer
from jlora.errors import ConfigError, NonFiniteError
from jlora.lora import LoRA

NONFINITE = ("skip", "raise", "apply")
"""What a step does with a NaN/Inf loss or gradient, see :func:`make_train_step`."""

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


def init_train_state(adapter: Any, optimizer: optax.GradientTransformation, *,
                     trainable=None) -> Any:
  """The optimizer state for training ``adapter``: ``optimizer.init(adapter)``.

  With ``trainable`` (a selection, see :mod:`jlora.methods.select`) only the
  selected part of ``adapter`` (which may then be the whole model) gets state.
  Checks first that every trained array is floating point (only those can be
  trained); raises a TypeError naming the first path that is not.

  Example:
    >>> ad = {"d": {"kernel": LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))}}
    >>> state = init_train_state(ad, make_optimizer(1e-3))
    >>> params = {"d": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
    >>> mu = init_train_state(params, make_optimizer(1e-3), trainable="biases")[0].mu
    >>> mu["d"]["kernel"] is None, mu["d"]["bias"].shape
    (True, (6,))
  """
  if trainable is not None:
    from jlora.methods import select
    adapter = select.split(adapter, trainable)[0]
  for path, x in paths.flatten(adapter, is_leaf=None).items():
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"init_train_state: the trainable tree has a {type(x).__name__} "
                      f"of dtype {dtype} at {path!r}; only floating-point arrays can be "
                      "trained (pass the adapter, not the base parameters)")
  return optimizer.init(adapter)


def make_train_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, jit: bool = True,
                    nonfinite: str = "skip", trainable=None):
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
    nonfinite: when the loss or any gradient holds a NaN or Inf (or a leaf's
      sum of squares overflows float32, |g| beyond about 1e19): "skip" leaves
      adapter and optimizer state as they were (``metrics["skipped"]`` is 1);
      "raise" does the same and then raises :class:`jlora.NonFiniteError`
      naming the step and the first offending leaf (it waits for each step's
      result); "apply" applies the update anyway (no check).
    trainable: None to train all of the first argument; or a selection of
      its leaves by path (``"all"``, ``"biases"``, ``"norms"``, a regex, a
      list of names, a function; see :mod:`jlora.methods.select`). Then the
      first argument is split into the selected tree, which alone is
      differentiated and stepped (``opt_state`` from ``init_train_state(...,
      trainable=)``), and the rest, a constant joined back for ``loss_fn``
      and returned unchanged.

  Returns:
    The step function. ``metrics`` holds "loss", "grad_norm" (global norm of
    this call's adapter gradient), "skipped" (0 or 1, unless "apply") and,
    with ``has_aux``, "aux".

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
    >>> int(m["skipped"])
    0
  """
  core = _core_step(loss_fn, optimizer, has_aux, nonfinite, trainable)

  def step(adapter, opt_state, base, batch, rng=None):
    adapter, opt_state, metrics = core(adapter, opt_state, base, batch, rng)
    return adapter, opt_state, metrics

  compiled = jax.jit(step, donate_argnums=(0, 1) if donate else ()) if jit else step
  if nonfinite != "raise":
    return compiled
  calls = [0]

  def checked(adapter, opt_state, base, batch, rng=None):
    calls[0] += 1
    adapter, opt_state, metrics = compiled(adapter, opt_state, base, batch, rng)
    trained = adapter if trainable is None else _select().split(adapter, trainable)[0]
    _raise_if_skipped(metrics, trained, calls[0], (adapter, opt_state))
    return adapter, opt_state, metrics
  return checked


def _select():
  from jlora.methods import select   # (jlora.methods sits above train; imported when used)
  return select


def _core_step(loss_fn, optimizer, has_aux: bool, nonfinite: str, trainable=None):
  """The update with the non-finite guard; returns ``(adapter, opt_state, metrics)``.

  With ``trainable`` the first argument is split by path: only the selected
  part is differentiated and stepped, the rest joined back unchanged."""
  if nonfinite not in NONFINITE:
    raise ConfigError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
  if trainable is None:
    split = lambda tree: (tree, None)          # noqa: E731
    join = lambda part, frozen: part           # noqa: E731
  else:
    split = lambda tree: _select().split(tree, trainable)   # noqa: E731
    join = _select().join

  def core(tree, opt_state, base, batch, rng):
    adapter, frozen = split(tree)
    fn = lambda part: loss_fn(join(part, frozen), base, batch, rng)   # noqa: E731
    out, grads = jax.value_and_grad(fn, has_aux=has_aux)(adapter)
    loss, aux = out if has_aux else (out, None)
    updates, new_opt = optimizer.update(grads, opt_state, adapter)
    new_adapter = optax.apply_updates(adapter, updates)
    # one reduction per leaf serves both the norm and the guard: a NaN or Inf
    # anywhere in a leaf makes its sum of squares non-finite
    squares = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]
    metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(squares, jnp.float32(0)))}
    if nonfinite != "apply":
      finite = jnp.isfinite(jnp.stack([jnp.asarray(loss, jnp.float32)] + squares))
      ok = jnp.all(finite)
      keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
      new_adapter = jax.tree.map(keep, new_adapter, adapter)
      new_opt = jax.tree.map(keep, new_opt, opt_state)
      metrics["skipped"] = (~ok).astype(jnp.int32)
      if nonfinite == "raise":
        metrics["finite"] = finite
    if has_aux:
      metrics["aux"] = aux
    return join(new_adapter, frozen), new_opt, metrics
  return core


def _raise_if_skipped(metrics: dict, adapter, step: int, state) -> None:
  """Pops ``metrics["finite"]``; raises NonFiniteError naming the first bad leaf."""
  finite = np.asarray(metrics.pop("finite"))
  if finite.all():
    return
  names = ["loss"] + [paths.path_str(kp) for kp, _ in
                      jax.tree_util.tree_flatten_with_path(adapter)[0]]
  bad = names[int(np.argmin(finite))]
  what = "loss" if bad == "loss" else f"gradient of {bad!r}"
  raise NonFiniteError(f"step {step}: the {what} is not finite (NaN or Inf); the update was not "
                       "applied (the error's .state holds the state to continue from)",
                       step=step, path=bad, state=state)


# ------------------------------------------------------------------ resumable runs

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: int32 ``[]``, optimizer steps taken (calls of the state step).
    adapter: the trained tree (an adapter, or any tree of float arrays).
    opt_state: the optimizer's state (any optax optimizer).
    rng: a PRNG key (or None); step ``i`` uses ``jax.random.fold_in(rng, i)``.
    data_position: int32 ``[]``, batches consumed; pick batch ``i`` from it.
    skipped: int32 ``[]``, updates skipped for a NaN/Inf loss or gradient.
  """
  step: jax.Array
  adapter: Any
  opt_state: Any
  rng: jax.Array | None
  data_position: jax.Array
  skipped: jax.Array

  def replace(self, **kw) -> "TrainState":
    return dataclasses.replace(self, **kw)


def init_state(adapter: Any, optimizer: optax.GradientTransformation, rng=None, *,
               data_position: int = 0, trainable=None) -> TrainState:
  """A :class:`TrainState` at step 0: ``init_train_state(adapter, optimizer)`` and ``rng``.

  ``trainable`` selects the trained part of ``adapter`` by path, as in
  :func:`init_train_state` (give :func:`make_state_step` the same).

  Example:
    >>> ad = {"d": {"kernel": LoRA(a=jnp.ones((4, 2)), b=jnp.zeros((2, 6)))}}
    >>> state = init_state(ad, make_optimizer(1e-3), rng=jax.random.key(0))
    >>> int(state.step), int(state.data_position)
    (0, 0)
  """
  zero = lambda v=0: jnp.asarray(v, jnp.int32)  # noqa: E731
  return TrainState(step=zero(), adapter=adapter,
                    opt_state=init_train_state(adapter, optimizer, trainable=trainable),
                    rng=rng, data_position=zero(data_position), skipped=zero())


def make_state_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                    has_aux: bool = False, donate: bool = True, jit: bool = True,
                    nonfinite: str = "skip", trainable=None):
  """:func:`make_train_step` over a :class:`TrainState`: ``step(state, base, batch) -> (state, metrics)``.

  Each call takes one optimizer step with ``rng = fold_in(state.rng, state.step)``
  (None without a key), then advances ``step`` and ``data_position`` by one and
  ``skipped`` by ``metrics["skipped"]``. A run resumed from a checkpoint of
  this state, fed the same batches by ``data_position``, repeats the
  uninterrupted run bit for bit. Arguments as :func:`make_train_step`.

  Example:
    >>> def loss_fn(ad, base, batch, rng):
    ...   return jnp.mean((batch @ ad["w"] - 1.0) ** 2)
    >>> opt = make_optimizer(1e-2)
    >>> step = make_state_step(loss_fn, opt)
    >>> state = init_state({"w": jnp.ones((4, 2))}, opt)
    >>> state, m = step(state, None, jnp.ones((3, 4)))
    >>> int(state.step), int(state.data_position), int(state.skipped)
    (1, 1, 0)
  """
  core = _core_step(loss_fn, optimizer, has_aux, nonfinite, trainable)

  def step(state: TrainState, base, batch):
    rng = None if state.rng is None else jax.random.fold_in(state.rng, state.step)
    adapter, opt_state, metrics = core(state.adapter, state.opt_state, base, batch, rng)
    skipped = metrics.get("skipped", jnp.zeros((), jnp.int32))
    return state.replace(step=state.step + 1, adapter=adapter, opt_state=opt_state,
                         data_position=state.data_position + 1,
                         skipped=state.skipped + skipped), metrics

  compiled = jax.jit(step, donate_argnums=(0,) if donate else ()) if jit else step
  if nonfinite != "raise":
    return compiled

  def checked(state: TrainState, base, batch):
    new, metrics = compiled(state, base, batch)
    trained = new.adapter if trainable is None else _select().split(new.adapter, trainable)[0]
    _raise_if_skipped(metrics, trained, int(new.step) - 1, new)
    return new, metrics
  return checked


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


def chunked_lm_loss(head: Callable[[jax.Array], jax.Array], hidden: jax.Array,
                    targets: jax.Array, mask: jax.Array | None = None, *,
                    chunk: int = 512) -> jax.Array:
  """:func:`lm_loss` of ``head(hidden)`` without ever holding the full logits.

  The sequence is cut into chunks of ``chunk`` positions; each chunk's logits
  are made by ``head``, turned into its cross-entropy (in float32) and
  dropped, inside ``jax.checkpoint``, so the backward pass makes them again
  instead of keeping ``[batch, seq, vocab]`` float32 logits and their
  gradient (at a 128k vocabulary that is most of a step's memory).

  Args:
    head: ``[batch, c, hidden] -> [batch, c, vocab]``, e.g.
      ``lambda h: jlora.models.head_logits(config, params, h)``.
    hidden: ``[batch, seq, hidden]``, aligned with ``targets`` (shift first).
    targets: ``[batch, seq]`` integer ids.
    mask: optional ``[batch, seq]`` weights (bool or 0/1).
    chunk: positions per chunk (the last chunk is padded and masked).

  Returns:
    The mean cross-entropy over the masked-in tokens (float32).

  Example:
    >>> w = jax.random.normal(jax.random.key(0), (8, 50))
    >>> h = jax.random.normal(jax.random.key(1), (2, 7, 8))
    >>> t = jnp.arange(14).reshape(2, 7) % 50
    >>> a = chunked_lm_loss(lambda x: x @ w, h, t, chunk=3)
    >>> bool(jnp.allclose(a, lm_loss(h @ w, t), rtol=1e-5))
    True
  """
  b, t = targets.shape
  if tuple(hidden.shape[:2]) != (b, t):
    raise ValueError(f"chunked_lm_loss: hidden {list(hidden.shape)} must lead with targets' "
                     f"shape {[b, t]}")
  w = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    w = jnp.pad(w, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(h, tg, wt):
    logits = head(h).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tg)
    return jnp.sum(ce * wt)

  def body(total, xs):
    return total + one(*xs), None
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), split(targets),
                                                             split(w)))
  return total / jnp.maximum(jnp.sum(w), 1.0)
