"""Pipeline parallelism: a layer stack split into stages over the ``stage`` mesh axis.

A stack of ``L`` layers whose parameters carry a leading ``[L]`` axis (what
``nn.scan`` makes, the logical axis ``layers``) is split over the mesh axis
``stage`` of size ``S``: stage ``s`` holds layers ``[s·L/S, (s+1)·L/S)``, which
is exactly the ``NamedSharding`` that :data:`~jlora.sharding.DEFAULT_RULES`
gives a ``layers`` axis on a mesh with a stage axis, so nothing is moved to
set it up. The batch ``[B, ...]`` is cut into ``M`` microbatches of
``B/M`` rows; microbatch ``m`` holds rows ``m, m + M, m + 2M, ...``, a strided
split that leaves every microbatch spread over the data/fsdp devices as the
batch is (no data moves to form it).

Everything runs in one ``jax.shard_map`` that is manual over ``stage`` only:
the data, fsdp and tensor axes stay automatic, so the layers inside shard
over them exactly as they do without a pipeline. Stages hand activations to
their neighbour with ``jax.lax.ppermute``; one *tick* is one stage-sized step
of every stage at once. Two schedules:

* ``"gpipe"``: a ``lax.scan`` over ``M + S - 1`` ticks in which stage ``s``
  runs microbatch ``t - s`` forward; the backward pass is the scan's
  derivative (``jax.grad`` through ``shard_map`` and ``ppermute``): the same
  ticks in reverse. Activations of all ``M`` microbatches are kept.
* ``"1f1b"``: one forward and one backward slot per tick, stage ``s`` running
  microbatch ``t - s`` forward and microbatch ``t - 2S + 2 + s`` backward
  (the last stage turns a microbatch around in the tick it finishes it), for
  ``M + 2S - 2`` ticks; an idle slot is skipped (``lax.cond``). Each stage
  keeps only the inputs of the at most ``2S - 1`` microbatches it has
  started and not finished, and recomputes a stage's forward in its backward
  slot. The loss and head run per microbatch on the last stage.

Both leave each stage idle for ``S - 1`` of every ``M + S - 1`` stage-steps of
forward (and of backward) work: the bubble fraction ``(S - 1) / (M + S - 1)``
(:func:`bubble_fraction`; :func:`schedule_table` lays the ticks out and the
tests count them in the compiled step).

The functions here know nothing of a model: they take the function of one
stage and its stacked parameters. ``jlora.models.pipeline`` runs the reference
Llama this way without changing its code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jlora.errors import ConfigError
from jlora.sharding.mesh import STAGE_AXIS, without_axis
from jlora.sharding.mesh import make_mesh  # noqa: F401 (the docstring examples use it)

SCHEDULES = ("gpipe", "1f1b")
"""The microbatch schedules :class:`Pipeline` knows."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline:
  """How a layer stack is pipelined: microbatch count and schedule.

  The number of stages is the size of the mesh's ``axis`` (``make_mesh(stage=S)``).

  Attributes:
    microbatches: ``M``, the number of microbatches the batch is cut into
      (it must divide the batch). More microbatches, smaller bubble.
    schedule: "gpipe" (all forwards, then all backwards; keeps every
      microbatch's activations) or "1f1b" (one forward and one backward per
      tick; keeps at most ``2S - 1`` microbatch inputs per stage and
      recomputes a stage's forward in its backward).
    axis: the mesh axis of the stages.

  Example:
    >>> pipe = Pipeline(microbatches=4)
    >>> pipe.ticks(2), round(pipe.bubble_fraction(2), 3)     # (S-1)/(M+S-1) = 1/5
    (5, 0.2)
    >>> Pipeline(microbatches=4, schedule="1f1b").ticks(2)
    6
  """
  microbatches: int
  schedule: str = "gpipe"
  axis: str = STAGE_AXIS

  def __post_init__(self):
    m = self.microbatches
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
      raise ConfigError(f"Pipeline.microbatches must be a positive int, got {m!r}")
    if self.schedule not in SCHEDULES:
      raise ConfigError(f"Pipeline.schedule must be one of {SCHEDULES}, got {self.schedule!r}")

  def stages(self, mesh: Mesh) -> int:
    """``S``: the size of the mesh's stage axis (a ConfigError if it has none)."""
    if self.axis not in mesh.shape:
      raise ConfigError(f"the mesh has no {self.axis!r} axis to pipeline over (its axes are "
                        f"{tuple(mesh.axis_names)}); make it with make_mesh(stage=...)")
    return int(mesh.shape[self.axis])

  def ticks(self, stages: int) -> int:
    """Loop steps of the schedule: ``M + S - 1`` (gpipe, each way) or ``M + 2S - 2`` (1f1b)."""
    return ticks(self.schedule, stages, self.microbatches)

  def bubble_fraction(self, stages: int) -> float:
    """``(S - 1) / (M + S - 1)``: the share of each stage's time spent idle."""
    return bubble_fraction(self.schedule, stages, self.microbatches)

  def describe(self, stages: int) -> str:
    """One line for logs: schedule, stages, microbatches, ticks and bubble.

    Example:
      >>> Pipeline(microbatches=6).describe(3)
      'gpipe: 3 stages x 6 microbatches, 8 ticks each way, bubble (S-1)/(M+S-1) = 25.0%'
    """
    way = "each way" if self.schedule == "gpipe" else "(one forward + one backward slot each)"
    return (f"{self.schedule}: {stages} stages x {self.microbatches} microbatches, "
            f"{self.ticks(stages)} ticks {way}, bubble (S-1)/(M+S-1) = "
            f"{100 * self.bubble_fraction(stages):.1f}%")

  def check(self, stages: int, num_layers: int, batch: int) -> None:
    """Raises a ConfigError unless ``num_layers`` splits into the stages and ``batch`` into
    the microbatches.

    Example:
      >>> Pipeline(microbatches=4).check(stages=3, num_layers=4, batch=8)
      Traceback (most recent call last):
      ...
      jlora.errors.ConfigError: pipeline: 4 layers do not split into 3 stages ...
    """
    if num_layers % stages:
      raise ConfigError(f"pipeline: {num_layers} layers do not split into {stages} stages (the "
                        "layer count must be a multiple of the stage count)")
    if batch % self.microbatches:
      raise ConfigError(f"pipeline: a batch of {batch} rows does not split into "
                        f"{self.microbatches} microbatches")


