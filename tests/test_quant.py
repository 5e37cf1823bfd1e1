"""QArray and the JAX quantizers against the float64 NumPy reference (jlora.quant.reference).

Tolerances: codes equal the reference's except for values within 1e-5 (in
units of the block's absmax) of a decision boundary, where float32 and
float64 may round to neighbouring codes; dequantized values satisfy the
reference's per-value error bound (half the code book's largest gap times
the block absmax, plus what double quantization loses on the absmax) up to
float32 rounding (1e-6 of the absmax).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import rel_err
from jlora.quant import QArray, codebooks as C, reference as R
from jlora.quant import dequantize, nbytes, partition_specs, quantize, quantize_array

SCHEMES = C.SCHEMES
BOUNDARY = 1e-5

# quantize and dequantize in one jitted program (compiled once per shape and settings)
quant_dequant = jax.jit(lambda x, scheme, block, dq: quantize_array(x, scheme, block, dq).dequantize(),
                        static_argnums=(1, 2, 3))


def unpacked_codes(q: QArray) -> np.ndarray:
  c = np.asarray(q.codes).astype(np.int64)
  if q.scheme == "int8":
    return c
  return np.stack([c >> 4, c & 15], axis=-1).reshape(c.shape[:-1] + (-1,))


def near_boundary(v: np.ndarray, scheme: str) -> np.ndarray:
  """Values whose code float32 rounding may legitimately flip."""
  if scheme in C.QMAX:
    s = v * C.QMAX[scheme]
    return np.abs(s - np.floor(s) - 0.5) < BOUNDARY * C.QMAX[scheme]
  mids = C.midpoints(scheme).astype(np.float64)
  return np.min(np.abs(v[..., None] - mids), axis=-1) < BOUNDARY


def check_against_reference(q: QArray, x: np.ndarray, double_quant: bool):
  ref = R.quantize(x, q.scheme, q.block_size, double_quant)
  if not double_quant:     # bitsandbytes stores a zero partial block's absmax as 1e-38
    stored = np.asarray(q.scales, np.float64)
    stored = np.where((ref["absmax"] == 0) & (stored == np.float32(1e-38)), 0.0, stored)
    np.testing.assert_array_equal(stored, ref["absmax"])
  differ = unpacked_codes(q) != ref["codes"]
  assert not np.any(differ & ~near_boundary(ref["v"], q.scheme))
  # |x - x̂| ≤ half gap · absmax + |absmax - scale| (+ float32 rounding), per block
  scales = np.asarray(q.block_scales(), np.float64)
  per_block = (C.half_gap(q.scheme) + 1e-6) * ref["absmax"] + np.abs(ref["absmax"] - scales)
  got = np.asarray(q.dequantize(jnp.float32), np.float64)
  excess = np.abs(got - x) - R.per_value(per_block, x.shape, q.block_size)
  assert np.all(excess <= 0), np.max(excess)
  # the reference's own round trip obeys its bound
  assert np.all(np.abs(R.dequantize(ref) - x) <= R.error_bound(ref) * (1 + 1e-12))
  if double_quant:
    tol = 1e-6 * np.max(np.abs(ref["absmax"]), axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.offset), ref["offset"], rtol=1e-6)
    assert np.all(np.abs(np.asarray(q.nested_scales) - ref["nested"]) <= tol)
    # bitsandbytes' lookup grid: within half the dynamic map's largest gap + one grid cell
    dyn = C.dynamic_map().astype(np.float64)
    slack = np.max(np.diff(dyn)) / 2 + 1 / 65535
    nested = np.repeat(np.asarray(q.nested_scales, np.float64), 256, axis=-1)[..., :scales.shape[-1]]
    assert np.all(np.abs(scales - ref["absmax"]) <= slack * nested + tol)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_reference_with_and_without_jit(rng, scheme, double_quant):
  # stacked and non-square, 33·70 = 2310 values: the last block of each slice is partial
  x = (rng.standard_normal((2, 33, 70)) * np.array([0.02, 3.0])[:, None, None]).astype(np.float32)
  x[1, :5] = 0.0                                  # a zero run inside a block
  q = quantize_array(x, scheme, 64, double_quant)
  assert isinstance(q, QArray) and q.shape == (2, 33, 70) and q.dtype == jnp.float32
  check_against_reference(q, x, double_quant)
  if double_quant:    # under jit: the same bits
    np.testing.assert_array_equal(quant_dequant(x, scheme, 64, double_quant), q.dequantize())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_logical_dtype_and_compute_dtype(rng, dtype):
  x = jnp.asarray(rng.standard_normal((48, 40)), dtype)
  q = quantize_array(x, "nf4")
  assert q.dtype == dtype and q.dequantize().dtype == dtype
  w32 = q.dequantize(jnp.float32)
  np.testing.assert_array_equal(q.dequantize(), w32.astype(dtype))       # f32 product, then cast
  check_against_reference(q, np.asarray(x.astype(jnp.float32)), True)


def test_int8_per_channel(rng):
  x = (rng.standard_normal((40, 24)) * rng.uniform(0.1, 10, size=24)).astype(np.float32)
  q = quantize_array(x, "int8", None, double_quant=False)
  assert q.block_size == 40 and q.scales.shape == (24,)             # one scale per output
  np.testing.assert_allclose(np.asarray(q.scales), np.abs(x).max(axis=0), rtol=0)
  check_against_reference(q, x, False)


def test_slicing_gives_the_per_layer_quantization(rng):
  x = rng.standard_normal((3, 40, 24)).astype(np.float32)
  q = quantize_array(x, "fp4", 32)
  for i in range(3):
    qi, ref = q[i], quantize_array(x[i], "fp4", 32)
    assert qi.shape == (40, 24) and qi.lead_shape == ()
    for a, b in zip(jax.tree.leaves(qi), jax.tree.leaves(ref)):
      np.testing.assert_array_equal(a, b)
  assert q[1:].shape == (2, 40, 24)
  # a scan over the stacked QArray (as nn.scan slices its params) sees layer i at step i
  _, ws = jax.lax.scan(lambda c, qi: (c, qi.dequantize()), None, q)
  np.testing.assert_array_equal(ws, q.dequantize())
  with pytest.raises(IndexError):
    q[0][0]


def test_zeros_constant_and_extreme_blocks(rng):
  x = np.zeros((16, 24), np.float32)
  x[8:] = 7.0                                     # constant blocks
  x[0, :3] = [1e-30, -3e-31, 2e-30]               # a tiny block
  x[1, :3] = [1e37, -4e36, 2e36]                  # a huge block
  for scheme, dq in zip(SCHEMES, (True, False, True, False)):
    q = quantize_array(x, scheme, 8, dq)
    got = np.asarray(q.dequantize(), np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[2:8], 0.0)             # zeros stay exactly zero
    if not dq:                                               # constant blocks are exact
      np.testing.assert_allclose(got[8:], 7.0, rtol=1e-6)
    check_against_reference(q, x, dq)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e38])
def test_bad_values_raise_eagerly_and_poison_under_jit(rng, bad):
  x = rng.standard_normal((2, 32, 16)).astype(np.float32)
  x[1, 3, 4] = bad
  with pytest.raises(ValueError, match=r"layer/kernel: 1 of 1024 values .* \[2, 32, 16\]"):
    quantize_array(x, "nf4", path="layer/kernel")
  w = np.asarray(quant_dequant(x, "nf4", 64, True))
  assert np.all(np.isfinite(w[0])) and np.all(np.isnan(w[1]))   # slice 1's offset is NaN
  w = np.asarray(quant_dequant(x, "int8", 64, False))
  assert np.isnan(w[1]).sum() == 64                                # only the bad block


def test_input_errors():
  with pytest.raises(TypeError, match=r"p/kernel: .*int32"):
    quantize_array(jnp.ones((8, 8), jnp.int32), path="p/kernel")
  with pytest.raises(ValueError, match=r"2 or more axes.*\[64\]"):
    quantize_array(jnp.ones(64))
  with pytest.raises(ValueError, match="even"):
    quantize_array(jnp.ones((8, 8)), "nf4", 33)
  with pytest.raises(ValueError, match="unknown quantization scheme"):
    quantize_array(jnp.ones((8, 8)), "nf3")
  with pytest.raises(ValueError, match="positive int"):
    quantize_array(jnp.ones((8, 8)), "nf4", None)


def test_quantize_tree_targets_dequantize_and_nbytes(rng):
  big = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  params = {"layers_0": {"q_proj": {"kernel": big(64, 96), "bias": big(96)},
                         "norm": {"scale": big(64)}, "small": {"kernel": big(16, 8)}},
            "lm_head": {"kernel": big(64, 128)},
            "step": jnp.zeros((), jnp.int32)}
  q = quantize(params)
  flat = jlora.paths.flatten(q)
  assert [p for p, v in flat.items() if isinstance(v, QArray)] == ["layers_0/q_proj/kernel"]
  q2 = quantize(params, "int8", 64, False, targets=r".*(q_proj|small)")
  assert {p for p, v in jlora.paths.flatten(q2).items() if isinstance(v, QArray)} == {
      "layers_0/q_proj/kernel", "layers_0/small/kernel"}
  q3 = quantize(params, targets=["lm_head"])
  assert isinstance(q3["lm_head"]["kernel"], QArray)
  back = dequantize(q)
  assert back["layers_0"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert rel_err(back["layers_0"]["q_proj"]["kernel"], params["layers_0"]["q_proj"]["kernel"]) < 0.12
  assert dequantize(q, jnp.float32)["layers_0"]["q_proj"]["kernel"].dtype == jnp.float32
  # bytes: NF4 codes 64·96/2, uint8 absmax per 64, one nested float per 256 blocks, the offset
  qk = q["layers_0"]["q_proj"]["kernel"]
  assert qk.nbytes == 64 * 96 // 2 + 96 + 4 + 4
  assert nbytes(q) == nbytes(params) - 64 * 96 * 2 + qk.nbytes


def test_nbytes_of_a_70b_layout_without_memory():
  # Llama-70B MLP stack: 80 layers of [8192, 28672]; eval_shape allocates nothing
  shapes = {"mlp": {"up_proj": {"kernel": jax.ShapeDtypeStruct((80, 8192, 28672), jnp.bfloat16)}}}
  qs = jax.eval_shape(lambda p: quantize(p, "nf4", 64, True), shapes)
  n = 80 * 8192 * 28672
  bits = 8 * nbytes(qs) / n
  assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256) + 32 / n * 80)) < 1e-6    # ≈ 4.127 bits
  assert 8 * nbytes(jax.eval_shape(lambda p: quantize(p, "nf4", 64, False), shapes)) / n == 4.5


def test_donate_frees_inputs_and_tied_arrays_are_quantized_once(rng):
  w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
  other = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
  params = {"a": {"kernel": w}, "b": {"kernel": w}, "c": {"kernel": other}}
  q = quantize(params, donate=True)
  assert w.is_deleted() and other.is_deleted()
  assert q["a"]["kernel"] is q["b"]["kernel"]
  assert q["c"]["kernel"].shape == (128, 64)


def test_sharded_along_blocks(rng):
  x = rng.standard_normal((128, 64)).astype(np.float32)        # 8192 values: 128 blocks of 64
  q = quantize_array(x, "nf4")
  mesh = jax.make_mesh((8,), ("model",))
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                           partition_specs(q, "model"),
                           is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  qs = jax.device_put(q, shardings)
  assert len(qs.codes.sharding.device_set) == 8
  np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(qs), q.dequantize())


def test_qlora_gradients_reach_only_the_adapter(rng):
  """A tiny Dense model on an NF4 base through jlora.apply: the loss and the
  adapter's gradient match a float64 NumPy computation on the dequantized
  base (rel 1e-5); the compiled step takes the base as uint8 codes."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(24, use_bias=False, name="proj")(x)

  x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
  model = Net()
  params = model.init(jax.random.key(0), x)["params"]
  qparams = quantize(params, min_size=0)
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=["proj"])
  ad = jlora.init_adapter(jax.random.key(1), params, cfg)
  lo = ad["proj"]["kernel"]
  ad = {"proj": {"kernel": lo.replace(b=jnp.asarray(rng.standard_normal((4, 24)), jnp.float32))}}

  def loss(ad, base):
    return jnp.sum(jlora.apply(model, {"params": base}, ad, x) ** 2)

  val, g = jax.jit(jax.value_and_grad(loss))(ad, qparams)
  w = np.asarray(qparams["proj"]["kernel"].dequantize(jnp.float32), np.float64)
  a, b = (np.asarray(t, np.float64) for t in (lo.a, ad["proj"]["kernel"].b))
  x64, s = np.asarray(x, np.float64), lo.scale
  y = x64 @ (w + s * a @ b)
  assert rel_err(val, np.sum(y ** 2)) < 1e-5
  gy = 2 * y
  assert rel_err(g["proj"]["kernel"].a, s * x64.T @ gy @ b.T) < 1e-5
  assert rel_err(g["proj"]["kernel"].b, s * a.T @ x64.T @ gy) < 1e-5
  jaxpr = jax.make_jaxpr(jax.grad(loss))(ad, qparams)
  base_in = jaxpr.jaxpr.invars[-len(jax.tree.leaves(qparams)):]
  assert {str(v.aval.dtype) for v in base_in} <= {"uint8", "float32"}
  assert all(math.prod(v.aval.shape) < 64 * 24 for v in base_in)   # no dense kernel goes in


