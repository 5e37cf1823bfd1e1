"""From recorded uses to a layer description: kind, input and output axes, stack.

``learn`` (api.py) records every use of each weight; :func:`layer_info` reads
them as one :class:`~jlora.lora.LayerInfo` or, where LoRA cannot adapt the
weight, a message saying how the function uses it. This is the one table of
what can be adapted:

  op                  kind     input axes                output axes
  matmul (dot_general) dense   contracted with x         kept
  convolution         conv     window and in-features    out-features
  lookup (gather)     embed    indexed                   kept (whole slices)
  anything else       -        not adaptable; it sees the merged W + ΔW

Axes a matmul batches over (``vmap`` of a layer stack) or that were sliced
away before the use (``scan`` over a stack, ``w[i]``) are stacked-layer axes
and must lead. A weight used in two ways must agree (a tied embedding: a
lookup and a matmul that contracts its output axis).
"""
from __future__ import annotations

from jlora import lora as L

ADAPTABLE_OPS = ("dot", "conv", "gather")
KIND_OF = {"dot": "dense", "conv": "conv", "gather": "embed"}


def _describe(uses) -> str:
  ops = sorted({u["op"] for u in uses})
  return ", ".join(f"`{o}`" for o in ops)


def layer_info(path: str, ndim: int, uses: list[dict]) -> L.LayerInfo | str:
  """The :class:`~jlora.lora.LayerInfo` of the weight at ``path`` or why there is none.

  Example:
    >>> layer_info("w", 3, [dict(op="dot", contract=(1,), free=(2,), batch=(), dropped=(0,))])
    LayerInfo(kind='dense', in_axes=(0,), out_axes=(1,), stack=1)
  """
  if not uses:
    return f"{path!r} (shape of {ndim} axes) is never read by the function"
  usable = [u for u in uses if u["op"] in ADAPTABLE_OPS]
  if not usable:
    return (f"{path!r} is used only by {_describe(uses)}, not as the matrix operand of a "
            "matmul, a convolution kernel or an embedding table; LoRA cannot adapt it")
  stack = set()
  for u in usable:
    stack |= set(u["batch"]) | set(u["dropped"])
  n = len(stack)
  if stack != set(range(n)):
    return (f"{path!r}: the axes {sorted(stack)} that its uses batch or slice over are "
            "stacked-layer axes and must lead the weight's shape")
  order = {"gather": 0, "conv": 1, "dot": 2}
  first = min(usable, key=lambda u: order[u["op"]])
  ins, outs = set(first["contract"]) - stack, set(first["free"]) - stack
  rest = set(range(n, ndim))
  if not ins or not outs or ins & outs or ins | outs != rest:
    return (f"{path!r}: the {first['op']} that uses it contracts axes {sorted(ins)} and keeps "
            f"{sorted(outs)} of {ndim}; LoRA needs each axis to be either contracted (input) "
            "or kept (output)")
  if first["op"] == "gather" and not first.get("full", True):
    return f"{path!r}: a lookup reads partial rows of it; LoRA adapts whole-row lookups only"
  if first["op"] == "conv" and first.get("grouped"):
    return f"{path!r}: a grouped convolution uses it; LoRA cannot adapt it, exclude it"
  for u in usable:
    got = (set(u["contract"]) - stack, set(u["free"]) - stack)
    if got == (ins, outs) or (u["op"] == "dot" and got == (outs, ins)):
      continue
    return (f"{path!r} is used in two ways: a {first['op']} with input axes {sorted(ins)} and "
            f"a {u['op']} contracting {sorted(got[0])}")
  return L.LayerInfo(KIND_OF[first["op"]], tuple(sorted(a - n for a in ins)),
                     tuple(sorted(a - n for a in outs)), n)


def layer_infos(uses: dict[str, list[dict]], shapes: dict[str, tuple]) -> dict:
  """``{path: LayerInfo | message}`` for every recorded weight."""
  return {p: layer_info(p, len(shapes[p]), u) for p, u in uses.items()}