def ticks(schedule: str, stages: int, microbatches: int) -> int:
  """Loop steps of a schedule (see :class:`Pipeline`)."""
  if schedule == "gpipe":
    return microbatches + stages - 1
  return microbatches + 2 * stages - 2


def bubble_fraction(schedule: str, stages: int, microbatches: int) -> float:
  """The schedule's idle share of each stage's time, ``(S - 1) / (M + S - 1)``.

  For "gpipe" each stage is busy ``M`` of the ``M + S - 1`` forward ticks and
  as many backward ticks. For "1f1b" a tick costs a forward if any stage runs
  one and a backward if any stage runs one; forwards occupy ``M + S - 1``
  ticks and backwards as many, so the same fraction holds (with each stage's
  forward recomputed once in its backward slot on top).

  Example:
    >>> bubble_fraction("gpipe", 4, 12)
    0.2
  """
  del schedule
  return (stages - 1) / (microbatches + stages - 1)


def forward_slot(t, stage, stages: int):
  """The microbatch stage ``stage`` runs forward at tick ``t`` (both schedules): ``t - stage``.

  Works on ints, NumPy and JAX arrays; a value outside ``[0, M)`` means idle.
  """
  del stages
  return t - stage


def backward_slot(t, stage, stages: int):
  """The microbatch stage ``stage`` runs backward at tick ``t`` under "1f1b":
  ``t - 2S + 2 + stage`` (the last stage: the one it ran forward this tick)."""
  return t - 2 * stages + 2 + stage


def schedule_table(schedule: str, stages: int, microbatches: int) -> dict[str, np.ndarray]:
  """The schedule laid out: ``{"forward": [ticks, S], "backward": [ticks, S]}`` microbatch ids.

  -1 marks an idle slot. For "gpipe" the backward table is the forward one
  run in reverse (the derivative of the forward scan). The loops of
  :func:`gpipe` and :func:`one_f_one_b` use the same slot functions.

  Example:
    >>> schedule_table("gpipe", 2, 3)["forward"].tolist()
    [[0, -1], [1, 0], [2, 1], [-1, 2]]
    >>> schedule_table("1f1b", 2, 2)["backward"].tolist()
    [[-1, -1], [-1, 0], [0, 1], [1, -1]]
  """
  n = ticks(schedule, stages, microbatches)
  t, s = np.meshgrid(np.arange(n), np.arange(stages), indexing="ij")
  idle = lambda m: np.where((m >= 0) & (m < microbatches), m, -1)  # noqa: E731
  fwd = idle(forward_slot(t, s, stages))
  if schedule == "gpipe":
    return {"forward": fwd, "backward": fwd[::-1].copy()}
  return {"forward": fwd, "backward": idle(backward_slot(t, s, stages))}


