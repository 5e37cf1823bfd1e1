"""The model zoo: jlora on models written the way their style's users write them.

None of these models knows about jlora. For each: the fresh adapter changes
nothing; a trained (random) adapter gives the unchanged function on
``jlora.merge(params, adapter)`` to float32 rounding; the gradient reaches only
the adapter (no base-weight gradient is formed); swapping adapters does not
recompile; an NF4 base gives what its dequantized float base gives.
"""
import dataclasses
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import rel_err
from test_flax_grad import _eqns

TOL = 2e-5
init = nn.initializers.normal(0.3)


# ----------------------------------------------------------------------------- the zoo

class StandardLayers(nn.Module):
  """Linen's own layers: Dense, DenseGeneral both ways, a tied Embed with attend."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(13, 6, embedding_init=init, name="embed")
    x = embed(ids)
    h = nn.DenseGeneral((2, 5), kernel_init=init, name="heads")(x)            # [6, 2, 5]
    x = x + nn.DenseGeneral(6, axis=(-2, -1), kernel_init=init, name="merge")(jnp.tanh(h))
    x = nn.Dense(7, kernel_init=init, name="up")(x)
    x = nn.Dense(6, kernel_init=init, name="down")(jax.nn.gelu(x))
    return embed.attend(x)


class GemmaStyle(nn.Module):
  """Weights read by ``jnp.einsum`` in the module's own code (Gemma's reference
  style): a fused qkv einsum with a heads axis and a gated MLP."""
  heads: int = 2
  head_dim: int = 3
  dim: int = 6
  hidden: int = 5

  @nn.compact
  def __call__(self, x):
    qkv_w = self.param("qkv_einsum", init, (3, self.heads, self.dim, self.head_dim))
    q, k, v = jnp.einsum("BTD,SNDH->SBTNH", x, qkv_w)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(self.head_dim)
    o = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
    out_w = self.param("attn_vec_einsum", init, (self.heads, self.head_dim, self.dim))
    x = x + jnp.einsum("BTNH,NHD->BTD", o, out_w)
    gate_w = self.param("gating_einsum", init, (2, self.hidden, self.dim))
    g = jnp.einsum("...D,NHD->...NH", x, gate_w)
    h = jax.nn.gelu(g[..., 0, :]) * g[..., 1, :]
    lin = self.param("linear", init, (self.hidden, self.dim))
    return x + jnp.einsum("...H,HD->...D", h, lin)


class MatmulParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", init, (x.shape[-1], 7))
    return jnp.tanh(x @ w) @ self.param("v", init, (7, 3))


class JittedDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(7, kernel_init=init, name="inner")(x)


class WithJit(nn.Module):
  """A submodule whose ``__call__`` is wrapped in ``nn.jit``."""

  @nn.compact
  def __call__(self, x):
    return nn.jit(JittedDense)(name="jitted")(jnp.tanh(x))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(9, kernel_init=init, name="up")(x)
    return x + nn.Dense(5, kernel_init=init, name="down")(jax.nn.gelu(h)), None


class ScanRemat(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    return stack(name="layers")(x, None)[0]


class MHA(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, kernel_init=init,
                                           name="mha")(x, x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, img):
    y = nn.Conv(5, (3, 3), kernel_init=init, name="conv1")(img)
    return nn.Conv(3, (2, 2), strides=2, kernel_init=init, name="conv2")(jax.nn.relu(y))


def linen(model, *args):
  def make(rng):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                          shapes)
    return model, params
  return make


def equinox_mlp(x):
  def make(rng):
    mlp = eqx.nn.MLP(in_size=5, out_size=3, width_size=7, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    fn = lambda p, xs: jax.vmap(eqx.combine(p, static))(xs)
    return fn, params
  return make


def plain_fn(rng):
  params = {"embed": jnp.asarray(rng.normal(size=(11, 5)), jnp.float32),
            "mlp": {"w1": jnp.asarray(rng.normal(size=(5, 7)) * 0.3, jnp.float32),
                    "w2": jnp.asarray(rng.normal(size=(7, 5)) * 0.3, jnp.float32)},
            "scale": jnp.ones((5,), jnp.float32)}

  def fn(p, ids):
    x = p["embed"][ids]
    return (jnp.tanh(x @ p["mlp"]["w1"]) @ p["mlp"]["w2"]) * p["scale"][None, :]
  return fn, params


def _ids(shape, n):
  return jnp.asarray(np.random.default_rng(0).integers(0, n, size=shape), jnp.int32)


def _x(*shape):
  return jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)


ZOO = {
    "linen_standard": (linen(StandardLayers(), _ids((2, 4), 13)), (_ids((2, 4), 13),),
                       jlora.LoraConfig(rank=2, targets=[ "embed", "heads", "merge", "up",
                                                          "down"])),
    "gemma_style_einsum": (linen(GemmaStyle(), _x(2, 4, 6)), (_x(2, 4, 6),),
                           jlora.LoraConfig(rank=2)),
    "matmul_on_a_param": (linen(MatmulParam(), _x(3, 5)), (_x(3, 5),),
                          jlora.LoraConfig(rank=2, targets=["w", "v"])),
    "nn_jit_submodule": (linen(WithJit(), _x(3, 5)), (_x(3, 5),), jlora.LoraConfig(rank=2)),
    "scan_and_remat": (linen(ScanRemat(), _x(2, 3, 5)), (_x(2, 3, 5),),
                       jlora.LoraConfig(rank=2)),
    "multi_head_attention": (linen(MHA(), _x(2, 4, 6)), (_x(2, 4, 6),),
                             jlora.LoraConfig(rank=2)),
    "conv": (linen(ConvNet(), _x(1, 6, 6, 2)), (_x(1, 6, 6, 2),),
             jlora.LoraConfig(rank=2, targets=["conv1", "conv2"])),
    "equinox_mlp": (equinox_mlp(None), (_x(4, 5),), jlora.LoraConfig(rank=2)),
    "plain_function": (plain_fn, (_ids((3,), 11),),
                       jlora.LoraConfig(rank=2, targets=["embed", "w1", "w2"])),
}


def as_fn(model):
  """The unchanged function of (params, *args)."""
  if isinstance(model, nn.Module):
    return lambda p, *a: model.apply({"params": p}, *a)
  return model


def randomized(adapter, rng, scale=0.5):
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype), adapter)


def setup(name, rng, dora=False):
  make, args, cfg = ZOO[name]
  model, params = make(rng)
  if dora:
    cfg = dataclasses.replace(cfg, use_dora=True)
  fresh = jlora.init_adapter(jax.random.key(1), params, cfg, model=model, args=args)
  return model, params, args, fresh


def adapted(model):
  """``(params, adapter, *args) -> output`` through jlora's documented entry points."""
  if isinstance(model, nn.Module):
    return lambda p, ad, *a: jlora.apply(model, {"params": p}, ad, *a)
  return lambda p, ad, *a: jlora.adapt(model, p, ad)(*a)


