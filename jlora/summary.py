"""What an adapter adapts and how big it is: ``adapted_paths`` and ``summary``.

``summary`` prints what PEFT's ``print_trainable_parameters`` prints
(``trainable params: … || all params: … || trainable%: …``, where "all"
counts the base and the adapter, as PEFT counts its LoRA layers among the
model's parameters), followed by one row per adapted weight.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax

from jlora import adapter as adapter_lib
from jlora import lora as L
from jlora import paths
from jlora.errors import AdapterError


def adapted_paths(adapter: Any) -> list[str]:
  """The paths of the base weights ``adapter`` adapts, sorted.

  Works for an adapter tree and for an :class:`jlora.AdapterBank` (the
  weights any of its slots adapts).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> params = {"up": {"kernel": jnp.ones((16, 32))}, "down": {"kernel": jnp.ones((32, 16))}}
    >>> adapter = jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=["up"]))
    >>> jlora.adapted_paths(adapter)
    ['up/kernel']
  """
  nodes = getattr(adapter, "nodes", None)
  if isinstance(nodes, dict) and hasattr(adapter, "slot_names"):   # an AdapterBank
    return sorted(nodes)
  return sorted(adapter_lib.loras(adapter))


def _size(x: Any) -> int:
  """Logical number of values (a QArray counts the weights it stands for)."""
  return int(math.prod(getattr(x, "shape", ())))


def count_base(params: Any) -> int:
  """Number of values in a base tree; a quantized ``QArray`` counts its logical shape."""
  from jlora.quant.qarray import QArray
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
  return sum(_size(x) for x in leaves if hasattr(x, "shape"))


def format_table(rows: Sequence[Sequence[str]]) -> str:
  """Left-aligned columns, two spaces apart (the first row is the header)."""
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _row(path: str, node: Any, weight: Any) -> tuple[str, ...]:
  n = adapter_lib.count_params(node)
  shape = str(list(weight.shape)) if weight is not None and hasattr(weight, "shape") else "?"
  share = f"{100 * n / _size(weight):.2f}%" if weight is not None and _size(weight) else "-"
  if isinstance(node, L.LoRA):
    kind = node.kind + (" stacked" if node.stack else "") + (" DoRA" if node.use_dora else "")
    return (path, shape, kind, str(node.rank), f"{node.alpha:g}", f"{node.scale:.4g}",
            f"{n:,}", share)
  return (path, shape, type(node).__name__, "-", "-", "-", f"{n:,}", share)


def summary(adapter: Any, params: Any = None) -> str:
  """PEFT's ``print_trainable_parameters`` line, then a table of the adapted weights.

  Args:
    adapter: an adapter tree (LoRA nodes, or other adapter nodes).
    params: the base tree (may hold ``QArray`` weights, or
      ``jax.ShapeDtypeStruct`` leaves); None: only the adapter is counted.

  Returns:
    The text (``print`` it). The first line is ``trainable params: T ||
    all params: A || trainable%: P`` with ``A`` = base + adapter values (as
    PEFT counts them); one row per adapted weight follows: its path, the
    base weight's shape, the LoRA kind, rank, alpha, scale, its adapter
    parameters and their share of that weight's size.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> params = {"up": {"kernel": jnp.ones((16, 32))}, "down": {"kernel": jnp.ones((32, 16))}}
    >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["up", "down"])
    >>> print(jlora.summary(jlora.init_adapter(jax.random.key(0), params, cfg), params))
    trainable params: 192 || all params: 1,216 || trainable%: 15.7895
    path         weight    kind   rank  alpha  scale  params  of weight
    down/kernel  [32, 16]  dense  2     4      2      96      18.75%
    up/kernel    [16, 32]  dense  2     4      2      96      18.75%
  """
  nodes = adapter_lib.loras(adapter)
  if not nodes:
    raise AdapterError("summary: the adapter has no adapter nodes")
  trainable = adapter_lib.count_params(adapter)
  flat = {} if params is None else paths.flatten(params)
  if params is None:
    head = f"trainable params: {trainable:,}"
  else:
    missing = sorted(set(nodes) - set(flat))
    if missing:
      raise AdapterError(f"summary: adapter paths {missing[:3]} are not in params")
    total = count_base(params) + trainable
    head = (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}")
  rows = [("path", "weight", "kind", "rank", "alpha", "scale", "params", "of weight")]
  rows += [_row(p, node, flat.get(p)) for p, node in sorted(nodes.items())]
  return head + "\n" + format_table(rows)
