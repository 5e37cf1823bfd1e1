"""Device meshes, logical-axis rules, and placing host data on a mesh."""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


MESH_AXES = ("data", "fsdp", "tensor")
"""The mesh axis names :func:`make_mesh` creates, outermost first."""

STAGE_AXIS = "stage"
"""The pipeline mesh axis: ``make_mesh(stage=S)`` puts it outermost, before :data:`MESH_AXES`."""


DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("layers", "stage"),
    ("head_dim", None),
    ("length", None),
)
"""Logical axis -> mesh axis rules (first rule whose mesh axes are free wins).

Data parallelism splits the batch over ``data`` and ``fsdp``; FSDP splits the
model dimension ``embed`` of every weight over ``fsdp``; tensor parallelism
(Megatron style) splits ``heads``/``kv_heads``/``mlp``/``vocab`` over
``tensor``. Activations ``[batch, length, embed]`` keep ``embed`` whole
because ``fsdp`` is already taken by ``batch``. A stacked layer axis
(``nn.scan``'s ``layers``) is split over ``stage`` when the mesh has that
axis (pipeline parallelism, :mod:`jlora.sharding.pipeline`); on a mesh
without it, it is replicated.
"""


def pipeline_rules(rules=None) -> tuple[tuple[str, Any], ...]:
  """``rules`` with ``stage`` added in front of the ``batch`` rule's mesh axes.

  For a pipelined step: the parts of the model outside the pipelined layer
  stack (embedding, final norm, head, loss) then run data-parallel over the
  stages too, instead of repeated on every stage. Inside the pipeline the
  stages strip ``stage`` from the rules again.

  Example:
    >>> dict(pipeline_rules())["batch"]
    ('stage', 'data', 'fsdp')
  """
  out = []
  for name, axes in (DEFAULT_RULES if rules is None else rules):
    if name == "batch":
      axes = (STAGE_AXIS,) + tuple(a for a in _names(axes) if a != STAGE_AXIS)
    out.append((name, axes))
  return tuple(out)


def without_axis(rules, axis: str) -> tuple[tuple[str, Any], ...]:
  """``rules`` with the mesh axis ``axis`` removed from every rule (a rule left empty maps to None).

  Example:
    >>> dict(without_axis(pipeline_rules(), "stage"))["batch"]
    ('data', 'fsdp')
  """
  out = []
  for name, axes in rules:
    kept = tuple(a for a in _names(axes) if a != axis)
    out.append((name, None if not kept else kept[0] if isinstance(axes, str) else kept))
  return tuple(out)


def _names(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def make_mesh(*, data: int = -1, fsdp: int = 1, tensor: int = 1, stage: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all, every host).

  One size may be -1: it takes the devices the others leave. Devices are laid
  out by ``mesh_utils.create_device_mesh`` (topology-aware on TPU/GPU), so
  ``tensor`` (innermost) lands on the closest devices. With ``stage`` the
  mesh gets a fourth, outermost axis ``"stage"`` for pipeline parallelism
  (:mod:`jlora.sharding.pipeline`): stages exchange only one microbatch's
  activations at a time, so they may sit on the slowest links.

  Args:
    data / fsdp / tensor: axis sizes; their product must be the device count.
    stage: number of pipeline stages (may also be -1), or None for no stage axis.
    devices: the devices to use (``jax.devices()``, i.e. all processes', by default).

  Returns:
    A ``jax.sharding.Mesh`` of shape ``[data, fsdp, tensor]`` (``[stage, data,
    fsdp, tensor]`` with ``stage``) with Auto axes.

  Example:
    >>> mesh = make_mesh(fsdp=2, tensor=4)      # on 8 devices: data = 1
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 2, 'tensor': 4}
    >>> dict(make_mesh(stage=2, fsdp=2, tensor=2).shape)
    {'stage': 2, 'data': 1, 'fsdp': 2, 'tensor': 2}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(data=data, fsdp=fsdp, tensor=tensor)
  names = MESH_AXES
  if stage is not None:
    sizes = dict(stage=stage, **sizes)
    names = (STAGE_AXIS,) + MESH_AXES
  for name, s in sizes.items():
    if not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1):
      raise ValueError(f"make_mesh: {name}={s!r} must be a positive int or -1")
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"make_mesh: {len(devices)} devices do not split into {sizes}")
    sizes[free[0]] = len(devices) // fixed
  shape = tuple(sizes[n] for n in names)
  if math.prod(shape) != len(devices):
    raise ValueError(f"make_mesh: axis sizes {sizes} need {math.prod(shape)} devices, "
                     f"but {len(devices)} are given")
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, names)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """``spec`` with every dimension that its mesh axes don't divide evenly replicated.

  Also pads ``spec`` to ``len(shape)`` and drops mesh axes the mesh lacks.

  Example:
    >>> mesh = make_mesh(tensor=8)
    >>> fit_spec(P("tensor", None), (12, 16), mesh)    # 12 % 8 != 0
    P(None, None)
  """
  if len(spec) > len(shape):
    raise ValueError(f"PartitionSpec {spec} has {len(spec)} entries for an array of shape "
                     f"{list(shape)}")
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is not None:
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      if any(a not in mesh.shape for a in names) or dim % _axis_size(mesh, names):
        axes = None
    out.append(axes)
  return P(*out)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules=None) -> P:
  """Mesh ``PartitionSpec`` for an array of ``shape`` whose axes are ``names``.

  Example:
    >>> logical_spec(("embed", "mlp"), (64, 256), make_mesh(fsdp=2, tensor=4))
    P('fsdp', 'tensor')
  """
  spec = nn.logical_to_mesh_axes(tuple(names), DEFAULT_RULES if rules is None else rules)
  return fit_spec(spec, shape, mesh)


