"""Gradients of jlora.apply: only the adapter is differentiated, they match the
merged model's (LoRA) or the detached-norm merged model's (DoRA), and a float64
finite-difference check; the jaxpr forms neither W + ΔW nor a base gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import lora as L
from jlora import paths
from conftest import rel_err
from test_flax_linen import stacked_setup
from test_flax_ref import init_params, make_adapter, traced_layers


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def loss_fn(m, x):
  return lambda p, ad: jnp.sum(jnp.sin(jlora.apply(m, {"params": p}, ad, x)))


def merged_detached(params, adapter):
  """Merged weights with DoRA's norm held constant (``stop_gradient``), as PEFT trains."""
  los = jlora.adapter.loras(adapter)

  def one(path, w):
    if path not in los:
      return w
    lo = los[path]
    v = L.as_matrix(w, lo) + L.delta_matrix(lo)
    if lo.magnitude is None:
      return L.from_matrix(v, lo)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=-2, keepdims=True))
    return L.from_matrix(v * lo.magnitude.reshape(lo.stack_dims + (1, -1)) / norm, lo)
  return paths.map_with_path(one, params)


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_gradient_matches_the_merged_model(rng, dora):
  m, p, ad, x = stacked_setup(rng, dora)
  got = jax.jit(jax.grad(loss_fn(m, x), argnums=1))(p, ad)
  ref_loss = lambda ad: jnp.sum(jnp.sin(m.apply({"params": merged_detached(p, ad)}, x)))
  want = jax.jit(jax.grad(ref_loss))(ad)
  assert rel_err(flat(got), flat(want)) < 1e-5
  assert np.linalg.norm(flat(got)) > 1e-3


def test_gradient_without_jit(rng):
  m = nn.Dense(5)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  p = init_params(m, x, rng=rng)
  ad = make_adapter(p, traced_layers(m, p, x), rng)
  got = jax.grad(loss_fn(m, x), argnums=1)(p, ad)
  want = jax.grad(lambda ad: jnp.sum(jnp.sin(m.apply({"params": jlora.merge(p, ad)}, x))))(ad)
  assert rel_err(flat(got), flat(want)) < 1e-5


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(7, 4)
    x = nn.Dense(5)(emb(ids))
    x = nn.Einsum((5, 4), "btf,fd->btd")(jnp.tanh(x))
    return emb.attend(x)


@pytest.mark.parametrize("dora", [False, True])
def test_finite_differences_in_float64(rng, dora):
  m = Tiny()
  ids = jnp.asarray(rng.integers(0, 7, size=(2, 3)))
  p = init_params(m, ids, rng=rng, scale=0.5)
  ad = make_adapter(p, traced_layers(m, p, ids), rng, dora=dora)
  with jax.enable_x64(True):
    to64 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), t)
    p64, ad64 = to64(p), to64(ad)
    loss = jax.jit(lambda ad: loss_fn(m, ids)(p64, ad))
    grad = flat(jax.jit(jax.grad(loss))(ad64))
    is_lora = lambda v: isinstance(v, jlora.LoRA)
    normal = lambda v: jnp.asarray(rng.normal(size=v.shape))
    for _ in range(3):
      # DoRA's norm is held constant: only the magnitude's derivative is the true one
      d = jax.tree.map(lambda lo: lo.replace(
          a=jnp.zeros_like(lo.a) if dora else normal(lo.a),
          b=jnp.zeros_like(lo.b) if dora else normal(lo.b),
          magnitude=None if lo.magnitude is None else normal(lo.magnitude)), ad64, is_leaf=is_lora)
      step = lambda s: jax.tree.map(lambda v, dv: v + s * dv, ad64, d)
      eps = 1e-5
      fd = (float(loss(step(eps))) - float(loss(step(-eps)))) / (2 * eps)
      an = float(grad @ flat(d))
      assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), (fd, an)


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _kernel_shaped(fn, args, shapes, prims=("dot_general", "add", "add_any", "sub")):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [(e.primitive.name, v.aval.shape) for e in _eqns(jaxpr) if e.primitive.name in prims
          for v in e.outvars if tuple(v.aval.shape) in shapes]


def test_no_base_gradient_and_no_merged_weight_is_formed(rng):
  m, p, ad, x = stacked_setup(rng)
  shapes = set()
  for w in jax.tree.leaves(p):
    if w.ndim == 3:
      shapes |= {tuple(w.shape), tuple(w.shape[1:])}
  assert {(5, 7), (7, 5), (5, 4)} <= shapes
  grad = jax.grad(loss_fn(m, x), argnums=1)
  assert _kernel_shaped(grad, (p, ad), shapes) == []
  assert _kernel_shaped(lambda p, ad: jlora.apply(m, {"params": p}, ad, x), (p, ad), shapes) == []
  # the check can fail: differentiating the merged model forms W + ΔW
  merged = jax.grad(lambda p, ad: jnp.sum(m.apply({"params": jlora.merge(p, ad)}, x)), argnums=1)
  assert _kernel_shaped(merged, (p, ad), shapes) != []
