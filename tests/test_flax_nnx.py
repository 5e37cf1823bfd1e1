"""jlora.apply and the NNX surgery (jlora.flax.nnx) on flax.nnx models written
only with standard layers: every layer kind, a scanned + remat'ed stack made by
nnx.vmap, a shared layer and a tied Embed; checked against float64 merged
references (Embed computes in its float32 dtype: relative tolerance 2e-5)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import lora as L
from jlora import paths
from jlora.flax import nnx as jnnx
from conftest import rel_err
from test_flax_grad import flat
from test_flax_ref import fake_quantize, make_adapter, merge64, randomize, run64

TOL = 2e-5


class Block(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(5, 7, rngs=rngs)
    self.down = nnx.Einsum("btf,fd->btd", (7, 5), (5,), rngs=rngs)

  def __call__(self, x):
    return x + self.down(jnp.tanh(self.up(x)))


class Model(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 5, rngs=rngs)
    self.shared = nnx.Linear(5, 5, rngs=rngs)
    self.alias = self.shared                                    # one layer, two names
    self.dg = nnx.LinearGeneral(5, (2, 3), rngs=rngs)           # kernel [5, 2, 3]
    self.dg_in = nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return Block(r)
    self.layers = make(rngs)                                    # kernels [3, ...]
    self.conv = nnx.Conv(2, 4, (3,), rngs=rngs)

  def __call__(self, ids, sig):
    x = self.embed(ids)
    x = self.shared(x) + self.alias(jnp.tanh(x))
    x = self.dg_in(self.dg(x))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(h, block):
      return block(h)
    return self.embed.attend(body(x, self.layers)), self.conv(sig)


def random_model(cls, rng, scale=0.3):
  """The model with NumPy-random weights (no initialisers run, nothing compiled)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), state)
  return nnx.merge(graphdef, state)


def setup(rng, dora=False):
  m = random_model(Model, rng)
  ids = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
  sig = jnp.asarray(rng.normal(size=(2, 6, 2)), jnp.float32)
  st = nnx.state(m, nnx.Param)
  layers = {p: v for p, v in jnnx.learn_layers(m, st).items() if isinstance(v, L.LayerInfo)}
  return m, st, make_adapter(st, layers, rng, dora=dora), (ids, sig)


def run_with(m, values, args, x64=False):
  """``m(*args)`` on a copy whose values are replaced by ``values`` (a State or dict)."""
  graphdef, state = nnx.split(m)
  copy = nnx.merge(graphdef, state, copy=True)
  nnx.update(copy, values)
  return copy(*args)


@pytest.mark.parametrize("dora,jit", [(False, False), (True, True)])
def test_every_layer_kind_matches_the_merged_model(rng, dora, jit):
  m, st, ad, args = setup(rng, dora)
  assert {lo.kind for lo in jlora.adapter.loras(ad).values()} == {"embed", "dense", "einsum",
                                                                    "conv"}
  assert ad["layers"]["up"]["kernel"].stack == 1
  fn = lambda ad: jlora.apply(m, None, ad, *args)
  got = (jax.jit(fn) if jit else fn)(ad)
  ref = run64(lambda v, a: run_with(m, v, a), merge64(st, ad), args)
  merged_state = jlora.merge(st, ad)                  # tree functions on an nnx.State
  assert isinstance(merged_state, nnx.State)
  merged = jax.jit(lambda v: run_with(m, v, args))(merged_state)
  base = jax.jit(lambda v: run_with(m, v, args))(st)
  for g, r, mg, b in zip(got, ref, merged, base):
    assert rel_err(g, r) < TOL and rel_err(g, mg) < TOL
    assert rel_err(b, r) > 1e-2


def test_the_users_model_is_not_changed(rng):
  m, st, ad, args = setup(rng)
  before = jax.tree.map(np.asarray, nnx.state(m))
  jlora.apply(m, None, ad, *args)
  wrapped = jnnx.with_adapter(m, ad)
  assert isinstance(wrapped.shared, jnnx.LoRALayer) and wrapped.alias is wrapped.shared
  assert type(m.shared) is nnx.Linear and m.alias is m.shared
  after = nnx.state(m)
  assert jax.tree.structure(before) == jax.tree.structure(after)
  assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_adapter_gradient_and_no_recompile(rng):
  m, st, ad, args = setup(rng)
  loss = lambda ad, st: sum(jnp.sum(jnp.sin(y)) for y in jlora.apply(m, st, ad, *args))
  grad = jax.jit(jax.grad(loss))
  got = grad(ad, st)
  merged_loss = lambda ad: sum(jnp.sum(jnp.sin(y)) for y in run_with(m, jlora.merge(st, ad), args))
  want = jax.jit(jax.grad(merged_loss))(ad)
  assert rel_err(flat(got), flat(want)) < 1e-5
  grad(randomize(ad, rng), st)
  assert grad._cache_size() == 1