def test_merge_into_a_quantized_base_reports_the_requantization_error(rng):
  scheme = "nf4"
  params = {"d": {"kernel": jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)}}
  qp = quantize(params, scheme, 64, True, min_size=0)
  ad = jlora.init_adapter(jax.random.key(0), params, jlora.LoraConfig(rank=4, alpha=8, targets=["d"]))
  lo = ad["d"]["kernel"]
  ad = {"d": {"kernel": lo.replace(b=jnp.asarray(rng.standard_normal((4, 40)), jnp.float32))}}
  merged, errors = jlora.merge(qp, ad, report=True)
  mq = merged["d"]["kernel"]
  assert isinstance(mq, QArray) and (mq.scheme, mq.block_size, mq.double_quant) == (scheme, 64, True)
  base = np.asarray(qp["d"]["kernel"].dequantize(), np.float64)
  lo = ad["d"]["kernel"]
  want = base + lo.scale * np.asarray(lo.a, np.float64) @ np.asarray(lo.b, np.float64)
  got = np.asarray(mq.dequantize(), np.float64)
  assert abs(float(errors["d/kernel"]) - rel_err(got, want)) < 1e-5
  check_against_reference(mq, want.astype(np.float32), True)      # the loss is one requantization
  assert 0.02 < float(errors["d/kernel"]) < 0.12          # NF4 on Gaussian weights: ~9 %
  assert jlora.merge(qp, ad)["d"]["kernel"].shape == (96, 40)     # report=False: the tree only
  # unmerging requantizes again: back near the base, within two rounding errors
  un, err2 = jlora.unmerge(merged, ad, report=True)
  assert rel_err(un["d"]["kernel"].dequantize(), base) < 2.5 * float(errors["d/kernel"]) + 0.01
  assert set(err2) == {"d/kernel"}
  jitted, jerr = jax.jit(lambda q, a: jlora.merge(q, a, report=True))(qp, ad)
  np.testing.assert_array_equal(jitted["d"]["kernel"].dequantize(), mq.dequantize())