# ----------------------------------------------------------------------------- helpers

def _leading(tree) -> list[int]:
  return [x.shape[0] for x in jax.tree.leaves(tree)]


def _num_layers(layers) -> int:
  sizes = set(_leading(layers))
  if len(sizes) != 1:
    raise ConfigError(f"pipeline: every leaf of the layer stack must have the same leading "
                      f"[layers] axis, got leading sizes {sorted(sizes)}")
  return sizes.pop()


def _batch_size(x, rows) -> int:
  sizes = {a.shape[0] for a in jax.tree.leaves((x, rows))}
  if len(sizes) != 1:
    raise ConfigError(f"pipeline: the activations and per-row inputs must share the batch "
                      f"axis, got leading sizes {sorted(sizes)}")
  return sizes.pop()


def microbatch(tree, microbatches: int, axis: int = 0):
  """``[..., B, ...] -> [..., M, B/M, ...]`` at ``axis``: microbatch ``m`` is rows ``m, m+M, ...``.

  Example:
    >>> microbatch(jnp.arange(6), 3).tolist()
    [[0, 3], [1, 4], [2, 5]]
  """
  def one(x):
    b = x.shape[axis]
    x = x.reshape(x.shape[:axis] + (b // microbatches, microbatches) + x.shape[axis + 1:])
    return jnp.swapaxes(x, axis, axis + 1)
  return jax.tree.map(one, tree)


def unmicrobatch(tree, axis: int = 0):
  """The inverse of :func:`microbatch`: ``[..., M, B/M, ...] -> [..., B, ...]``.

  Example:
    >>> unmicrobatch(microbatch(jnp.arange(6), 3)).tolist()
    [0, 1, 2, 3, 4, 5]
  """
  def one(x):
    x = jnp.swapaxes(x, axis, axis + 1)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.tree.map(one, tree)


def _varying_axes(x) -> frozenset:
  """The manual axes ``x`` varies over (``aval.vma``; jax 0.10 keeps them elsewhere)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  return frozenset(vma)


def _vary(tree, axis: str):
  """Marks values as varying over ``axis`` (shard_map's type of a per-stage value)."""
  def one(x):
    if axis in _varying_axes(x):
      return x
    return jax.lax.pcast(x, axis, to="varying")
  return jax.tree.map(one, tree)


def _take(tree, i, axis: int = 0):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False), tree)


def _put(tree, values, i, axis: int = 0):
  return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, axis),
                      tree, values)


def _where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _send(tree, axis: str, stages: int, step: int):
  """Each stage's value to stage ``s + step`` (``step`` = +1 forward, -1 backward); the
  stage nothing is sent to gets zeros."""
  pairs = [(i, i + step) for i in range(stages) if 0 <= i + step < stages]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, pairs), tree)


def _manual_axes(mesh: Mesh, axis: str) -> frozenset:
  """The axes the pipeline's ``shard_map`` is manual over: the stage axis, and every axis of
  size 1 (nothing changes for those, and a fully manual region lowers custom calls such as
  cuDNN attention directly instead of through their partitioning rules)."""
  return frozenset({axis} | {a for a in mesh.axis_names if mesh.shape[a] == 1})


def _stage_rules(manual) -> tuple:
  """The logical-axis rules in force, minus the manual axes (for code inside stages)."""
  rules = nn.get_logical_axis_rules()
  for a in sorted(manual):
    rules = without_axis(rules, a)
  return rules


def _specs(tree, spec):
  return jax.tree.map(lambda _: spec, tree)


# ----------------------------------------------------------------------------- gpipe

