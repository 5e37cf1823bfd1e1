"""Meshes, logical-axis rules, and shardings derived for adapters.

jlora shards the pjit way: every array gets a ``NamedSharding`` over a device
mesh with the axes ``("data", "fsdp", "tensor")``, and ``jax.jit`` (with
``in_shardings`` / ``out_shardings``) inserts the collectives. The base's
shardings come from the *logical* axis names its parameters carry
(``nn.with_logical_partitioning``, the MaxText/T5X style) mapped to mesh axes
by a rule table; an adapter's shardings are derived from its base kernel's:

  kernel W: [*stack, *kernel]   spec (s..., k_0, k_1, ...)
  a: [*stack, *in_dims, r]      spec (s..., k_i for i in in_axes, None)
  b: [*stack, r, *out_dims]     spec (s..., None, k_o for o in out_axes)
  magnitude: [*stack, *out_dims] spec (s..., k_o for o in out_axes)

so ``x @ a`` contracts over the same devices as ``x @ W`` and ``(x a) @ b``
comes out sharded like ``x @ W``; the rank axis is replicated.

A dimension that a mesh axis does not divide evenly is replicated instead
(``fit_spec``), so any rule table works for any model size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import lora as L
from jlora import paths

MESH_AXES = ("data", "fsdp", "tensor")
"""The mesh axis names :func:`make_mesh` creates, outermost first."""

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("layers", None),
    ("head_dim", None),
    ("length", None),
)
"""Logical axis -> mesh axis rules (first rule whose mesh axes are free wins).

