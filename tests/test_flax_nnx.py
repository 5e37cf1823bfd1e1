"""flax.nnx models through the transformation: every layer kind, the model's own
state (dropout RNGs, batch statistics) in and out, the functional form and the
stateful one (nnx.Optimizer with a stateful optax optimizer, many steps)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.train
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


class Stateful(nnx.Module):
  """Dropout and BatchNorm: state that a call advances."""

  def __init__(self, rngs):
    self.up = nnx.Linear(4, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(jax.nn.gelu(self.bn(self.up(x)))))


def random_model(cls, rng, scale=0.3):
  """The model with NumPy-random weights (no initialisers run, nothing compiled)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))), nnx.Param, ...)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype), params)
  assert not jax.tree.leaves(rest)
  return nnx.merge(graphdef, params, rest)


def setup(rng, dora=False):
  m = random_model(Model, rng)
  ids = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
  sig = jnp.asarray(rng.normal(size=(2, 6, 2)), jnp.float32)
  st = nnx.state(m, nnx.Param)
  layers = {p: v for p, v in jlora.flax.learn_layers(m, st, (ids, sig)).items()
            if isinstance(v, L.LayerInfo)}
  return m, st, make_adapter(st, layers, rng, dora=dora), (ids, sig)


def run_with(m, values, args):
  """``m(*args)`` on a copy whose values are replaced by ``values`` (a State or dict)."""
  copy = nnx.clone(m)
  nnx.update(copy, values)
  return copy(*args)


@pytest.mark.parametrize("dora,jit", [(False, False), (True, True)])
def test_every_layer_kind_matches_the_merged_model(rng, dora, jit):
  m, st, ad, args = setup(rng, dora)
  assert {lo.kind for lo in jlora.adapter.loras(ad).values()} == {"embed", "dense", "conv"}
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


def test_the_users_parameters_are_not_changed(rng):
  m, st, ad, args = setup(rng)
  before = jax.tree.map(np.asarray, nnx.state(m))
  jlora.apply(m, None, ad, *args)
  wrapped = jnnx.with_adapter(m, ad)
  wrapped(*args)
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


def stateful_setup(rng):
  m = Stateful(nnx.Rngs(0, dropout=1))
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["up", "out"])
  ad = jlora.init_adapter(jax.random.key(3), nnx.state(m, nnx.Param), cfg, model=m, args=(x,))
  return m, x, randomize(ad, rng, scale=0.3)


def test_dropout_and_batch_statistics_advance_as_without_an_adapter(rng):
  m, x, ad = stateful_setup(rng)
  zero = jax.tree.map(lambda lo: lo.replace(b=jnp.zeros_like(lo.b)), ad,
                      is_leaf=lambda v: isinstance(v, jlora.LoRA))
  plain, adapted = nnx.clone(m), nnx.clone(m)
  outs = []
  for _ in range(3):
    y = jlora.apply(adapted, None, zero, x)
    np.testing.assert_array_equal(y, plain(x))            # the same masks, the same stats
    outs.append(y)
  assert not np.array_equal(outs[0], outs[1])               # a new dropout mask each call
  for u, v in zip(jax.tree.leaves(nnx.state(adapted, nnx.Not(nnx.RngKey))),
                  jax.tree.leaves(nnx.state(plain, nnx.Not(nnx.RngKey)))):
    np.testing.assert_array_equal(u, v)                     # RNG counts, running mean/var
  # with a trained adapter: the statistics of the merged model
  merged, adapted = nnx.clone(m), nnx.clone(m)
  nnx.update(merged, jlora.merge(nnx.state(m, nnx.Param), ad))
  for _ in range(2):
    assert rel_err(jlora.apply(adapted, None, ad, x), merged(x)) < TOL
  for name in ("mean", "var"):
    assert rel_err(getattr(adapted.bn, name).get_value(),
                   getattr(merged.bn, name).get_value()) < TOL


