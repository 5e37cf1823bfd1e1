"""jlora.apply on flax.linen models written only with standard layers.

Every adapted layer kind, inside nn.scan / nn.remat / nn.vmap and shared, is
checked against (1) a float64 reference: the model run with x64 on weights
merged in float64 NumPy, and (2) ``model.apply`` on ``jlora.merge`` (float32
rounding). Tolerances: relative 2e-5 (a few float32 roundings through ~8
layers).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import lora as L
from conftest import rel_err
from test_flax_ref import init_params, make_adapter, merge64, randomize, run64, traced_layers

TOL = 2e-5


class AllKinds(nn.Module):
  """Embed (lookup + tied attend), a shared Dense, DenseGeneral (both ways),
  Einsum, Conv and ConvTranspose."""

  @nn.compact
  def __call__(self, ids, sig):
    emb = nn.Embed(13, 6, name="embed")
    x = emb(ids)                                                        # [B, T, 6]
    shared = nn.Dense(6, name="shared")
    x = shared(x) + shared(jnp.tanh(x))
    h = nn.DenseGeneral((2, 5), axis=-1, name="dg_out")(x)              # kernel [6, 2, 5]
    x = nn.DenseGeneral(6, axis=(-2, -1), name="dg_in")(h)              # kernel [2, 5, 6]
    h = nn.Einsum((6, 3, 4), "btd,dhk->bthk", name="einsum")(x)         # kernel [6, 3, 4]
    x = x + nn.Dense(6, name="out")(h.reshape(h.shape[:2] + (12,)))
    c = nn.Conv(5, (3,), name="conv")(sig)                              # kernel [3, 2, 5]
    c = nn.ConvTranspose(4, (3,), strides=(2,), name="convT")(c)        # kernel [3, 5, 4]
    return emb.attend(x), c


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(7, name="up")(x)
    return x + nn.Einsum((7, 5), "btf,fd->btd", name="down")(jnp.tanh(h)), None


class Stacked(nn.Module):
  """nn.scan over nn.remat(Block) (3 layers), then nn.vmap over 2 Dense heads."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True}, length=3)
    x, _ = scan(name="layers")(x, None)
    heads = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=0, out_axes=0, axis_size=2)
    return heads(4, name="heads")(jnp.stack([x, -x]))


def all_kinds_setup(rng, dora):
  m = AllKinds()
  ids = jnp.asarray(rng.integers(0, 13, size=(2, 3)))
  sig = jnp.asarray(rng.normal(size=(2, 7, 2)), jnp.float32)
  p = init_params(m, ids, sig, rng=rng)
  ad = make_adapter(p, traced_layers(m, p, ids, sig), rng, dora=dora)
  return m, p, ad, (ids, sig)


def stacked_setup(rng, dora=False):
  m = Stacked()
  x = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  p = init_params(m, x, rng=rng)
  return m, p, make_adapter(p, traced_layers(m, p, x), rng, dora=dora), x


def check_against_references(m, p, ad, args, got):
  run = jax.jit(lambda q, a: m.apply({"params": q}, *a))
  ref = run64(run, merge64(p, ad), args)
  merged = jax.jit(lambda q, ad, a: m.apply({"params": jlora.merge(q, ad)}, *a))(p, ad, args)
  base = run(p, args)
  for g, r, mg, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(merged),
                         jax.tree.leaves(base)):
    assert g.dtype == b.dtype and g.shape == b.shape
    assert rel_err(g, r) < TOL
    assert rel_err(g, mg) < TOL
    assert rel_err(b, r) > 1e-2   # the adapter changes the output: the test can fail


@pytest.mark.parametrize("dora,jit", [(False, False), (True, True)])
def test_every_layer_kind_matches_the_merged_model(rng, dora, jit):
  m, p, ad, args = all_kinds_setup(rng, dora)
  kinds = {lo.kind for lo in jlora.adapter.loras(ad).values()}
  assert kinds == {"embed", "dense", "conv"}
  fn = lambda p, ad: jlora.apply(m, {"params": p}, ad, *args)
  got = (jax.jit(fn) if jit else fn)(p, ad)
  check_against_references(m, p, ad, args, got)


@pytest.mark.parametrize("dora", [False, True])
def test_scan_remat_and_vmap_stacks_match_the_merged_model(rng, dora):
  m, p, ad, x = stacked_setup(rng, dora)
  up, heads = ad["layers"]["up"]["kernel"], ad["heads"]["kernel"]
  assert (up.stack, up.a.shape, up.b.shape) == (1, (3, 5, 2), (3, 2, 7))
  assert (heads.stack, heads.a.shape) == (1, (2, 5, 2))
  got = jax.jit(lambda p, ad: jlora.apply(m, {"params": p}, ad, x))(p, ad)
  check_against_references(m, p, ad, (x,), got)
  eager = jlora.apply(m, {"params": p}, ad, x)
  assert rel_err(eager, got) < 1e-6


