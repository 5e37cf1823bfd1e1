"""jlora.init_adapter(model=, args=) learns each layer's kind, axes and stack by
tracing abstractly; shapes alone are ambiguous."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jlora
from conftest import rel_err
from test_flax_linen import Stacked
from test_flax_ref import init_params


def abstract_adapter(params, cfg, model=None, args=()):
  """init_adapter under jax.eval_shape: static metadata and shapes, no FLOPs."""
  ad = jax.eval_shape(lambda: jlora.init_adapter(jax.random.key(0), params, cfg, model=model,
                                                 args=args))
  return jlora.adapter.loras(ad)


class FourD(nn.Module):
  """Two 4-D kernels used differently: a DenseGeneral contracting two axes, a Conv."""

  @nn.compact
  def __call__(self, x, img):
    y = nn.DenseGeneral((2, 3), axis=(-2, -1), name="dg")(x)        # kernel [4, 5, 2, 3]
    return y, nn.Conv(6, (3, 3), name="conv")(img)                   # kernel [3, 3, 4, 6]


def test_four_d_kernels_are_told_apart(rng):
  m = FourD()
  x, img = jax.ShapeDtypeStruct((2, 4, 5), jnp.float32), jax.ShapeDtypeStruct((1, 6, 6, 4),
                                                                              jnp.float32)
  p = jax.eval_shape(lambda x, img: m.init(jax.random.key(0), x, img)["params"], x, img)
  assert p["dg"]["kernel"].ndim == p["conv"]["kernel"].ndim == 4
  los = abstract_adapter(p, jlora.LoraConfig(rank=2, targets=".*"), m, (x, img))
  dg, conv = los["dg/kernel"], los["conv/kernel"]
  assert (dg.kind, dg.in_axes, dg.out_axes, dg.a.shape, dg.b.shape) == (
      "dense", (0, 1), (2, 3), (4, 5, 2), (2, 2, 3))
  assert (conv.kind, conv.in_axes, conv.out_axes, conv.a.shape, conv.b.shape) == (
      "conv", (0, 1, 2), (3,), (3, 3, 4, 2), (2, 6))
  with pytest.raises(ValueError, match="cannot be told from the shape"):
    abstract_adapter(p, jlora.LoraConfig(rank=2, targets=".*"))


def test_scanned_and_vmapped_stacks_get_a_leading_layer_axis(rng):
  m = Stacked()
  x = jax.ShapeDtypeStruct((2, 3, 5), jnp.float32)
  p = jax.eval_shape(lambda x: m.init(jax.random.key(0), x)["params"], x)
  los = abstract_adapter(p, jlora.LoraConfig(rank=2, targets=".*"), m, (x,))
  assert {k: (lo.kind, lo.stack, lo.a.shape, lo.b.shape) for k, lo in los.items()} == {
      "layers/up/kernel": ("dense", 1, (3, 5, 2), (3, 2, 7)),
      "layers/down/kernel": ("dense", 1, (3, 7, 2), (3, 2, 5)),
      "heads/kernel": ("dense", 1, (2, 5, 2), (2, 2, 4)),
  }


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(9, 4, name="embed")(ids)
    x = nn.Dense(6, name="q_proj")(x)
    x = nn.Einsum((6, 2, 3), "btd,dhk->bthk", name="attn")(x)
    x = nn.Einsum((2, 3, 5), "bthk,hke->bthe", name="per_head")(x)     # h: batch-like
    return nn.Conv(3, (2,), feature_group_count=1, name="conv")(x.reshape(x.shape[:2] + (10,)))


def test_all_linear_and_a_per_head_einsum():
  """ALL_LINEAR: every weight used as a matmul operand, no Embed, no Conv. An
  einsum axis shared by input and output (the heads of "bthk,hke->bthe") is a
  batch axis of the matmul: each head gets its own LoRA (a stacked axis)."""
  m = Mixed()
  ids = jax.ShapeDtypeStruct((2, 3), jnp.int32)
  p = jax.eval_shape(lambda ids: m.init(jax.random.key(0), ids)["params"], ids)
  los = abstract_adapter(p, jlora.LoraConfig(rank=2, targets=jlora.ALL_LINEAR), m, (ids,))
  assert sorted(los) == ["attn/kernel", "per_head/kernel", "q_proj/kernel"]
  assert (los["attn/kernel"].kind, los["attn/kernel"].out_axes) == ("dense", (1, 2))
  ph = los["per_head/kernel"]
  assert (ph.stack, ph.in_axes, ph.out_axes, ph.a.shape, ph.b.shape) == (
      1, (0,), (1,), (2, 3, 2), (2, 2, 5))
  los = abstract_adapter(p, jlora.LoraConfig(rank=2, targets=["embed", "conv"]), m, (ids,))
  assert {k: lo.kind for k, lo in los.items()} == {"embed/embedding": "embed",
                                                   "conv/kernel": "conv"}


def test_grouped_conv_is_refused_when_targeted():
  m = nn.Conv(4, (3,), feature_group_count=2)
  x = jax.ShapeDtypeStruct((1, 5, 4), jnp.float32)
  p = jax.eval_shape(lambda x: m.init(jax.random.key(0), x)["params"], x)
  with pytest.raises(ValueError, match="grouped convolution"):
    abstract_adapter(p, jlora.LoraConfig(rank=2, targets=".*"), m, (x,))


def test_a_fresh_adapter_leaves_the_model_unchanged(rng):
  m = FourD()
  x = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  img = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  p = init_params(m, x, img, rng=rng)
  cfg = jlora.LoraConfig(rank=2, targets=".*")
  ad, base = jax.jit(lambda p, x, img: jlora.init_adapter(
      jax.random.key(1), p, cfg, model=m, args=(x, img), return_base=True))(p, x, img)
  assert jax.tree.all(jax.tree.map(lambda u, v: bool((u == v).all()), base, p))
  los = jlora.adapter.loras(ad)
  assert all(float(jnp.abs(lo.b).max()) == 0 and float(jnp.abs(lo.a).max()) > 0
             for lo in los.values())
  got = jax.jit(lambda p, ad: jlora.apply(m, {"params": p}, ad, x, img))(p, ad)
  for g, w in zip(got, m.apply({"params": p}, x, img)):
    assert rel_err(g, w) < 1e-6


def test_einsum_with_an_ellipsis(rng):
  m = nn.Einsum((4, 3), "...d,df->...f")
  x = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  p = init_params(m, x, rng=rng)
  los = abstract_adapter(p, jlora.LoraConfig(rank=2, targets=".*"), m, (x,))
  assert (los["kernel"].kind, los["kernel"].in_axes, los["kernel"].out_axes) == (
      "dense", (0,), (1,))
  ad = {"kernel": los["kernel"].replace(a=jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
                                        b=jnp.asarray(rng.normal(size=(2, 3)), jnp.float32))}
  got = jax.jit(lambda p, ad: jlora.apply(m, {"params": p}, ad, x))(p, ad)
  want = jax.jit(m.apply)({"params": jlora.merge(p, ad)}, x)
  assert rel_err(got, want) < 1e-5 and rel_err(want, m.apply({"params": p}, x)) > 1e-2
