"""Checkpoints of a whole training run, through orbax's ``CheckpointManager``.

orbax provides what a preemptible run needs, and is used as it is: a step is
written into a temporary directory and renamed into place only once complete
(a killed save leaves no step behind, and the next manager removes its
temporary files), saves are asynchronous (the step returns once the arrays
are copied to host memory), old steps are deleted by a preservation policy,
any pytree of arrays (any optax state, typed PRNG keys) is stored, restoring
onto other shardings reshards, and every host writes its own shards.

jlora adds: a path orbax can use whatever its characters
(:func:`jlora.checkpoint.files.orbax_path`), "the last K and the best by a
metric" as one policy, the run's metric history saved with each step (so a
resumed run's loss curve is complete), and errors that name the directory.

Layout: ``<directory>/<step>/{state, history, metrics, _CHECKPOINT_METADATA}``.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from jlora.checkpoint import files
from jlora.errors import CheckpointError, ConfigError, short


def _shape_dtype(x, sharding):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return x
  if sharding is None:
    sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class TrainCheckpointer:
  """Saves a training state every ``every`` steps, keeps the last ``keep`` and the best.

  ``state`` is any pytree with an integer ``step`` attribute or key, e.g.
  :class:`jlora.train.TrainState`. Saves are asynchronous unless
  ``async_save=False``; :meth:`close` (or leaving a ``with`` block) waits for
  the last one.

  Args:
    directory: the run's directory (created), on a local or shared file system.
    every: save when ``step % every == 0`` (:meth:`save` with ``force=True``
      saves any step).
    keep: how many of the latest checkpoints to keep.
    best: a metric name (e.g. "loss"): also keep the checkpoint with the best
      value of it; ``best_step`` names it.
    mode: "min" or "max", what "best" means.
    async_save: write in a background thread.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> run = tempfile.mkdtemp()
    >>> with TrainCheckpointer(run, every=2, keep=1, best="loss") as ckpt:
    ...   for step, loss in [(2, 0.5), (4, 0.9), (6, 0.7)]:
    ...     _ = ckpt.save({"step": step, "w": jnp.full(3, step)}, {"loss": loss})
    >>> ckpt = TrainCheckpointer(run, every=2, keep=1, best="loss")
    >>> ckpt.steps, ckpt.best_step
    ([2, 6], 2)
    >>> int(ckpt.resume({"step": 0, "w": jnp.zeros(3, jnp.int32)})["w"][0])
    6
    >>> ckpt.close()
  """

  def __init__(self, directory, *, every: int = 100, keep: int = 3, best: str | None = None,
               mode: str = "min", async_save: bool = True):
    import orbax.checkpoint as ocp
    for name, v in (("every", every), ("keep", keep)):
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"TrainCheckpointer: {name} must be an int >= 1, got {short(v, 40)}")
    if mode not in ("min", "max"):
      raise ConfigError(f"TrainCheckpointer: mode must be 'min' or 'max', got {short(mode, 40)}")
    self.directory = files.local_path(directory)
    self.best_metric, self.mode, self.every = best, mode, every
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as err:
      raise CheckpointError(f"cannot create the run directory {short(self.directory)}: "
                            f"{err.strerror}") from None
    self._exit = contextlib.ExitStack()
    where = self._exit.enter_context(files.orbax_path(self.directory))
    cm = ocp.checkpoint_managers
    policies = [cm.LatestN(n=keep)]
    if best is not None:
      policies.append(cm.BestN(get_metric_fn=self._score, reverse=(mode == "min"), n=1))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, preservation_policy=cm.AnyPreservationPolicy(policies),
        best_fn=self._score if best is not None else None, best_mode=mode,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(where, options=options)
    self._history: dict[str, list] = {}
    self._pending: list[tuple[int, dict]] = []

  def _score(self, metrics) -> float:
    v = float(metrics[self.best_metric])
    if math.isnan(v):   # a NaN is never the best
      return math.inf if self.mode == "min" else -math.inf
    return v

  # ------------------------------------------------------------------ saving

  def save(self, state: Any, metrics: dict | None = None, *, force: bool = False) -> bool:
    """Records ``metrics`` of this step and saves ``state`` if the step is due.

    Returns whether a checkpoint was started. ``metrics`` (scalars, device
    arrays are fine) go into :attr:`history` and with the next checkpoint;
    they are fetched from the device only when a checkpoint is written.
    """
    step = _step_of(state)
    if metrics is not None:
      self._pending.append((step, {k: v for k, v in metrics.items() if np.ndim(v) == 0}))
    if not (force or self._manager.should_save(step)):
      return False
    history = self.history   # a copy: the asynchronous write must not see later steps
    args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state),
                                    history=self._ocp.args.JsonSave(history))
    last = {k: v[-1] for k, v in history.items() if k != "step" and v and history["step"][-1] == step}
    if self.best_metric is not None and self.best_metric not in last:
      raise CheckpointError(f"TrainCheckpointer: best={self.best_metric!r} but the metrics "
                            f"given to save() have only {sorted(last)}")
    try:
      return bool(self._manager.save(step, args=args, metrics=last or None, force=force))
    except Exception as err:  # noqa: BLE001 (orbax raises many kinds)
      raise CheckpointError(f"saving step {step} to {short(self.directory)} failed: "
                            f"{short(str(err), 300)}") from None

  @property
  def history(self) -> dict[str, list]:
    """The run's scalar metrics so far: ``{"step": [...], "loss": [...], ...}`` (a copy).

    Restored with a checkpoint, so after a resume it holds the steps before
    it too; steps redone after a crash appear once. A checkpointer that has
    recorded nothing yet reads it from the latest checkpoint.
    """
    if not self._history and not self._pending and self.latest_step is not None:
      try:
        out = self._manager.restore(self.latest_step, args=self._ocp.args.Composite(
            history=self._ocp.args.JsonRestore()))
      except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read the history of step {self.latest_step} in "
                              f"{short(self.directory)}: {short(str(err), 300)}") from None
      self._history = {k: list(v) for k, v in (out["history"] or {}).items()}
    if self._pending:
      values = jax.device_get([m for _, m in self._pending])
      for (step, _), m in zip(self._pending, values):
        self._history.setdefault("step", []).append(int(step))
        for k, v in m.items():
          self._history.setdefault(k, []).append(float(np.asarray(v)))
      self._pending.clear()
    return {k: list(v) for k, v in self._history.items()}

  # ------------------------------------------------------------------ restoring

  @property
  def steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  @property
  def latest_step(self) -> int | None:
    steps = self.steps
    return steps[-1] if steps else None

  @property
  def best_step(self) -> int | None:
    """The kept step with the best ``best`` metric (None without ``best`` or checkpoints)."""
    if self.best_metric is None:
      return None
    self._manager.reload()
    return self._manager.best_step()

  def restore(self, like: Any, step: int | None = None, *,
              shardings: Any | Callable[[str], Any] = None) -> Any:
    """The state saved at ``step`` (default: the latest), shaped like ``like``.

    ``like`` is a state of the same structure (arrays or ``ShapeDtypeStruct``,
    e.g. from ``jax.eval_shape``); arrays come back with ``like``'s shardings,
    or ``shardings`` (a pytree of them, one for all, or ``path -> Sharding``),
    so a run may continue on another mesh. Restores :attr:`history` too.
    """
    from jlora import paths
    step = self.latest_step if step is None else step
    if step is None or step not in self.steps:
      raise CheckpointError(f"no complete checkpoint of step {step} in "
                            f"{short(self.directory)} (it has {self.steps})")
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
      flat = jax.tree_util.tree_flatten_with_path(like)[0]
      treedef = jax.tree.structure(like)
      abstract = jax.tree.unflatten(treedef, [_shape_dtype(x, shardings(paths.path_str(kp)))
                                              for kp, x in flat])
    elif shardings is None or isinstance(shardings, jax.sharding.Sharding):
      abstract = jax.tree.map(lambda x: _shape_dtype(x, shardings), like)
    else:
      abstract = jax.tree.map(_shape_dtype, like, shardings)
    args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract),
                                    history=self._ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except Exception as err:  # noqa: BLE001
      raise CheckpointError(f"cannot restore step {step} from {short(self.directory)}: "
                            f"{short(str(err), 300)}") from None
    state = out["state"]
    if _step_of(state) != step:
      raise CheckpointError(f"checkpoint {step} in {short(self.directory)} holds a state of "
                            f"step {_step_of(state)}")
    self._history = {k: list(v) for k, v in (out["history"] or {}).items()}
    self._pending.clear()
    return state

  def resume(self, state: Any, *, shardings: Any = None) -> Any:
    """The latest complete checkpoint shaped like ``state``, or ``state`` itself if none.

    This is the resume path of a run: call it once before the loop.
    """
    if self.latest_step is None:
      self._history, self._pending = {}, []
      return state
    return self.restore(state, shardings=shardings)

  # ------------------------------------------------------------------ lifetime

  def wait(self) -> None:
    """Blocks until the asynchronous save in flight (if any) is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and releases orbax's threads."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    finally:
      self._exit.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _step_of(state: Any) -> int:
  step = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
  if step is None:
    raise CheckpointError("TrainCheckpointer: the state has no 'step'")
  return int(np.asarray(jax.device_get(step)))