def gpipe(stage_fn: Callable, layers: Any, x: jax.Array, rows: Any = None,
          layer_rows: Any = None, consts: Any = None, *, mesh: Mesh, pipeline: Pipeline,
          return_counts: bool = False):
  """Runs a layer stack pipelined (GPipe): the forward pass, differentiable by ``jax.grad``.

  ``stage_fn(chunk, x_mb, rows_mb, layer_rows_mb, consts) -> (y_mb, new_layer_rows_mb)``
  runs the ``n = L/S`` layers of one stage on one microbatch.

  Args:
    stage_fn: the function of one stage.
    layers: a pytree whose leaves all have a leading ``[L]`` axis (base layers,
      adapter layers, QArray codes and scales alike), split over the stages;
      ``stage_fn`` gets leaves ``[n, ...]``.
    x: ``[B, ...]`` the stack's input activations; ``y`` has the same shape.
    rows: a pytree of ``[B, ...]`` per-row inputs (positions, masks; None
      leaves allowed), cut into microbatches like ``x``.
    layer_rows: a pytree of ``[L, B, ...]`` per-layer, per-row state (a KV
      cache), split over the stages and microbatches and returned updated;
      or None.
    consts: a pytree passed to every call unchanged (replicated).
    mesh: the mesh with the pipeline axis; its other axes stay automatic.
    pipeline: the :class:`Pipeline` (schedule "gpipe" or "1f1b": the forward
      pass is the same).
    return_counts: also return the number of ticks in which each stage ran a
      real microbatch, ``[S]`` int32 (for checking the schedule).

  Returns:
    ``(y, new_layer_rows)`` (and the counts): ``y: [B, ...]`` split over the
    stages by rows when ``S`` divides ``B`` (else replicated).

  Example:
    >>> mesh = make_mesh(stage=4, data=2)
    >>> w = jnp.stack([jnp.eye(3) * (i + 1) for i in range(8)])       # 8 layers [8, 3, 3]
    >>> def stage_fn(chunk, x, rows, lrows, consts):                 # chunk: [2, 3, 3]
    ...   for i in range(chunk.shape[0]):
    ...     x = x @ chunk[i]
    ...   return x, lrows
    >>> y, _ = jax.jit(lambda w, x: gpipe(stage_fn, w, x, mesh=mesh,
    ...                                   pipeline=Pipeline(microbatches=4)))(w, jnp.ones((8, 3)))
    >>> float(y[0, 0])          # 1 · 2 · ... · 8
    40320.0
  """
  axis = pipeline.axis
  stages = pipeline.stages(mesh)
  num_layers = _num_layers(layers)
  batch = _batch_size(x, rows)
  pipeline.check(stages, num_layers, batch)
  mbs = pipeline.microbatches
  scatter = batch % stages == 0
  manual = _manual_axes(mesh, axis)
  rules = _stage_rules(manual)

  def inner(layers, x, rows, layer_rows, consts):
    s = jax.lax.axis_index(axis)
    xm, rows_m = microbatch(x, mbs), microbatch(rows, mbs)
    lrows_m = microbatch(layer_rows, mbs, axis=1)          # [n, M, mb, ...]

    def tick(carry, t):
      state, out, lrows, count = carry
      m = forward_slot(t, s, stages)
      valid = (m >= 0) & (m < mbs)
      mi = jnp.clip(m, 0, mbs - 1)
      inp = jnp.where(s == 0, _take(xm, mi), state)
      old = _take(lrows, mi, axis=1)
      with nn.logical_axis_rules(rules):
        y, new = stage_fn(layers, inp, _take(rows_m, mi), old, consts)
      lrows = _put(lrows, _where(valid, new, old), mi, axis=1)
      last = (s == stages - 1) & valid
      out = _put(out, jnp.where(last, y, _take(out, mi)), mi)
      return (_send(y, axis, stages, 1), out, lrows, count + valid.astype(jnp.int32)), None

    init = _vary((jnp.zeros_like(xm[0]), jnp.zeros_like(xm), lrows_m, jnp.zeros((), jnp.int32)),
                 axis)
    (_, out, lrows, count), _ = jax.lax.scan(tick, init, jnp.arange(ticks("gpipe", stages, mbs)))
    y = unmicrobatch(out)
    y = (jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True) if scatter
         else jax.lax.psum(y, axis))
    return y, unmicrobatch(lrows, axis=1), count[None]

  in_specs = (_specs(layers, P(axis)), P(), _specs(rows, P()), _specs(layer_rows, P(axis)),
              _specs(consts, P()))
  out_specs = (P(axis) if scatter else P(), _specs(layer_rows, P(axis)), P(axis))
  y, new_rows, counts = jax.shard_map(inner, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                      axis_names=manual)(layers, x, rows, layer_rows, consts)
  return (y, new_rows, counts) if return_counts else (y, new_rows)


# ----------------------------------------------------------------------------- 1f1b

