"""Float64 NumPy references for LoRA / DoRA weight math (shared by the tests).

Written independently of jlora.lora: ΔW is built with an explicit einsum over
named axes instead of jlora's reshape/transpose.
"""
import string

import numpy as np

# The kernel kinds the tests cover: (name, per-layer kernel shape, in_axes,
# out_axes, stack dims, kind, rank).
CASES = [
    ("dense", (6, 10), (0,), (1,), (), "dense", 3),
    ("dense_general_out", (6, 3, 4), (0,), (1, 2), (), "dense", 2),
    ("dense_general_in", (3, 4, 10), (0, 1), (2,), (), "dense", 4),
    ("einsum_permuted", (3, 7, 5), (2, 0), (1,), (), "einsum", 2),
    ("embed", (12, 5), (0,), (1,), (), "embed", 2),
    ("conv", (3, 2, 4, 6), (0, 1, 2), (3,), (), "conv", 3),
    ("stacked", (6, 7), (0,), (1,), (2,), "dense", 3),
]
CASE_IDS = [c[0] for c in CASES]


def _letters(n_stack, n_kernel):
  pool = iter(string.ascii_lowercase.replace("r", ""))
  return [next(pool) for _ in range(n_stack)], [next(pool) for _ in range(n_kernel)]


def delta(a, b, scale, in_axes, out_axes, n_stack=0):
  """scale · a @ b laid out like the kernel, via one einsum over named axes.

  a: [*stack, *in_dims (in in_axes order), r], b: [*stack, r, *out_dims].
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  st, ks = _letters(n_stack, len(in_axes) + len(out_axes))
  sa = "".join(st) + "".join(ks[i] for i in in_axes) + "r"
  sb = "".join(st) + "r" + "".join(ks[i] for i in out_axes)
  return scale * np.einsum(f"{sa},{sb}->{''.join(st + ks)}", a, b)


def dora_merge(w, a, b, scale, magnitude, in_axes, out_axes, n_stack=0):
  """PEFT's DoRA merged weight m / ‖W + ΔW‖ · (W + ΔW), norm over the input axes."""
  v = np.asarray(w, np.float64) + delta(a, b, scale, in_axes, out_axes, n_stack)
  red = tuple(n_stack + i for i in in_axes)
  norm = np.sqrt((v ** 2).sum(axis=red, keepdims=True))
  m = np.asarray(magnitude, np.float64)
  # magnitude is [*stack, *out_dims] in out_axes order; expand to the kernel layout.
  order = sorted(range(len(out_axes)), key=lambda j: out_axes[j])
  m = np.transpose(m, tuple(range(n_stack)) + tuple(n_stack + j for j in order))
  m = np.expand_dims(m, red)
  return v * m / norm


def dora_magnitude(w, a, b, scale, in_axes, out_axes, n_stack=0):
  """‖W + ΔW‖ over the input axes: [*stack, *out_dims] in out_axes order."""
  v = np.asarray(w, np.float64) + delta(a, b, scale, in_axes, out_axes, n_stack)
  red = tuple(n_stack + i for i in in_axes)
  norm = np.sqrt((v ** 2).sum(axis=red))
  rest = sorted(out_axes)
  return np.transpose(norm, tuple(range(n_stack)) + tuple(n_stack + rest.index(o) for o in out_axes))