# ----------------------------------------------------------------------------- checks

def _linear_loss(out):
  """A fixed linear functional of the outputs (its gradient is not amplified by rounding)."""
  return sum(jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))
             for y in jax.tree.leaves(out))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name, rng):
  model, params, args, fresh = setup(name, rng)
  fn, run = as_fn(model), adapted(model)
  assert jlora.adapter.loras(fresh), "nothing was adapted"
  base = jax.jit(fn)(params, *args)
  # 1. identity at init (b = 0; a lookup's a = 0)
  step = jax.jit(run)
  got = step(params, fresh, *args)
  assert jax.tree.all(jax.tree.map(lambda g, b: rel_err(g, b) < 1e-6, got, base))
  # 2. a trained adapter equals the unchanged function on the merged params
  ad = randomized(fresh, rng)
  got = step(params, ad, *args)
  want = jax.jit(fn)(jlora.merge(params, ad), *args)
  assert jax.tree.all(jax.tree.map(lambda g, w: rel_err(g, w) < TOL, got, want))
  assert jax.tree.all(jax.tree.map(lambda g, b: rel_err(g, b) > 1e-3, got, base))
  # 3. swapping adapters of the same shapes does not recompile
  step(params, randomized(fresh, rng), *args)
  assert step._cache_size() == 1
  # 4. the gradient reaches only the adapter: it equals the merged model's, and no
  #    base-weight-shaped gradient is formed
  loss = lambda ad, p: _linear_loss(run(p, ad, *args))
  g = jax.jit(jax.grad(loss))(ad, params)
  ref = jax.jit(jax.grad(lambda ad: _linear_loss(fn(jlora.merge(params, ad), *args))))(ad)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  assert rel_err(flat(g), flat(ref)) < 1e-4
  adapted_shapes = {tuple(lo.kernel_shape) for lo in jlora.adapter.loras(ad).values()}
  jaxpr = jax.make_jaxpr(jax.grad(loss))(ad, params).jaxpr
  formed = {tuple(v.aval.shape) for e in _eqns(jaxpr) if e.primitive.name == "dot_general"
            for v in e.outvars}
  assert not formed & adapted_shapes, formed & adapted_shapes


@pytest.mark.parametrize("name", ["gemma_style_einsum", "scan_and_remat", "linen_standard",
                                  "equinox_mlp", "conv"])
def test_zoo_on_an_nf4_base(name, rng):
  model, params, args, fresh = setup(name, rng)
  ad = randomized(fresh, rng)
  qparams = jlora.quantize(params, scheme="nf4", block_size=32, min_size=0,
                           targets=sorted(jlora.adapter.loras(ad)))
  assert any(isinstance(w, jlora.QArray) for w in jax.tree.leaves(
      qparams, is_leaf=lambda x: isinstance(x, jlora.QArray)))
  run = jax.jit(adapted(model))
  got = run(qparams, ad, *args)
  want = run(jlora.dequantize(qparams), ad, *args)
  assert jax.tree.all(jax.tree.map(lambda g, w: rel_err(g, w) < TOL, got, want))


