"""A quantized base flows through jlora.apply: the hook for QArray, tested with
a stand-in node (int8 codes, a scale per column; see test_flax_ref.FakeQ).

References dequantize the stand-in in float64 and merge there, so they check
the hook, not the quantization error. Tolerance: relative 2e-5.
"""
import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora import paths
from conftest import rel_err
from test_flax_grad import _eqns, flat, loss_fn
from test_flax_linen import RawMatmul, all_kinds_setup, check_against_references, stacked_setup
from test_flax_ref import FakeQ, fake_quantize, init_params, merge64, run64

TOL = 2e-5


def quantize_all(params):
  return fake_quantize(params, {p for p in paths.flatten(params)
                                if p.rpartition("/")[2] in ("kernel", "embedding")})


def dequantized(qparams):
  return jax.tree.map(lambda w: w.dequantize() if isinstance(w, FakeQ) else w, qparams,
                      is_leaf=lambda x: isinstance(x, FakeQ))


def test_every_layer_kind_runs_on_a_quantized_base(rng):
  m, p, ad, args = all_kinds_setup(rng, dora=True)
  q = quantize_all(p)
  assert sum(isinstance(w, FakeQ) for w in paths.flatten(q).values()) == 8
  got = jax.jit(lambda q, ad: jlora.apply(m, {"params": q}, ad, *args))(q, ad)
  check_against_references(m, dequantized(q), ad, args, got)


def test_scanned_quantized_stack_with_and_without_adapters(rng):
  m, p, ad, x = stacked_setup(rng)
  q = quantize_all(p)
  only_up = {"layers": {"up": ad["layers"]["up"]}}   # the other quantized weights: base only
  for adapter in (ad, only_up, None):
    got = jlora.apply(m, {"params": q}, adapter, x)
    ref = run64(jax.jit(lambda w, x: m.apply({"params": w}, x)), merge64(q, adapter), x)
    assert rel_err(got, ref) < TOL


def test_gradient_matches_the_dequantized_base_and_dequantizes_in_a_checkpoint(rng):
  m, p, ad, x = stacked_setup(rng)
  q = quantize_all(p)
  grad = jax.grad(loss_fn(m, x), argnums=1)
  got = jax.jit(grad)(q, ad)
  want = jax.jit(grad)(dequantized(q), ad)
  assert rel_err(flat(got), flat(want)) < 1e-5
  remats = lambda base: sum(e.primitive.name in ("checkpoint", "remat2")
                            for e in _eqns(jax.make_jaxpr(grad)(base, ad).jaxpr))
  assert remats(q) > remats(dequantized(q))   # the model's own nn.remat is in both


def test_quantized_weight_read_by_the_modules_own_code(rng):
  """``x @ self.param(...)`` on a QArray: dequantized where the matmul reads it."""
  m = RawMatmul()
  x = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  p = init_params(m, x, rng=rng)
  q = quantize_all(p)
  want = m.apply({"params": dequantized(q)}, x)
  assert rel_err(jlora.apply(m, {"params": q}, None, x), want) < 1e-6


def test_init_adapter_traces_a_quantized_base(rng):
  m, p, _, x = stacked_setup(rng)
  cfg = jlora.LoraConfig(rank=2, targets=".*")
  plain = jax.eval_shape(lambda: jlora.init_adapter(jax.random.key(0), p, cfg, model=m,
                                                    args=(x,)))
  quant = jax.eval_shape(lambda: jlora.init_adapter(jax.random.key(0), quantize_all(p), cfg,
                                                    model=m, args=(x,)))
  assert jax.tree.structure(plain) == jax.tree.structure(quant)
  assert jax.tree.map(lambda s: s.shape, plain) == jax.tree.map(lambda s: s.shape, quant)


def test_jlora_quantize_nf4_base(rng):
  """The real QArray (jlora.quantize): NF4 stacks under nn.scan and nn.vmap."""
  m, p, ad, x = stacked_setup(rng)
  q = jlora.quantize(p, "nf4", block_size=64, double_quant=True, min_size=0)
  quantized = [k for k, w in paths.flatten(q).items() if isinstance(w, jlora.QArray)]
  assert sorted(quantized) == ["heads/kernel", "layers/down/kernel", "layers/up/kernel"]
  deq = jlora.dequantize(q)
  got = jax.jit(lambda q, ad: jlora.apply(m, {"params": q}, ad, x))(q, ad)
  want = jax.jit(lambda d, ad: m.apply({"params": jlora.merge(d, ad)}, x))(deq, ad)
  assert rel_err(got, want) < TOL
  assert rel_err(got, jax.jit(m.apply)({"params": jlora.merge(p, ad)}, x)) > 1e-3  # NF4 ≠ fp32