def test_training_only_the_lora_state_with_an_nnx_optimizer(rng):
  m, st, ad, args = setup(rng)
  model = jnnx.with_adapter(m, ad)
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=jnnx.LoRAParam)
  loss = lambda model: sum(jnp.sum(jnp.sin(y)) for y in model(*args))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jnnx.LoRAParam))(model)
    opt.update(model, grads)

  step(model, opt)
  lora_grad = jax.jit(jax.grad(lambda ad: loss(jnnx.with_adapter(m, ad))))(ad)
  want = jax.tree.map(lambda v, g: v - 0.1 * g, ad, lora_grad)
  assert rel_err(flat(jnnx.adapter_of(model)), flat(want)) < 1e-5
  assert rel_err(flat(jnnx.adapter_of(model)), flat(ad)) > 1e-3
  base_after = {p: v for p, v in paths.flatten(nnx.state(model, nnx.Param)).items()
                if not isinstance(v, jlora.LoRA)}
  base_before = paths.flatten(st)
  assert len(base_after) == len(base_before)
  for p, v in base_after.items():   # wrapped paths gain a "base" step
    assert np.array_equal(v, base_before[p.replace("/base/", "/")])


def test_quantized_state_and_dropout(rng):
  m, st, ad, args = setup(rng)
  kernels = {p for p in paths.flatten(st) if p.endswith(("kernel", "embedding"))}
  q = fake_quantize(st, kernels)
  got = jax.jit(lambda q, ad: jlora.apply(m, q, ad, *args))(q, ad)
  ref = run64(lambda v, a: run_with(m, v, a), merge64(q, ad), args)
  for g, r in zip(got, ref):
    assert rel_err(g, r) < TOL
  lin = random_model(lambda rngs: nnx.Linear(4, 4, rngs=rngs), rng)
  eye = jnp.eye(4, dtype=jnp.float32)
  drop = {"kernel": L.LoRA(a=eye, b=eye, alpha=4.0, rank=4, dropout=0.5)}   # ΔW·x = x
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  assert rel_err(jlora.apply(lin, None, drop, x) - lin(x), x) < 1e-6
  d = np.asarray(jlora.apply(lin, None, drop, x, rngs=jax.random.key(0)) - lin(x))
  zero, kept = np.isclose(d, 0, atol=1e-5), np.isclose(d, 2 * np.asarray(x), atol=1e-5)
  assert np.all(zero | kept) and 0.35 < zero.mean() < 0.65


class Raw(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((4, 3)))
    self.used = nnx.Linear(4, 3, rngs=rngs)
    self.unused = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return x @ self.kernel[...] + self.used(x)


def test_errors_name_the_path(rng):
  m = random_model(Raw, rng)
  x = jnp.ones((2, 4))
  st = nnx.state(m, nnx.Param)
  info = {"dense": L.LayerInfo("dense", (0,), (1,))}
  one = lambda p: make_adapter(st, {p: info["dense"]}, rng)
  with pytest.raises(ValueError, match="'kernel' belongs to a Raw, not a supported layer"):
    jlora.apply(m, None, one("kernel"), x)
  with pytest.raises(ValueError, match="\\['unused/kernel'\\] was not used"):
    jlora.apply(m, None, one("unused/kernel"), x)
  with pytest.raises(ValueError, match="'nope/kernel' is not in the model"):
    jlora.apply(m, None, {"nope": {"kernel": one("used/kernel")["used"]["kernel"]}}, x)
  assert rel_err(jlora.apply(m, None, one("used/kernel"), x), m(x)) > 1e-3


def test_init_adapter_reads_the_layers_of_an_nnx_model(rng):
  m = random_model(Model, rng)
  st = nnx.state(m, nnx.Param)
  cfg = jlora.LoraConfig(rank=2, targets=jlora.ALL_LINEAR)
  ad = jax.eval_shape(lambda: jlora.init_adapter(jax.random.key(0), st, cfg, model=m))
  got = {p: (lo.kind, lo.stack, lo.in_axes, lo.out_axes)
         for p, lo in jlora.adapter.loras(ad).items()}
  assert got == {
      "alias/kernel": ("dense", 0, (0,), (1,)),      # nnx.split names a shared layer once
      "dg/kernel": ("dense", 0, (0,), (1, 2)),
      "dg_in/kernel": ("dense", 0, (0, 1), (2,)),
      "layers/up/kernel": ("dense", 1, (0,), (1,)),
      "layers/down/kernel": ("einsum", 1, (0,), (1,)),
  }
