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
from test_flax_ref import merge64, run64

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


# ----------------------------------------------------------------------------- control flow

def _check(fn, params, args, cfg=None, rng=None, tol=TOL):
  """Adapted == the function on the merged params (a float64 reference), with
  and without jit."""
  cfg = cfg or jlora.LoraConfig(rank=2, targets=".*")
  fresh = jlora.init_adapter(jax.random.key(0), params, cfg, model=fn, args=args)
  ad = randomized(fresh, rng)
  want = run64(fn, merge64(params, ad), *args)
  for run in (jlora.adapt(fn, params, ad), jax.jit(lambda *a: jlora.adapt(fn, params, ad)(*a))):
    got = run(*args)
    assert jax.tree.all(jax.tree.map(lambda g, w: rel_err(g, w) < tol, got, want))
  return ad


def test_cond_while_and_fori_loop(rng):
  params = {"w": jnp.asarray(rng.normal(size=(4, 4)) * 0.4, jnp.float32),
            "v": jnp.asarray(rng.normal(size=(4, 4)) * 0.4, jnp.float32)}

  def fn(p, x):
    x = jax.lax.cond(jnp.sum(x) > 0, lambda x: x @ p["w"], lambda x: jnp.tanh(x @ p["v"]), x)
    x = jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ p["w"]), x)
    return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["v"]), (0, x))[1]
  for x in (_x(3, 4), -_x(3, 4) - 3):
    _check(fn, params, (x,), rng=rng)


def test_checkpoint_policy_and_custom_derivatives(rng):
  """jax.checkpoint is re-entered with its policy; a custom_vjp function gets
  the merged weight at its boundary and keeps its own derivative rule."""
  @jax.custom_vjp
  def clipped_matmul(x, w):
    return x @ w

  def fwd(x, w):
    return x @ w, (x, w)

  def bwd(res, g):          # a deliberately different rule: the gradient scaled by 2
    x, w = res
    return (2 * g @ w.T, 2 * x.T @ g)
  clipped_matmul.defvjp(fwd, bwd)

  params = {"w": jnp.asarray(rng.normal(size=(5, 6)) * 0.3, jnp.float32),
            "v": jnp.asarray(rng.normal(size=(6, 5)) * 0.3, jnp.float32)}
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable

  def fn(p, x):
    h = jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]), policy=policy)(x)
    return clipped_matmul(h, p["v"])
  x = _x(3, 5)
  ad = _check(fn, params, (x,), rng=rng)
  jaxpr = jax.make_jaxpr(lambda ad: jlora.adapt(fn, params, ad)(x))(ad).jaxpr
  remats = [e for e in _eqns(jaxpr) if e.primitive.name in ("remat2", "checkpoint")]
  assert remats and all(e.params["policy"] is policy for e in remats)
  g = jax.grad(lambda ad: jnp.sum(jlora.adapt(fn, params, ad)(x)))(ad)
  want = jax.grad(lambda ad: jnp.sum(fn(jlora.merge(params, ad), x)))(ad)
  assert rel_err(g["v"].b, want["v"].b) < 1e-5          # the custom rule's factor 2 kept
  plain = jax.grad(lambda ad: jnp.sum(jlora.merge(params, ad)["v"].sum() * 0 + (
      jnp.tanh(x @ jlora.merge(params, ad)["w"]) @ jlora.merge(params, ad)["v"]).sum()))(ad)
  assert rel_err(g["v"].b, plain["v"].b) > 0.5


def test_shard_map_over_eight_devices(rng):
  """A row-parallel matmul inside shard_map (psum after it): the factors get
  the weight's partition specs on their own axes."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.asarray(rng.normal(size=(8, 6)) * 0.3, jnp.float32)}

  def fn(p, x):
    body = lambda w, x: jax.lax.psum(x @ w, "x")
    return jax.shard_map(body, mesh=mesh, in_specs=(P("x", "y"), P(None, "x")),
                         out_specs=P(None, "y"))(p["w"], x)
  x = _x(3, 8)
  _check(fn, params, (x,), rng=rng)
  ad = randomized(jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(rank=2),
                                     model=fn, args=(x,)), rng)
  w = jax.device_put(params["w"], NamedSharding(mesh, P("x", "y")))
  got = jax.jit(lambda w, ad: jlora.adapt(fn, {"w": w}, ad)(x))(w, ad)
  assert rel_err(got, fn(jlora.merge(params, ad), x)) < TOL
  # IA3 vectors (on the outputs, or on the inputs) are split like the axes they scale
  from jlora.methods.bottleneck import init_bottleneck
  from jlora.methods.ia3 import init_ia3
  plain = lambda p, x: x @ p["w"]
  for ff in ((), "w"):
    ia3 = jax.tree.map(lambda v: jnp.asarray(1 + rng.normal(size=v.shape), v.dtype),
                       init_ia3(params, targets="w", feedforward=ff, model=fn, args=(x,)))
    got = jax.jit(lambda w, ad: jlora.adapt(fn, {"w": w}, ad)(x))(w, ia3)
    assert rel_err(got, jlora.adapt(plain, params, ia3)(x)) < TOL
  # a bottleneck is nonlinear in the whole output: a partial product cannot take it
  bn = init_bottleneck(jax.random.key(1), params, width=2, targets="w", model=fn, args=(x,))
  with pytest.raises(jlora.AdapterError, match="'w'.*Bottleneck.*partial product"):
    jlora.adapt(fn, params, bn)(x)


def test_a_layer_stack_indexed_in_a_python_loop_and_vmapped(rng):
  """``w[i]`` of a stacked weight slices the adapter too; a vmapped stack is a
  matmul batched over the layer axis."""
  params = {"w": jnp.asarray(rng.normal(size=(3, 4, 4)) * 0.4, jnp.float32)}
  loop = lambda p, x: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)
  unrolled = lambda p, x: [x := jnp.tanh(x @ p["w"][i]) for i in range(3)][-1]
  # vmapped over the stack and its inputs: a matmul batched over the layer axis
  vmapped = lambda p, x: jax.vmap(lambda w, x: x @ w)(p["w"], jnp.stack([x, -x, 2 * x]))
  for fn in (loop, unrolled, vmapped):
    ad = _check(fn, params, (_x(2, 4),), rng=rng)
    assert ad["w"].stack == 1


def test_lora_dropout_in_a_scanned_stack(rng):
  """Each stacked layer draws its own mask; a key makes it deterministic."""
  params = {"w": jnp.asarray(rng.normal(size=(3, 16, 16)) * 0.1, jnp.float32)}
  fn = lambda p, x: jax.lax.scan(lambda h, w: (h @ w, None), x, p["w"])[0]
  x = _x(64, 16)
  cfg = jlora.LoraConfig(rank=4, dropout=0.5, targets=".*")
  ad = randomized(jlora.init_adapter(jax.random.key(0), params, cfg, model=fn, args=(x,)), rng)
  run = jax.jit(lambda key: jlora.adapt(fn, params, ad, dropout_rng=key)(x))
  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert rel_err(a, c) > 1e-3
  no_drop = jlora.adapt(fn, params, ad)(x)
  assert rel_err(a, no_drop) > 1e-3 and rel_err(no_drop, fn(jlora.merge(params, ad), x)) < TOL