def test_adamw_through_nnx_optimizer_equals_functional_train_steps(rng):
  """Five AdamW steps: the stateful form (with_adapter + nnx.Optimizer) and the
  functional one (jlora.train with the model's state carried in the metrics)
  give the same adapter, losses and batch statistics."""
  m, x, ad = stateful_setup(rng)
  tx = optax.adamw(1e-2, weight_decay=1e-3)

  wrapped = jnnx.with_adapter(nnx.clone(m), ad)
  opt = nnx.Optimizer(wrapped, tx, wrt=jnnx.LoRAParam)

  @nnx.jit
  def stateful_step(model, opt, x):
    loss, grads = nnx.value_and_grad(lambda model: jnp.mean(model(x) ** 2),
                                     argnums=nnx.DiffState(0, jnnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  functional = nnx.clone(m)

  def loss_fn(adapter, state, batch, rng_):
    y, new_rest = jlora.apply(functional, state, adapter, batch, mutable=True)
    return jnp.mean(y ** 2), new_rest

  step = jlora.train.make_train_step(loss_fn, tx, has_aux=True, donate=False)
  adapter, opt_state, state = ad, tx.init(ad), nnx.state(functional)
  params = nnx.state(functional, nnx.Param)
  for _ in range(5):
    want_loss = stateful_step(wrapped, opt, x)
    adapter, opt_state, metrics = step(adapter, opt_state, state, x)
    state = nnx.merge_state(params, metrics["aux"])
    assert rel_err(metrics["loss"], want_loss) < 1e-5
  assert rel_err(flat(jnnx.adapter_of(wrapped)), flat(adapter)) < 1e-5
  assert rel_err(flat(adapter), flat(ad)) > 1e-3
  got_stats = nnx.state(wrapped.model, nnx.BatchStat)
  want_stats = paths.flatten(metrics["aux"])
  for p, v in paths.flatten(got_stats).items():
    assert rel_err(v, want_stats[p]) < 1e-5


def test_inside_jax_jit_state_changes_need_mutable_or_nnx_jit(rng):
  m, x, ad = stateful_setup(rng)
  with pytest.raises(jlora.AdapterError, match="mutable=True"):
    jax.jit(lambda ad: jlora.apply(m, None, ad, x))(ad)
  y, new_state = jax.jit(lambda ad: jlora.apply(m, None, ad, x, mutable=True))(ad)
  assert "bn" in new_state and y.shape == (8, 3)
  y2 = nnx.jit(lambda m, ad: jlora.apply(m, None, ad, x))(m, ad)   # nnx.jit owns the model
  assert y2.shape == (8, 3)


class TakesRngs(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x, rngs=None):
    noise = 0.0 if rngs is None else 0.01 * jax.random.normal(rngs(), x.shape)
    return self.lin(x + noise)


def test_a_model_whose_call_takes_rngs(rng):
  """``rngs=`` belongs to the model; LoRA dropout has its own ``dropout_rng=``."""
  m = TakesRngs(nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  ad = randomize(jlora.init_adapter(jax.random.key(0), nnx.state(m, nnx.Param),
                                    jlora.LoraConfig(rank=2, targets=".*")), rng)
  a = jlora.apply(m, None, ad, x, rngs=nnx.Rngs(5))
  merged = nnx.clone(m)
  nnx.update(merged, jlora.merge(nnx.state(m, nnx.Param), ad))
  assert rel_err(a, merged(x, rngs=nnx.Rngs(5))) < TOL


def test_quantized_state_and_lora_dropout(rng):
  m, st, ad, args = setup(rng)
  kernels = {p for p in paths.flatten(st) if p.endswith(("kernel", "embedding"))}
  q = fake_quantize(st, kernels)
  got = jax.jit(lambda q, ad: jlora.apply(m, q, ad, *args))(q, ad)
  ref = run64(lambda v, a: run_with(m, v, a), merge64(q, ad), args)
  for g, r in zip(got, ref):
    assert rel_err(g, r) < TOL
  lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  eye = jnp.eye(4, dtype=jnp.float32)
  drop = {"kernel": L.LoRA(a=eye, b=eye, alpha=4.0, dropout=0.5)}   # ΔW·x = x
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  assert rel_err(jlora.apply(lin, None, drop, x) - lin(x), x) < 1e-6
  d = np.asarray(jlora.apply(lin, None, drop, x, dropout_rng=jax.random.key(0)) - lin(x))
  zero, kept = np.isclose(d, 0, atol=1e-5), np.isclose(d, 2 * np.asarray(x), atol=1e-5)
  assert np.all(zero | kept) and 0.35 < zero.mean() < 0.65


def test_errors_name_the_path(rng):
  m = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 4))
  st = nnx.state(m, nnx.Param)
  good = make_adapter(st, {"kernel": L.LayerInfo("dense", (0,), (1,))}, rng)
  with pytest.raises(jlora.AdapterError, match="'nope/kernel' is not in"):
    jlora.apply(m, None, {"nope": good}, x)
  bad = {"kernel": good["kernel"].replace(a=jnp.ones((5, 2)))}
  with pytest.raises(ValueError, match="'kernel' has a: \\[5, 2\\]"):
    jlora.apply(m, None, bad, x)


def test_init_adapter_traces_an_nnx_model(rng):
  m = random_model(Model, rng)
  st = nnx.state(m, nnx.Param)
  args = (jax.ShapeDtypeStruct((2, 3), jnp.int32), jax.ShapeDtypeStruct((2, 6, 2), jnp.float32))
  cfg = jlora.LoraConfig(rank=2, targets=jlora.ALL_LINEAR)
  ad = jax.eval_shape(lambda: jlora.init_adapter(jax.random.key(0), st, cfg, model=m, args=args))
  got = {p: (lo.kind, lo.stack, lo.in_axes, lo.out_axes)
         for p, lo in jlora.adapter.loras(ad).items()}
  assert got == {
      "alias/kernel": ("dense", 0, (0,), (1,)),      # nnx.split names a shared layer once
      "dg/kernel": ("dense", 0, (0,), (1, 2)),
      "dg_in/kernel": ("dense", 0, (0, 1), (2,)),
      "layers/up/kernel": ("dense", 1, (0,), (1,)),
      "layers/down/kernel": ("dense", 1, (0,), (1,)),
  }
  with pytest.raises(jlora.AdapterError, match="pass args="):
    jlora.init_adapter(jax.random.key(0), st, cfg, model=m)


def test_flax_lora_layers_read_into_a_jlora_adapter(rng):
  class WithFlaxLoRA(nnx.Module):
    def __init__(self, rngs):
      self.q = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs)
      self.o = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.o(jnp.tanh(self.q(x)))

  m = WithFlaxLoRA(nnx.Rngs(0))
  m.q.lora.lora_b.set_value(jnp.asarray(rng.normal(size=(2, 6)), jnp.float32))
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  ad, state = jnnx.from_flax_lora(m)
  assert set(jlora.adapter.loras(ad)) == {"q/kernel"}
  assert rel_err(jlora.apply(m, state, ad, x), m(x)) < 1e-6
  with pytest.raises(jlora.AdapterError, match="no nnx.LoRA"):
    jnnx.from_flax_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