@pytest.mark.parametrize("name", ["gemma_style_einsum", "linen_standard", "conv"])
def test_zoo_with_dora(name, rng):
  """DoRA (PEFT's: the norm held constant for the gradient) equals the merged weights."""
  model, params, args, fresh = setup(name, rng, dora=True)
  ad = randomized(fresh, rng)
  ad = jax.tree.map(lambda lo: lo.replace(magnitude=jnp.abs(lo.magnitude) + 0.5), ad,
                    is_leaf=lambda x: isinstance(x, jlora.LoRA))
  got = jax.jit(adapted(model))(params, ad, *args)
  want = jax.jit(as_fn(model))(jlora.merge(params, ad), *args)
  assert jax.tree.all(jax.tree.map(lambda g, w: rel_err(g, w) < TOL, got, want))


def test_nn_jit_called_twice_eagerly_then_under_jit(rng):
  """flax's nn.jit caches its trace; jlora works from the jaxpr, so calling again
  with the same shapes (eagerly, then inside jax.jit) still adapts."""
  model, params, args, fresh = setup("nn_jit_submodule", rng)
  ad = randomized(fresh, rng)
  want = model.apply({"params": jlora.merge(params, ad)}, *args)
  for _ in range(2):
    assert rel_err(jlora.apply(model, {"params": params}, ad, *args), want) < TOL
  model.apply({"params": params}, *args)                   # a plain run in between
  got = jax.jit(lambda p, ad: jlora.apply(model, {"params": p}, ad, *args))(params, ad)
  assert rel_err(got, want) < TOL
  again = jlora.init_adapter(jax.random.key(1), params, jlora.LoraConfig(rank=2), model=model,
                             args=args)
  assert set(jlora.adapter.loras(again)) == {"jitted/inner/kernel"}


def test_what_was_learnt_about_each_weight(rng):
  """init_adapter's tracing: kinds, input/output axes and stacks, for every style."""
  def learnt(name):
    _, _, _, fresh = setup(name, rng)
    return {p: (lo.kind, lo.in_axes, lo.out_axes, lo.stack)
            for p, lo in jlora.adapter.loras(fresh).items()}
  assert learnt("gemma_style_einsum") == {
      "qkv_einsum": ("dense", (2,), (0, 1, 3), 0),          # [S, N, D, H]: D contracted
      "attn_vec_einsum": ("dense", (0, 1), (2,), 0),
      "gating_einsum": ("dense", (2,), (0, 1), 0),
      "linear": ("dense", (0,), (1,), 0)}
  assert learnt("linen_standard") == {
      "embed/embedding": ("embed", (0,), (1,), 0),          # looked up and attended
      "heads/kernel": ("dense", (0,), (1, 2), 0), "merge/kernel": ("dense", (0, 1), (2,), 0),
      "up/kernel": ("dense", (0,), (1,), 0), "down/kernel": ("dense", (0,), (1,), 0)}
  assert learnt("scan_and_remat") == {"layers/up/kernel": ("dense", (0,), (1,), 1),
                                      "layers/down/kernel": ("dense", (0,), (1,), 1)}
  assert learnt("equinox_mlp") == {f"layers/{i}/weight": ("dense", (1,), (0,), 0)
                                   for i in range(3)}      # weight [out, in], W @ x
  assert learnt("conv") == {"conv1/kernel": ("conv", (0, 1, 2), (3,), 0),
                            "conv2/kernel": ("conv", (0, 1, 2), (3,), 0)}


def test_a_target_used_otherwise_is_an_error_that_says_how(rng):
  fn, params = plain_fn(rng)
  ids = _ids((3,), 11)
  params = {**params, "pos": jnp.ones((3, 5), jnp.float32)}
  f = lambda p, ids: fn(p, ids) + p["pos"]
  with pytest.raises(jlora.AdapterError, match="'pos' is used only by `add`"):
    jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(targets=["pos"]), model=f,
                       args=(ids,))
  with pytest.raises(jlora.AdapterError, match="never read"):
    jlora.init_adapter(jax.random.key(0), {**params, "unused": jnp.ones((2, 2))},
                       jlora.LoraConfig(targets=["unused"]), model=f, args=(ids,))
  # ALL_LINEAR: the matmul operands only (no lookup table, no elementwise weight)
  ad = jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(rank=2), model=f,
                          args=(ids,))
  assert sorted(jlora.adapter.loras(ad)) == ["mlp/w1", "mlp/w2"]


def test_a_weight_used_elementwise_too_sees_the_merged_weight(rng):
  """One matmul use (unmerged) and one elementwise use (W + ΔW): exact either way."""
  w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"] ** 2)
  x = _x(3, 5)
  ad = randomized(jlora.init_adapter(jax.random.key(0), {"w": w}, jlora.LoraConfig(rank=2),
                                     model=fn, args=(x,)), rng)
  got = jlora.adapt(fn, {"w": w}, ad)(x)
  assert rel_err(got, fn(jlora.merge({"w": w}, ad), x)) < TOL