def one_f_one_b(stage_fn: Callable, head_fn: Callable, layers: Any, trained: Any,
                head_params: Any, head_trained: Any, x: jax.Array, rows: Any = None,
                head_rows: Any = None, *, mesh: Mesh, pipeline: Pipeline,
                return_counts: bool = False):
  """The loss and its gradients of a pipelined stack under the 1F1B schedule.

  ``loss = mean over microbatches m of head_fn(head_params, head_trained,
  stack(x_m), head_rows_m)``, where ``stack`` is the ``L`` layers run by
  ``stage_fn(layers_chunk, trained_chunk, x_mb, rows_mb) -> y_mb``. Only
  ``trained``, ``head_trained`` and ``x`` are differentiated; the head and
  loss run per microbatch on the last stage, so a stage can run a
  microbatch's backward as soon as the stage after it has.

  Args:
    stage_fn: one stage's layers on one microbatch.
    head_fn: ``(head_params, head_trained, y_mb, head_rows_mb) -> scalar``.
    layers: the stack's fixed parameters, leaves ``[L, ...]`` (a quantized base).
    trained: the stack's trained parameters, leaves ``[L, ...]`` (its adapter).
    head_params / head_trained: the head's fixed and trained parameters (replicated).
    x: ``[B, ...]`` the stack's input; rows: ``[B, ...]`` per-row inputs of
      the stages; head_rows: ``[B, ...]`` per-row inputs of the head (targets).
    mesh / pipeline: as for :func:`gpipe`.
    return_counts: also return ``[S, 2]`` int32: per stage, the forward and
      the backward slots that ran a real microbatch.

  Returns:
    ``(loss, d_trained, d_head_trained, d_x)`` (and the counts).

  Example:
    >>> mesh = make_mesh(stage=2, data=4)
    >>> w = jnp.full((4, 3, 3), 0.5)                                # 4 layers
    >>> def stage_fn(chunk, ad, x, rows):
    ...   for i in range(chunk.shape[0]):
    ...     x = x @ (chunk[i] + ad[i])
    ...   return x
    >>> head = lambda hp, ht, y, t: jnp.mean((y * ht - t) ** 2)
    >>> pipe = Pipeline(microbatches=2, schedule="1f1b")
    >>> loss, d_ad, d_ht, d_x = jax.jit(lambda ad: one_f_one_b(
    ...     stage_fn, head, w, ad, None, jnp.float32(2.0), jnp.ones((8, 3)),
    ...     head_rows=jnp.zeros((8, 3)), mesh=mesh, pipeline=pipe))(jnp.zeros((4, 3, 3)))
    >>> float(loss), d_ad.shape               # y = 1.5⁴ = 5.0625 per entry, (2y)² = 102.5
    (102.515625, (4, 3, 3))
  """
  axis = pipeline.axis
  stages = pipeline.stages(mesh)
  num_layers = _num_layers((layers, trained))
  batch = _batch_size(x, (rows, head_rows))
  pipeline.check(stages, num_layers, batch)
  mbs = pipeline.microbatches
  slots = 2 * stages - 1            # microbatches a stage may hold between forward and backward
  # No logical activation constraints inside the 1F1B loop: XLA's SPMD partitioner (jax
  # 0.10) aborts on a model's ("batch", ...) constraint there when both a data-like and
  # the tensor axis are > 1. Sharding propagation from the microbatch and the weights
  # lays the activations out instead.
  rules = ()
  manual = _manual_axes(mesh, axis)

  def inner(layers, trained, head_params, head_trained, x, rows, head_rows):
    s = jax.lax.axis_index(axis)
    last = s == stages - 1
    xm, rows_m, hrows_m = microbatch(x, mbs), microbatch(rows, mbs), microbatch(head_rows, mbs)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    # differentiate a per-stage copy of the head's trained parameters: the gradient of the
    # replicated value itself would be summed over the stages inside the loop
    head_trained_here = _vary(head_trained, axis)

    def run_stage(tr, inp, r):
      with nn.logical_axis_rules(rules):
        return stage_fn(layers, tr, inp, r)

    def run_head(ht, y, hr):
      with nn.logical_axis_rules(rules):
        return head_fn(head_params, ht, y, hr)

    # Every stage runs both slots of a tick whenever any stage has work in them (idle
    # stages compute on zeros and their results are dropped): a stage in lockstep would
    # wait for the busy ones anyway, and every device then reaches every collective of
    # the layers (GSPMD's, over data/fsdp/tensor) inside the branch.
    def forward(args):            # a stage's forward, and on every stage the head's gradient
      inp, r, hr = args
      y = run_stage(trained, inp, r)
      loss, (d_ht, d_y) = jax.value_and_grad(run_head, argnums=(0, 1))(head_trained_here, y, hr)
      return _vary((y, loss / mbs, jax.tree.map(lambda d: d / mbs, d_ht), d_y / mbs), axis)

    def backward(args):           # recompute the stage's forward, then its vjp
      inp, r, dy = args
      _, vjp = jax.vjp(lambda tr, xx: run_stage(tr, xx, r), trained, inp)
      return _vary(vjp(dy), axis)

    def tick(carry, t):
      (recv_y, recv_dy, saved, d_tr, d_ht, loss, dx_out, head_dy, count) = carry
      # forward slot: stage s runs microbatch t - s
      mf = forward_slot(t, s, stages)
      f_ok = (mf >= 0) & (mf < mbs)
      fi = jnp.clip(mf, 0, mbs - 1)
      inp = jnp.where(f_ok, jnp.where(s == 0, _take(xm, fi), recv_y), 0)
      f_args = (inp, _take(rows_m, fi), _take(hrows_m, fi))
      f_zero = _vary((zeros(inp), jnp.zeros((), jnp.float32), zeros(head_trained), zeros(inp)),
                     axis)
      y, l_m, dht_m, dy_m = jax.lax.cond(t < mbs + stages - 1, forward, lambda a: f_zero,
                                         f_args)
      saved = _put(saved, jnp.where(f_ok, inp, _take(saved, fi % slots)), fi % slots)
      head_ok = f_ok & last
      loss = loss + jnp.where(head_ok, l_m, 0)
      d_ht = jax.tree.map(lambda acc, d: acc + jnp.where(head_ok, d, 0), d_ht, dht_m)
      head_dy = jnp.where(head_ok, dy_m, head_dy)
      # backward slot: stage s runs microbatch t - 2S + 2 + s
      mb = backward_slot(t, s, stages)
      b_ok = (mb >= 0) & (mb < mbs)
      bi = jnp.clip(mb, 0, mbs - 1)
      dy = jnp.where(b_ok, jnp.where(last, head_dy, recv_dy), 0)
      b_args = (_take(saved, bi % slots), _take(rows_m, bi), dy)
      b_zero = _vary((zeros(trained), zeros(inp)), axis)
      dtr_m, dx_m = jax.lax.cond(t >= stages - 1, backward, lambda a: b_zero, b_args)
      d_tr = jax.tree.map(lambda acc, d: acc + jnp.where(b_ok, d, 0), d_tr, dtr_m)
      dx_m = jnp.where(b_ok, dx_m, 0)
      dx_out = _put(dx_out, jnp.where(b_ok & (s == 0), dx_m, _take(dx_out, bi)), bi)
      count = count + jnp.stack([f_ok, b_ok]).astype(jnp.int32)
      return (_send(y, axis, stages, 1), _send(dx_m, axis, stages, -1), saved, d_tr, d_ht,
              loss, dx_out, head_dy, count), None

    mb0 = jnp.zeros_like(xm[0])
    init = _vary((mb0, mb0, jnp.zeros((slots,) + mb0.shape, mb0.dtype), zeros(trained),
                  zeros(head_trained), jnp.zeros((), jnp.float32), jnp.zeros_like(xm), mb0,
                  jnp.zeros((2,), jnp.int32)), axis)
    carry, _ = jax.lax.scan(tick, init, jnp.arange(ticks("1f1b", stages, mbs)))
    _, _, _, d_tr, d_ht, loss, dx_out, _, count = carry
    # only the last stage has a loss and head gradient, only the first an input gradient
    loss, d_ht, d_x = jax.lax.psum((loss, d_ht, unmicrobatch(dx_out)), axis)
    return loss, d_tr, d_ht, d_x, count[None]

  in_specs = (_specs(layers, P(axis)), _specs(trained, P(axis)), _specs(head_params, P()),
              _specs(head_trained, P()), P(), _specs(rows, P()), _specs(head_rows, P()))
  out_specs = (P(), _specs(trained, P(axis)), _specs(head_trained, P()), P(), P(axis))
  loss, d_tr, d_ht, d_x, counts = jax.shard_map(
      inner, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual)(
          layers, trained, head_params, head_trained, x, rows, head_rows)
  out = (loss, d_tr, d_ht, d_x)
  return out + (counts,) if return_counts else out