def param_shardings(params: Any, mesh: Mesh, rules=None) -> Any:
  """``NamedSharding`` for every parameter, read from its logical axis names.

  Args:
    params: the boxed parameter tree, e.g. ``jax.eval_shape(model.init, key,
      x)["params"]`` (no memory spent): leaves ``nn.LogicallyPartitioned``
      get their names mapped by ``rules``; ``nn.Partitioned`` leaves name mesh
      axes directly; plain arrays are replicated.
    mesh: the device mesh (:func:`make_mesh`).
    rules: logical -> mesh axis rules (:data:`DEFAULT_RULES` by default).

  Returns:
    The unboxed tree with a ``NamedSharding`` at every leaf; dimensions that
    don't divide evenly are replicated.

  Example:
    >>> box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 256), "float32"),
    ...                               names=("embed", "mlp"))
    >>> param_shardings({"w": box}, make_mesh(fsdp=2, tensor=4))["w"].spec
    P('fsdp', 'tensor')
  """
  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_spec(x.names, x.value.shape, mesh, rules))
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, fit_spec(P(*x.names), x.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, params, is_leaf=_is_box)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a tree of host values onto the mesh with ``shardings`` (one host or many).

  Each leaf is given to every process in full (the same value everywhere,
  e.g. from the same seed or file); each process copies only the shards its
  own devices hold (``jax.make_array_from_callback``), so this works across
  hosts where a plain ``jax.device_put`` of a global value may not. For
  models too large for one host's memory, initialise under
  ``jax.jit(init, out_shardings=...)`` or restore sharded instead.

  Args:
    tree: arrays (jax or NumPy); may hold LoRA / QArray nodes.
    shardings: a tree of ``NamedSharding``s of the same structure.

  Example:
    >>> mesh = make_mesh(tensor=8)
    >>> x = place({"w": np.ones((4, 16))}, {"w": NamedSharding(mesh, P(None, "tensor"))})
    >>> x["w"].sharding.spec
    P(None, 'tensor')
  """
  def one(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` input: the batch over the "batch" rule's mesh axes.

  Example:
    >>> batch_sharding(make_mesh(data=2, fsdp=2, tensor=2)).spec
    P(('data', 'fsdp'), None)
  """
  return NamedSharding(mesh, _batch_spec(rules, ndim))


def _batch_spec(rules, ndim: int) -> P:
  names = ("batch",) + (None,) * (ndim - 1)
  return nn.logical_to_mesh_axes(names, DEFAULT_RULES if rules is None else rules)


def shard_batch(batch: Any, mesh: Mesh, rules=None) -> Any:
  """Places a batch of host arrays ``[local_batch, ...]`` onto the mesh, batch-sharded.

  Each process passes only its own rows (``jax.make_array_from_process_local_data``),
  so the same code runs on one host and on many; the global batch is the
  processes' rows in process order.

  Example:
    >>> x = shard_batch(np.ones((8, 16), np.int32), make_mesh(data=8))
    >>> x.sharding.spec
    P(('data', 'fsdp'), None)
  """
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)
  return jax.tree.map(one, batch)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh, rules=None) -> jax.Array:
  """``with_sharding_constraint`` by logical axis names (under ``jit``).

  Example:
    >>> mesh = make_mesh(data=2, fsdp=2, tensor=2)
    >>> y = jax.jit(lambda x: constrain(x, ("batch", "vocab"), mesh))(jnp.ones((8, 32)))
    >>> y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), 2)
    True
  """
  spec = logical_spec(names, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