def test_swapping_adapters_does_not_recompile(rng):
  m, p, ad1, x = stacked_setup(rng)
  ad2 = randomize(ad1, rng)
  f = jax.jit(lambda p, ad, x: jlora.apply(m, {"params": p}, ad, x))
  y1, y2 = f(p, ad1, x), f(p, ad2, x)
  assert f._cache_size() == 1
  assert rel_err(y1, y2) > 1e-2
  assert rel_err(y2, jax.jit(m.apply)({"params": jlora.merge(p, ad2)}, x)) < TOL


def test_jax_vmap_over_examples(rng):
  m, p, ad, x = stacked_setup(rng)
  one = lambda xi: jlora.apply(m, {"params": p}, ad, xi[None])[:, 0]
  got = jax.vmap(one)(x)                            # [B, heads, T, 4]
  want = jlora.apply(m, {"params": p}, ad, x)       # [heads, B, T, 4]
  assert rel_err(jnp.swapaxes(got, 0, 1), want) < 1e-6


def test_bf16_inputs_compute_the_lora_term_in_bf16(rng):
  m = nn.Dense(8, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  p = init_params(m, x, rng=rng)
  ad = make_adapter(p, traced_layers(m, p, x), rng)
  fn = lambda x: jlora.apply(m, {"params": p}, ad, x)
  got = fn(x.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  ref = run64(lambda q, x: nn.Dense(8).apply({"params": q}, x), merge64(p, ad), x)
  assert rel_err(got, ref) < 2e-2
  jaxpr = jax.make_jaxpr(fn)(x.astype(jnp.bfloat16))
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3 and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)


def test_lora_dropout_drops_only_the_lora_input(rng):
  m = nn.Dense(4)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  p = init_params(m, x, rng=rng)
  eye = jnp.eye(4, dtype=jnp.float32)
  ad = {"kernel": L.LoRA(a=eye, b=eye, alpha=4.0, rank=4, dropout=0.5)}  # ΔW·x = x
  base = m.apply({"params": p}, x)
  no_rng = jlora.apply(m, {"params": p}, ad, x)
  assert rel_err(no_rng - base, x) < 1e-6
  dropped = np.asarray(jlora.apply(m, {"params": p}, ad, x, rngs={"dropout": jax.random.key(3)})
                       - base)
  kept = np.isclose(dropped, 2 * np.asarray(x), atol=1e-5)
  zero = np.isclose(dropped, 0.0, atol=1e-5)
  assert np.all(kept | zero)
  assert 0.35 < zero.mean() < 0.65


def test_errors_name_the_path(rng):
  m = nn.Dense(8)
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  p = init_params(m, x, rng=rng)
  lo = L.LoRA(a=jnp.ones((6, 2)), b=jnp.ones((2, 8)), alpha=2.0, rank=2)
  with pytest.raises(ValueError, match="'dense/kernel' is not in the params"):
    jlora.apply(m, {"params": p}, {"dense": {"kernel": lo}}, x)
  with pytest.raises(ValueError, match="'kernel'.*base weight is \\[6, 8\\]"):
    jlora.apply(m, {"params": p}, {"kernel": lo.replace(a=jnp.ones((5, 2)))}, x)
  with pytest.raises(ValueError, match="'params' collection cannot be mutable"):
    jlora.apply(m, {"params": p}, {"kernel": lo}, x, mutable=["params"])


class RawMatmul(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))


def test_a_weight_read_by_the_modules_own_code_is_adapted(rng):
  """``x @ self.param(...)`` is a matmul like any other: traced, adapted, and
  equal to the model on the merged weights."""
  m = RawMatmul()
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  p = init_params(m, x, rng=rng)
  cfg = jlora.LoraConfig(rank=2, targets=".*")
  ad = jlora.init_adapter(jax.random.key(1), p, cfg, model=m, args=(x,))
  assert (ad["kernel"].kind, ad["kernel"].in_axes) == ("dense", (0,))
  ad = make_adapter(p, {"kernel": L.LayerInfo("dense", (0,), (1,))}, rng)
  ref = run64(lambda q, x: m.apply({"params": q}, x), merge64(p, ad), x)
  assert rel_err(jlora.apply(m, {"params": p}, ad, x), ref) < 2e-6


def test_axes_that_do_not_fit_the_use_get_the_merged_weight(rng):
  """An adapter grouping the kernel's axes otherwise than the matmul uses them
  cannot be computed unmerged; that use sees W + ΔW, which is still exact."""
  m = nn.DenseGeneral((2, 3), axis=-1)
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  p = init_params(m, x, rng=rng)                                      # kernel [6, 2, 3]
  wrong = {"kernel": make_adapter(p, {"kernel": L.LayerInfo("dense", (0, 1), (2,))}, rng)["kernel"]}
  ref = run64(lambda q, x: m.apply({"params": q}, x), merge64(p, wrong), x)
  assert rel_err(jlora.apply(m, {"params": p}, wrong, x), ref) < 2e-6


