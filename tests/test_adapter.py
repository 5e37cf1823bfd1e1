"""jlora.adapter: init_adapter, merge, unmerge, delta, scale, negate, count_params.

References are float64 NumPy (tests/lora_reference.py); merged float32
weights must match to a relative error of 2e-6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import lora_reference as ref
from conftest import rel_err
from jlora import adapter as A
from jlora import lora as L
from jlora.config import LoraConfig

TOL = 2e-6


def _params(rng):
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  return {
      "emb": {"embedding": f(12, 5)},
      "blocks": {"attn": {"q_proj": {"kernel": f(5, 2, 3), "bias": f(2, 3)},   # DenseGeneral
                          "o_proj": {"kernel": f(2, 3, 5)}},
                 "mlp": {"kernel": f(2, 5, 7)}},                                  # stacked [L, in, out]
      "conv": {"kernel": f(3, 3, 2, 4)},
      "head": {"kernel": f(5, 12)},
  }


LAYERS = {
    "blocks/attn/q_proj/kernel": L.LayerInfo("dense", (0,), (1, 2)),
    "blocks/attn/o_proj/kernel": L.LayerInfo("dense", (0, 1), (2,)),
    "blocks/mlp/kernel": L.LayerInfo("dense", (0,), (1,), stack=1),
    "conv/kernel": L.LayerInfo("conv", (0, 1, 2), (3,)),
    "emb/embedding": L.LayerInfo("embed", (0,), (1,)),
}
TARGETS = ["emb", "q_proj", "o_proj", "mlp", "conv"]


def _randomize(rng, adapter):
  """Random non-zero a and b everywhere (init leaves b = 0)."""
  def one(lo):
    return lo.replace(a=jnp.asarray(rng.standard_normal(lo.a.shape), lo.a.dtype),
                      b=jnp.asarray(rng.standard_normal(lo.b.shape), lo.b.dtype))
  return jax.tree.map(one, adapter, is_leaf=lambda x: isinstance(x, L.LoRA))


def _adapter(rng, params, **cfg):
  cfg = LoraConfig(**{"rank": 2, "alpha": 3.0, "targets": TARGETS, **cfg})
  return _randomize(rng, A.init_adapter(jax.random.key(0), params, cfg, layers=LAYERS))


def _want_merged(params, adapter):
  out = {}
  for p, lo in A.loras(adapter).items():
    w = np.asarray(dict(_flat(params))[p], np.float64)
    out[p] = w + ref.delta(lo.a, lo.b, lo.scale, lo.in_axes, lo.out_axes, lo.stack)
  return out


def _flat(tree):
  from jlora import paths
  return paths.flatten(tree).items()


def test_init_adapter_shapes_and_keys(rng):
  params = _params(rng)
  ad = A.init_adapter(jax.random.key(0), params, LoraConfig(rank=2, targets=TARGETS), layers=LAYERS)
  los = A.loras(ad)
  assert set(los) == set(LAYERS)
  assert los["blocks/mlp/kernel"].a.shape == (2, 5, 2) and los["blocks/mlp/kernel"].b.shape == (2, 2, 7)
  assert los["blocks/attn/o_proj/kernel"].a.shape == (2, 3, 2)
  assert los["conv/kernel"].a.shape == (3, 3, 2, 2) and los["conv/kernel"].b.shape == (2, 4)
  assert all(lo.kernel_shape == dict(_flat(params))[p].shape for p, lo in los.items())
  # every path gets its own key; the same key gives the same adapter
  a1 = np.asarray(los["blocks/attn/q_proj/kernel"].a).ravel()[:4]
  a2 = np.asarray(los["blocks/attn/o_proj/kernel"].a).ravel()[:4]
  assert not np.allclose(a1, a2)
  again = A.init_adapter(jax.random.key(0), params, LoraConfig(rank=2, targets=TARGETS), layers=LAYERS)
  np.testing.assert_array_equal(a1, np.asarray(A.loras(again)["blocks/attn/q_proj/kernel"].a).ravel()[:4])


@pytest.mark.parametrize("jit", [False, True])
def test_merge_unmerge_match_reference(rng, jit):
  params = _params(rng)
  ad = _adapter(rng, params, use_rslora=True, rank_pattern={"mlp": 3})
  merge = jax.jit(A.merge) if jit else A.merge
  unmerge = jax.jit(A.unmerge) if jit else A.unmerge
  merged = merge(params, ad)
  flat = dict(_flat(merged))
  for p, want in _want_merged(params, ad).items():
    assert rel_err(flat[p], want) < TOL, p
  # untouched leaves are passed through
  np.testing.assert_array_equal(flat["head/kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(flat["blocks/attn/q_proj/bias"], params["blocks"]["attn"]["q_proj"]["bias"])
  back = dict(_flat(unmerge(merged, ad)))
  for p, w in _flat(params):
    bound = 4 * np.finfo(np.float32).eps * max(np.abs(np.asarray(flat[p])).max(), 1.0)
    assert np.abs(np.asarray(back[p]) - np.asarray(w)).max() <= bound, p


def test_delta_scale_negate_count(rng):
  params = _params(rng)
  ad = _adapter(rng, params)
  d = dict(_flat(A.delta(ad)))
  want = _want_merged(params, ad)
  for p, w in _flat(params):
    if p in want:
      assert rel_err(d[p], want[p] - np.asarray(w, np.float64)) < TOL
  d2 = dict(_flat(jax.jit(A.delta)(A.scale(ad, -0.5))))
  for p in want:
    assert rel_err(d2[p], -0.5 * np.asarray(d[p], np.float64)) < TOL
  # negate undoes: merge(merge(p, ad), negate(ad)) ≈ p
  back = dict(_flat(A.merge(A.merge(params, ad), A.negate(ad))))
  for p, w in _flat(params):
    assert rel_err(back[p], w) < 1e-6, p
  n = sum(lo.a.size + lo.b.size for lo in A.loras(ad).values())
  # emb 12·2+2·5, q 5·2+2·6, o 6·2+2·5, mlp 2·(5·2+2·7), conv 18·2+2·4
  assert A.count_params(ad) == n == 170
  assert A.count_params(params) == sum(np.size(w) for _, w in _flat(params))


def test_scale_is_traceable_and_keeps_dora_magnitude(rng):
  params = _params(rng)
  ad = _adapter(rng, params, use_dora=True)
  out = jax.jit(A.scale)(ad, jnp.float32(2.0))
  for p, lo in A.loras(out).items():
    old = A.loras(ad)[p]
    np.testing.assert_allclose(np.asarray(lo.b), 2 * np.asarray(old.b), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lo.magnitude), np.asarray(old.magnitude))


def test_dora_merge_and_unmerge_error(rng):
  params = _params(rng)
  ad = _adapter(rng, params, use_dora=True)
  merged = dict(_flat(A.merge(params, ad)))
  for p, lo in A.loras(ad).items():
    w = dict(_flat(params))[p]
    want = ref.dora_merge(w, lo.a, lo.b, lo.scale, lo.magnitude, lo.in_axes, lo.out_axes, lo.stack)
    assert rel_err(merged[p], want) < TOL, p
  with pytest.raises(ValueError, match="DoRA merge cannot be undone"):
    A.unmerge(params, ad)


def test_pissa_return_base_is_the_residual(rng):
  params = {k: v for k, v in _params(rng).items() if k in ("conv", "blocks")}
  cfg = LoraConfig(rank=2, alpha=4, targets=["conv", "mlp"], init="pissa", use_dora=True)
  ad, base = A.init_adapter(jax.random.key(0), params, cfg, layers=LAYERS, return_base=True)
  again = dict(_flat(A.merge(base, ad)))   # residual + DoRA(ΔW) gives back W at init
  for p, w in _flat(params):
    assert rel_err(again[p], w) < 1e-5, p
  assert rel_err(base["conv"]["kernel"], params["conv"]["kernel"]) > 1e-2   # it is a residual


def test_containers_frozendict_and_nnx_state(rng):
  params = _params(rng)
  ad = _adapter(rng, params)
  want = _want_merged(params, ad)
  frozen = FrozenDict(params)
  out = A.merge(frozen, ad)
  assert isinstance(out, FrozenDict)
  assert rel_err(out["blocks"]["mlp"]["kernel"], want["blocks/mlp/kernel"]) < TOL
  assert isinstance(A.unmerge(out, ad), FrozenDict)

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(6, 5, rngs=rngs)
      self.emb = nnx.Embed(9, 6, rngs=rngs)

  model = Tiny(nnx.Rngs(int(rng.integers(100))))
  state = nnx.state(model, nnx.Param)
  ad2 = _randomize(rng, A.init_adapter(jax.random.key(1), state,
                                       LoraConfig(rank=2, alpha=2, targets=["lin", "emb"])))
  assert set(A.loras(ad2)) == {"lin/kernel", "emb/embedding"}
  before = {p: np.array(v) for p, v in _flat(state)}
  merged = A.merge(state, ad2)
  for p, v in _flat(state):   # the input state is not mutated
    np.testing.assert_array_equal(np.asarray(v), before[p])
  assert type(merged) is type(state)
  assert type(merged["lin"]["kernel"]) is type(state["lin"]["kernel"])
  lo = ad2["lin"]["kernel"]
  w = before["lin/kernel"].astype(np.float64)
  assert rel_err(merged["lin"]["kernel"][...], w + ref.delta(lo.a, lo.b, lo.scale, (0,), (1,))) < TOL
  nnx.update(model, merged)   # the merged state goes back into the module
  assert rel_err(model.lin.kernel[...], merged["lin"]["kernel"][...]) == 0
  back = A.unmerge(merged, ad2)
  assert rel_err(back["emb"]["embedding"][...], before["emb/embedding"]) < 1e-6


def test_adapter_gradient_matches_analytic(rng):
  """d/da, d/db of Σ G ⊙ merge(W, ΔW): s·G b^T and s·a^T G (in the [in, out] view)."""
  w = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  g = rng.standard_normal((6, 4))
  params = {"d": {"kernel": w}}
  ad = _randomize(rng, A.init_adapter(jax.random.key(0), params,
                                      LoraConfig(rank=3, alpha=5.0, targets=["d"])))
  loss = lambda ad: jnp.sum(jnp.asarray(g, jnp.float32) * A.merge(params, ad)["d"]["kernel"])  # noqa: E731
  grad = jax.jit(jax.grad(loss))(ad)["d"]["kernel"]
  lo = ad["d"]["kernel"]
  a, b = np.asarray(lo.a, np.float64), np.asarray(lo.b, np.float64)
  assert rel_err(grad.a, lo.scale * g @ b.T) < 1e-5
  assert rel_err(grad.b, lo.scale * a.T @ g) < 1e-5


def test_errors_name_path_and_shapes(rng):
  params = _params(rng)
  with pytest.raises(ValueError, match=r"targets=\['nope'\] matches no weight .*paths look like"):
    A.init_adapter(jax.random.key(0), params, LoraConfig(targets=["nope"]))
  with pytest.raises(ValueError, match=r"'blocks/attn/q_proj/kernel' has shape \[5, 2, 3\].*model= and args="):
    A.init_adapter(jax.random.key(0), params, LoraConfig(targets=["q_proj"]))
  with pytest.raises(ValueError, match=r"head/kernel: rank 6 is larger than the weight allows.*\[5, 12\]"):
    A.init_adapter(jax.random.key(0), params, LoraConfig(rank=6, targets=["head"]))
  ad = _adapter(rng, params)
  small = {"blocks": params["blocks"]}
  with pytest.raises(ValueError, match=r"merge: adapter path 'conv/kernel' is not in the base tree"):
    A.merge(small, ad)
  other = dict(params, head={"kernel": params["head"]["kernel"][:4]})
  head_ad = _randomize(rng, A.init_adapter(jax.random.key(0), params, LoraConfig(rank=4, targets=["head"])))
  with pytest.raises(ValueError, match=r"'head/kernel' has a: \[5, 4\], b: \[4, 12\] .*\[5, 12\].*base weight is \[4, 12\]"):
    A.unmerge(other, head_ad)
  with pytest.raises(ValueError, match=r"not an adapter: leaf at 'head/kernel' is a"):
    A.merge(params, {"head": {"kernel": params["head"]["kernel"]}})