Data parallelism splits the batch over ``data`` and ``fsdp``; FSDP splits the
model dimension ``embed`` of every weight over ``fsdp``; tensor parallelism
(Megatron style) splits ``heads``/``kv_heads``/``mlp``/``vocab`` over
``tensor``. Activations ``[batch, length, embed]`` keep ``embed`` whole
because ``fsdp`` is already taken by ``batch``.
"""


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _is_sharding_leaf(x) -> bool:
  return isinstance(x, (NamedSharding, P)) or paths.is_node(x)


def make_mesh(*, data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all, every host).

  One size may be -1: it takes the devices the others leave. Devices are laid
  out by ``mesh_utils.create_device_mesh`` (topology-aware on TPU/GPU), so
  ``tensor`` (innermost) lands on the closest devices.

  Args:
    data / fsdp / tensor: axis sizes; their product must be the device count.
    devices: the devices to use (``jax.devices()``, i.e. all processes', by default).

  Returns:
    A ``jax.sharding.Mesh`` of shape ``[data, fsdp, tensor]`` with Auto axes.

  Example:
    >>> mesh = make_mesh(fsdp=2, tensor=4)      # on 8 devices: data = 1
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 2, 'tensor': 4}
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(data=data, fsdp=fsdp, tensor=tensor)
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
  shape = tuple(sizes[n] for n in MESH_AXES)
  if math.prod(shape) != len(devices):
    raise ValueError(f"make_mesh: axis sizes {sizes} need {math.prod(shape)} devices, "
                     f"but {len(devices)} are given")
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


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


def lora_shardings(lora: L.LoRA, kernel: NamedSharding | P, mesh: Mesh | None = None,
                   path: str = "weight") -> L.LoRA:
  """The shardings of one LoRA node, derived from its base kernel's sharding.

  Returns a ``LoRA`` whose ``a``/``b``/``magnitude`` are ``NamedSharding``s
  (``a``: stack + in-axes specs, None for r; ``b``: stack, None, out-axes
  specs; ``magnitude``: stack + out-axes specs), usable as a jit sharding.

  Example:
    >>> mesh = make_mesh(fsdp=2, tensor=4)
    >>> lo = L.LoRA(a=jnp.ones((64, 8)), b=jnp.ones((8, 256)), rank=8)
    >>> lora_shardings(lo, NamedSharding(mesh, P("fsdp", "tensor"))).b.spec
    P(None, 'tensor')
  """
  if isinstance(kernel, NamedSharding):
    mesh, spec = kernel.mesh, kernel.spec
  elif isinstance(kernel, P) and mesh is not None:
    spec = kernel
  else:
    raise TypeError(f"sharding of the base weight at {path!r} must be a NamedSharding (or a "
                    f"PartitionSpec with mesh=), got {type(kernel).__name__}")
  n = len(lora.kernel_shape)
  if len(spec) > n:
    raise ValueError(f"base weight at {path!r} is {list(lora.kernel_shape)} but its sharding "
                     f"{spec} has {len(spec)} entries")
  spec = tuple(spec) + (None,) * (n - len(spec))
  s = lora.stack
  lead, kern = spec[:s], spec[s:]
  ins, outs = tuple(kern[i] for i in lora.in_axes), tuple(kern[i] for i in lora.out_axes)
  named = lambda *axes: NamedSharding(mesh, P(*axes))
  mag = None if lora.magnitude is None else named(*lead, *outs)
  return lora.replace(a=named(*lead, *ins, None), b=named(*lead, None, *outs), magnitude=mag)


def adapter_shardings(adapter: Any, base_shardings: Any, mesh: Mesh | None = None) -> Any:
  """Shardings for every LoRA of ``adapter``, following its base kernel's.

  Args:
    adapter: the adapter tree (arrays or ``jax.ShapeDtypeStruct``s).
    base_shardings: the base's shardings (:func:`param_shardings`): a tree with
      a ``NamedSharding`` (or ``PartitionSpec``, then pass ``mesh``) at each
      adapted path, laid out as the *logical* (unquantized) kernel.
    mesh: needed only when ``base_shardings`` holds ``PartitionSpec``s.

  Returns:
    A tree like ``adapter`` whose LoRA nodes hold ``NamedSharding``s (see
    :func:`lora_shardings`), to pass to ``jax.device_put`` or ``jax.jit``.

  Example:
    >>> mesh = make_mesh(fsdp=2, tensor=4)
    >>> ad = {"up": {"kernel": L.LoRA(a=jnp.ones((64, 8)), b=jnp.ones((8, 256)), rank=8)}}
    >>> base = {"up": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}}
    >>> adapter_shardings(ad, base)["up"]["kernel"].a.spec
    P('fsdp', None)
  """
  flat = paths.flatten(base_shardings, is_leaf=_is_sharding_leaf)

  def one(path, lo):
    if lo is None:
      return None
    if not isinstance(lo, L.LoRA):
      raise TypeError(f"not an adapter: leaf at {path!r} is a {type(lo).__name__}")
    if path not in flat:
      raise ValueError(f"adapter path {path!r} has no sharding in base_shardings")
    return lora_shardings(lo, flat[path], mesh, path)
  return paths.map_with_path(one, adapter)


def _axes_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def qarray_shardings(q: Any, kernel: NamedSharding, path: str = "weight") -> Any:
  """Shardings of a ``QArray``'s codes and scales, consistent with its kernel's sharding.

  ``q`` stores a kernel ``[*lead, in, out]`` as blocks of the PyTorch layout
  ``[out, in]`` flattened row-major: ``codes: [*lead, nb, ...]``,
  ``scales: [*lead, nb]``. The rule:

  * leading (stacked-layer) axes keep the kernel's specs;
  * the block axis is split over the kernel's *output* mesh axes, then its
    *input* mesh axes. Blocks run output feature by output feature, so when
    only the outputs are split (tensor parallelism) and ``in`` is a multiple
    of ``block_size``, each device holds exactly the blocks of its own output
    columns and dequantizing moves no codes (with double quantization XLA
    may shift a few per-block scales between neighbours, where the groups of
    256 scales straddle devices). An input split (FSDP) divides the
    blocks further: storage stays fully sharded and the weight is gathered
    where it is used, like any FSDP weight;
  * if the block count is not divisible by all those devices, the output
    axes alone are tried, then the blocks are replicated;
  * double-quantization statistics (``nested_scales``, ``offset``) are tiny
    and replicated (apart from the leading axes).

  Returns:
    A QArray of the same static metadata whose children are ``NamedSharding``s.

  Example:
    >>> from jlora.quant import quantize_array
    >>> q = quantize_array(jnp.ones((64, 256)), "nf4")          # 256 blocks of 64
    >>> mesh = make_mesh(fsdp=2, tensor=4)
    >>> qarray_shardings(q, NamedSharding(mesh, P("fsdp", "tensor"))).codes.spec
    P(('tensor', 'fsdp'), None)
  """
  if not isinstance(kernel, NamedSharding):
    raise TypeError(f"sharding of the quantized weight at {path!r} must be a NamedSharding, "
                    f"got {type(kernel).__name__}")
  mesh, spec = kernel.mesh, tuple(kernel.spec)
  if len(spec) > len(q.shape):
    raise ValueError(f"quantized weight at {path!r} is {list(q.shape)} but its sharding "
                     f"{kernel.spec} has {len(spec)} entries")
  spec = spec + (None,) * (len(q.shape) - len(spec))
  n_lead = len(q.shape) - 2
  lead, rows, cols = spec[:n_lead], spec[n_lead], spec[n_lead + 1]
  n_blocks = q.scales.shape[n_lead]
  block_axes = None
  for axes in (_axes_tuple(cols) + _axes_tuple(rows), _axes_tuple(cols)):
    if axes and n_blocks % _axis_size(mesh, axes) == 0:
      block_axes = axes if len(axes) > 1 else axes[0]
      break
  named = lambda *axes: NamedSharding(mesh, P(*axes))
  trailing = (None,) * (q.codes.ndim - n_lead - 1)
  out = dict(codes=named(*lead, block_axes, *trailing), scales=named(*lead, block_axes))
  if getattr(q, "nested_scales", None) is not None:
    out["nested_scales"] = named(*lead, None)
  if getattr(q, "offset", None) is not None:
    out["offset"] = named(*lead)
  return q.replace(**out) if hasattr(q, "replace") else dataclasses.replace(q, **out)


def quantized_shardings(qparams: Any, shardings: Any) -> Any:
  """Shardings for a quantized base: ``shardings`` with each QArray's own (see above).

  Args:
    qparams: the base after ``jlora.quantize`` (QArray nodes at some paths).
    shardings: the unquantized base's shardings (:func:`param_shardings`).

  Returns:
    A tree matching ``qparams``: a QArray of ``NamedSharding``s (by
    :func:`qarray_shardings`) at every quantized path, the given sharding elsewhere.

  Example:
    >>> from jlora.quant import quantize
    >>> mesh = make_mesh(tensor=8)
    >>> params = {"d": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}}
    >>> sh = {"d": {"kernel": NamedSharding(mesh, P(None, "tensor")),
    ...             "bias": NamedSharding(mesh, P("tensor"))}}
    >>> quantized_shardings(quantize(params), sh)["d"]["kernel"].codes.spec
    P('tensor', None)
  """
  flat = paths.flatten(shardings, is_leaf=_is_sharding_leaf)

  def one(path, x):
    if path not in flat:
      raise ValueError(f"quantized base path {path!r} has no sharding in shardings")
    if paths.is_node(x) and hasattr(x, "scales"):
      return qarray_shardings(x, flat[path], path)
    return flat[path]
  return paths.map_with_path(one, qparams)


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


def _mesh_of(tree: Any) -> Mesh | None:
  for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding)):
    if isinstance(s, NamedSharding):
      return s.mesh
  return None


def _key_names(keypath) -> tuple[str, ...]:
  return tuple(str(k) for k in keypath)


def state_shardings(state: Any, adapter_shardings: Any, mesh: Mesh | None = None) -> Any:
  """Shardings for an optimizer state (or any tree holding copies of the adapter).

  A leaf of ``state`` whose key path ends with an adapter leaf's key path
  (Adam's ``mu``/``nu``, accumulated gradients, ...) gets that adapter
  leaf's sharding (fitted to the leaf's shape); every other leaf (step
  counts, scalars) is replicated. Works for any optax state without knowing
  the optimizer.

  Args:
    state: the optimizer state, or its ``jax.eval_shape``.
    adapter_shardings: from :func:`adapter_shardings`.
    mesh: the mesh (default: the one ``adapter_shardings`` uses).

  Returns:
    A tree like ``state`` of ``NamedSharding``s.

  Example:
    >>> mesh = make_mesh(fsdp=2, tensor=4)
    >>> ad = {"up": {"kernel": L.LoRA(a=jnp.ones((64, 8)), b=jnp.ones((8, 256)), rank=8)}}
    >>> sh = adapter_shardings(ad, {"up": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}})
    >>> import optax
    >>> st = state_shardings(optax.adam(1e-3).init(ad), sh)
    >>> st[0].mu["up"]["kernel"].b.spec, st[0].count.spec
    (P(None, 'tensor'), P())
  """
  mesh = mesh or _mesh_of(adapter_shardings)
  if mesh is None:
    raise ValueError("state_shardings: adapter_shardings holds no NamedSharding; pass mesh=")
  known = {_key_names(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(
      adapter_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]}
  longest = max((len(k) for k in known), default=0)

  def one(kp, x):
    names, shape = _key_names(kp), tuple(getattr(x, "shape", ()))
    for n in range(min(longest, len(names)), 0, -1):
      s = known.get(names[-n:])
      if s is not None and len(s.spec) <= len(shape):
        return NamedSharding(mesh, fit_spec(s.spec, shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, state)


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
