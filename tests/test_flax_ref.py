"""Float64 references for the Flax tests (and a test of the reference itself).

``merge64`` builds ``W + ΔW`` (DoRA: ``m/‖W+ΔW‖·(W+ΔW)``) in float64 NumPy with
an explicit einsum over named axes, independently of jlora's merge; ``run64``
runs a model on those weights with x64 enabled, so the reference output is
float64 from end to end.
"""
import dataclasses
import string

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import paths
from conftest import rel_err


def delta64(lo) -> np.ndarray:
  """``scale · a @ b`` laid out like the kernel, ``[*stack, *kernel]``, float64."""
  a, b = np.asarray(lo.a, np.float64), np.asarray(lo.b, np.float64)
  pool = iter(string.ascii_lowercase.replace("r", ""))
  st = "".join(next(pool) for _ in range(lo.stack))
  ks = [next(pool) for _ in range(len(lo.in_axes) + len(lo.out_axes))]
  sa = st + "".join(ks[i] for i in lo.in_axes) + "r"
  sb = st + "r" + "".join(ks[i] for i in lo.out_axes)
  return lo.scale * np.einsum(f"{sa},{sb}->{st + ''.join(ks)}", a, b)


def merge_weight64(w, lo) -> np.ndarray:
  v = np.asarray(w, np.float64) + delta64(lo)
  if lo.magnitude is None:
    return v
  red = tuple(lo.stack + i for i in lo.in_axes)
  norm = np.sqrt((v ** 2).sum(axis=red, keepdims=True))
  m = np.asarray(lo.magnitude, np.float64)
  order = sorted(range(len(lo.out_axes)), key=lambda j: lo.out_axes[j])
  m = np.transpose(m, tuple(range(lo.stack)) + tuple(lo.stack + j for j in order))
  return v * np.expand_dims(m, red) / norm


def _plain64(w):
  if hasattr(w, "dequantize"):
    w = w.dequantize()
  w = np.asarray(w)
  return w.astype(np.float64) if np.issubdtype(w.dtype, np.floating) else w


def merge64(params, adapter) -> dict:
  """The merged params tree in float64 NumPy (quantized weights dequantized)."""
  ads = jlora.adapter.loras(adapter) if adapter is not None else {}
  flat = {p: _plain64(w) for p, w in paths.flatten(params).items()}
  for p, lo in ads.items():
    flat[p] = merge_weight64(flat[p], lo)
  return paths.unflatten(flat)


def run64(fn, *trees):
  """``fn(*trees)`` with x64 enabled and every float array cast to float64."""
  with jax.enable_x64(True):
    cast = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                         if np.issubdtype(np.asarray(x).dtype, np.floating) else jnp.asarray(x), t)
            for t in trees]
    out = fn(*cast)
    return jax.tree.map(lambda y: np.asarray(y, np.float64), out)


def init_params(model, *args, rng, scale=0.3):
  """Random params for a Linen model without running its initialisers (NumPy
  draws: fast, and no compilation per shape)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), shapes)


def traced_layers(model, params, *args):
  """``{path: LayerInfo}`` learnt by tracing the model (no FLOPs)."""
  rec = jlora.flax.learn_layers(model, params, args)
  return {p: v for p, v in rec.items() if isinstance(v, jlora.lora.LayerInfo)}


def make_adapter(params, layers, rng, *, rank=2, alpha=3.0, dora=False, dropout=0.0,
                 scale=0.5):
  """An adapter at every path of ``layers`` ({path: LayerInfo}) with random
  NumPy a, b (and a positive DoRA magnitude)."""
  flat = paths.flatten(params)
  out = {}
  for p, info in layers.items():
    shape = tuple(flat[p].shape)
    st, k = shape[:info.stack], shape[info.stack:]
    ins, outs = tuple(k[i] for i in info.in_axes), tuple(k[i] for i in info.out_axes)
    a = jnp.asarray(rng.normal(size=st + ins + (rank,)) * scale, jnp.float32)
    b = jnp.asarray(rng.normal(size=st + (rank,) + outs) * scale, jnp.float32)
    m = jnp.asarray(rng.uniform(0.5, 2.0, size=st + outs), jnp.float32) if dora else None
    out[p] = jlora.LoRA(a=a, b=b, magnitude=m, alpha=alpha, rank=rank, in_axes=info.in_axes,
                        out_axes=info.out_axes, kind=info.kind,
                        dropout=dropout)
  return paths.unflatten(out)


def randomize(adapter, rng, scale=0.5):
  """Every a, b (and DoRA magnitude) redrawn: random, non-zero, non-square."""
  def fill(lo):
    a = jnp.asarray(rng.normal(size=lo.a.shape) * scale, lo.a.dtype)
    b = jnp.asarray(rng.normal(size=lo.b.shape) * scale, lo.b.dtype)
    m = None if lo.magnitude is None else jnp.asarray(
        np.asarray(lo.magnitude) * rng.uniform(0.5, 1.5, size=lo.magnitude.shape), lo.magnitude.dtype)
    return lo.replace(a=a, b=b, magnitude=m)
  return jax.tree.map(fill, adapter, is_leaf=lambda x: isinstance(x, jlora.LoRA))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQ:
  """A stand-in quantized weight: int8 codes with a float scale per output column.

  Every child carries the leading stacked axes, so slicing along axis 0 gives
  a valid per-layer FakeQ (as jlora's QArray promises).
  """
  codes: jax.Array    # [*lead, *kernel] int8
  scale: jax.Array    # [*lead, 1, ..., out] float32
  _jlora_node = True

  @property
  def shape(self):
    return tuple(self.codes.shape)

  @property
  def ndim(self):
    return self.codes.ndim

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)

  def dequantize(self, dtype=None):
    w = self.codes.astype(jnp.float32) * self.scale
    return w if dtype is None else w.astype(dtype)

  @classmethod
  def of(cls, w):
    w = np.asarray(w, np.float32)
    s = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    return cls(jnp.asarray(np.round(w / s), jnp.int8), jnp.asarray(s))


def fake_quantize(params, targets):
  """``params`` with a FakeQ at every path in ``targets``."""
  return paths.map_with_path(lambda p, w: FakeQ.of(w) if p in targets else w, params)


def test_merge64_matches_a_direct_dense_merge(rng):
  w = rng.normal(size=(6, 4))
  lo = jlora.LoRA(a=jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
                  b=jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), alpha=3.0, rank=2)
  direct = w + 1.5 * np.asarray(lo.a, np.float64) @ np.asarray(lo.b, np.float64)
  assert rel_err(merge_weight64(w, lo), direct) < 1e-14
  m = jnp.asarray(rng.uniform(1, 2, size=(4,)), jnp.float32)
  dora = merge_weight64(w, lo.replace(magnitude=m))
  want = direct * np.asarray(m, np.float64) / np.linalg.norm(direct, axis=0)
  assert rel_err(dora, want) < 1e-14
