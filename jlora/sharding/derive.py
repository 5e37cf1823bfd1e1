"""Shardings derived from the base's: adapters (LoRA), quantized weights (QArray), optimizer states."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import lora as L
from jlora import paths
from jlora.sharding.mesh import _axis_size, fit_spec
from jlora.sharding.mesh import make_mesh  # noqa: F401 (the docstring examples use it)


def _is_sharding_leaf(x) -> bool:
  return isinstance(x, (NamedSharding, P)) or paths.is_node(x)


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

  Other adapter nodes (IA³, bottleneck, prompt, prefix) are replicated.

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
      if not getattr(type(lo), "_jlora_adapter", False):
        raise TypeError(f"not an adapter: leaf at {path!r} is a {type(lo).__name__}")
      # IA3 vectors, bottlenecks, prompts: small, so every device holds them whole
      where = flat.get(path)
      m = where.mesh if isinstance(where, NamedSharding) else mesh or _mesh_of(base_shardings)
      if m is None:
        raise ValueError("base_shardings holds no NamedSharding: pass mesh=")
      return jax.tree.map(lambda _: NamedSharding(m, P()), lo)
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
