"""Property tests (hypothesis) of the quantizers over value ranges, shapes and block sizes.

Shapes, schemes and block sizes come from a fixed menu (each new combination
costs a compilation); values are drawn freely: Gaussian, sparse, constant
and zero blocks, at scales from 1e-30 to 1e30. Every draw is checked against
the float64 NumPy reference with the bound of tests/test_quant.py.
"""
import numpy as np
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from jlora.quant import quantize_array
from test_quant import check_against_reference, unpacked_codes

CONFIGS = [((2, 7, 9), "nf4", 64, True),       # stacked, one partial block per slice
           ((24, 5), "fp4", 16, False),
           ((3, 10), "int4", 8, True),
           ((1, 40), "int8", 32, True),
           ((13, 13), "nf4", 2, False),        # smallest block
           ((6, 33), "fp4", 128, True)]        # one block larger than the array

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def weights(draw):
  shape, scheme, block, dq = draw(st.sampled_from(CONFIGS))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  scale = 10.0 ** draw(st.integers(-30, 30))
  kind = draw(st.sampled_from(["gauss", "sparse", "constant", "mixed"]))
  x = rng.standard_normal(shape) * scale
  if kind == "sparse":
    x *= rng.random(shape) < 0.2                       # mostly exact zeros
  elif kind == "constant":
    x = np.full(shape, scale * draw(st.sampled_from([-1.0, 0.5, 0.0])))
  elif kind == "mixed":                                # magnitudes spanning 12 decades
    x *= 10.0 ** rng.integers(-6, 7, shape)
  return x.astype(np.float32), scheme, block, dq


@SETTINGS
@given(weights())
def test_round_trip_within_the_reference_bound(case):
  x, scheme, block, dq = case
  q = quantize_array(x, scheme, block, dq)
  assert q.shape == x.shape and q.dequantize().shape == x.shape
  check_against_reference(q, x, dq)
  deq = np.asarray(q.dequantize())
  assert np.all(deq[x == 0] == 0)                      # zeros stay zero
  if q.lead_shape:
    np.testing.assert_array_equal(q[1].dequantize(), deq[1])


@SETTINGS
@given(weights(), st.integers(-20, 20))
def test_scaling_by_a_power_of_two_changes_only_the_scales(case, k):
  x, scheme, block, dq = case
  assume(np.all(np.abs(x) * 2.0 ** k < 1e37))           # stay inside float32's normal range
  assume(not np.any((x != 0) & (np.abs(x) * 2.0 ** k < 1e-36)))
  c = np.float32(2.0 ** k)
  q, qc = quantize_array(x, scheme, block, dq), quantize_array(x * c, scheme, block, dq)
  np.testing.assert_array_equal(unpacked_codes(q), unpacked_codes(qc))
  np.testing.assert_array_equal(np.asarray(qc.dequantize()), np.asarray(q.dequantize()) * c)
