"""jlora.combine and jlora.combining against float64 NumPy and against PEFT.

Tolerances: exact methods ("cat", and "svd"/"ties"/... at full rank, which
only add a float32 SVD) match the float64 reference to a relative error of
1e-5; a float32 ΔW is accurate to ~1e-7, an SVD round trip to ~1e-6.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import lora_reference as ref
from conftest import rel_err
from jlora import adapter as A
from jlora import combining as C
from jlora import lora as L

TOL = 1e-5
# path: (per-layer kernel, in_axes, out_axes, stack dims)
LAYOUT = {
    "dense/kernel": ((6, 5), (0,), (1,), ()),
    "attn/q/kernel": ((5, 2, 3), (0,), (1, 2), ()),
    "mlp/kernel": ((5, 4), (0,), (1,), (2,)),
    "conv/kernel": ((3, 2, 2, 4), (0, 1, 2), (3,), ()),
}
DENSE = {"dense/kernel": LAYOUT["dense/kernel"]}   # one path, for the cheaper checks


def _adapter(rng, rank, alpha, rslora=False, layout=LAYOUT):
  flat = {}
  for p, (k, ia, oa, st) in layout.items():
    a = rng.standard_normal(st + tuple(k[i] for i in ia) + (rank,)) / 2
    b = rng.standard_normal(st + (rank,) + tuple(k[i] for i in oa)) / 2
    flat[p] = L.LoRA(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), alpha=alpha,
                     rank=rank, in_axes=ia, out_axes=oa,
                     kind="conv" if "conv" in p else "dense", rslora=rslora)
  from jlora import paths
  return paths.unflatten(flat)


def _deltas64(adapter):
  """{path: float64 ΔW as [*stack, in, out] matrices} (the einsum reference, regrouped)."""
  out = {}
  for p, lo in A.loras(adapter).items():
    d = ref.delta(lo.a, lo.b, lo.scale, lo.in_axes, lo.out_axes, lo.stack)
    perm = tuple(range(lo.stack)) + tuple(lo.stack + i for i in lo.in_axes + lo.out_axes)
    n_in = math.prod(lo.in_dims)
    out[p] = np.transpose(d, perm).reshape(lo.stack_dims + (n_in, -1))
  return out


def _three(rng, layout=LAYOUT):
  return [_adapter(rng, 2, 4.0, layout=layout), _adapter(rng, 3, 1.5, rslora=True, layout=layout),
          _adapter(rng, 1, 7.0, layout=layout)]


# --- NumPy float64 references of the PEFT / paper rules -------------------------

def _prune_top(x, density, stack):
  flat = x.reshape((-1, x[(0,) * stack].size) if stack else (1, -1)).copy()
  k = int(density * flat.shape[1])
  for row in flat:
    drop = np.argsort(-np.abs(row), kind="stable")[k:]
    row[drop] = 0
  return flat.reshape(x.shape)


def _ties64(tasks, weights, sign_method):
  tasks = np.stack(tasks)
  total = tasks.sum(0) if sign_method == "total" else np.sign(tasks).sum(0)
  elected = np.where(total >= 0, 1.0, -1.0)
  agree = np.sign(tasks) == elected
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (tasks.ndim - 1))
  return (w * tasks * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _mix64(deltas, weights, method, stack, density=None, masks=None, sign_method="total"):
  if method in ("ties", "magnitude_prune"):
    deltas = [_prune_top(d, density, stack) for d in deltas]
  if masks is not None:
    deltas = [d * m / density for d, m in zip(deltas, masks)]
  if method in ("ties", "dare_ties"):
    return _ties64(deltas, weights, sign_method)
  return sum(w * d for w, d in zip(weights, deltas))


# --- cat / svd: exact -----------------------------------------------------------

@pytest.mark.parametrize("jit", [False, True])
def test_cat_is_the_exact_weighted_sum(rng, jit):
  ads, w = _three(rng), [0.7, -1.3, 0.4]
  f = (lambda ads, w: A.combine(ads, w, method="cat"))
  out = (jax.jit(f) if jit else f)(ads, jnp.asarray(w))
  want = {p: sum(wi * _deltas64(ad)[p] for wi, ad in zip(w, ads)) for p in LAYOUT}
  for p, lo in A.loras(out).items():
    assert lo.a.shape[-1] == 6 and lo.scale == 1.0 and not lo.rslora
    assert rel_err(L.delta_matrix(lo), want[p]) < TOL, p
  # default weights: the plain sum
  plain = A.loras(A.combine(ads))["mlp/kernel"]
  assert rel_err(L.delta_matrix(plain), sum(_deltas64(ad)["mlp/kernel"] for ad in ads)) < TOL


@pytest.mark.parametrize("jit", [False, True])
def test_svd_full_rank_is_exact_and_truncation_is_best(rng, jit):
  ads, w = _three(rng), [0.5, 2.0, -1.0]
  want = {p: sum(wi * _deltas64(ad)[p] for wi, ad in zip(w, ads)) for p in LAYOUT}
  f = lambda ads, w: A.combine(ads, w, method="svd", rank=1000)  # noqa: E731  (capped per path)
  out = A.loras((jax.jit(f) if jit else f)(ads, jnp.asarray(w)))
  for p, lo in out.items():
    assert lo.rank == min(want[p].shape[-2:]) and lo.scale == 1.0
    assert rel_err(L.delta_matrix(lo), want[p]) < TOL, p
  small = [{"dense": ad["dense"]} for ad in ads]
  lo = A.loras(A.combine(small, w, method="svd", rank=2))["dense/kernel"]
  u, s, vt = np.linalg.svd(want["dense/kernel"])
  assert rel_err(L.delta_matrix(lo), (u[:, :2] * s[:2]) @ vt[:2]) < TOL
  # the default rank is the largest input rank (PEFT's default)
  assert A.loras(A.combine(small, w, method="svd"))["dense/kernel"].rank == 3


# --- linear: PEFT's convention, with cross terms ---------------------------------

def test_linear_is_peft_convention_not_the_sum(rng):
  ads = [_adapter(rng, 2, 4.0), _adapter(rng, 2, 3.0, rslora=True)]
  w = [0.8, -0.6]
  lo = A.loras(A.combine(ads, w, method="linear"))["attn/q/kernel"]
  los = [A.loras(ad)["attn/q/kernel"] for ad in ads]
  c = [wi * x.scale for wi, x in zip(w, los)]
  a = sum(np.sign(ci) * math.sqrt(abs(ci)) * np.asarray(x.a, np.float64).reshape(5, 2) for ci, x in zip(c, los))
  b = sum(math.sqrt(abs(ci)) * np.asarray(x.b, np.float64).reshape(2, 6) for ci, x in zip(c, los))
  assert lo.scale == 1.0 and lo.rank == 2
  assert rel_err(L.delta_matrix(lo), a @ b) < TOL
  exact = sum(wi * _deltas64(ad)["attn/q/kernel"] for wi, ad in zip(w, ads))
  assert rel_err(L.delta_matrix(lo), exact) > 0.05   # the cross terms


# --- ties / dare / magnitude_prune ------------------------------------------------

@pytest.mark.parametrize("method, sign_method, jit, paths", [
    ("ties", "total", True, tuple(LAYOUT)), ("ties", "total", False, ("dense/kernel",)),
    ("ties", "frequency", True, ("mlp/kernel",)), ("magnitude_prune", "total", True, ("conv/kernel",))])
def test_pruned_methods_match_reference_at_full_rank(rng, jit, method, sign_method, paths):
  layout = {p: LAYOUT[p] for p in paths}
  ads, w = _three(rng, layout), [0.9, -0.5, 1.2]
  f = lambda ads, w: A.combine(ads, w, method=method, rank=64, density=0.4,  # noqa: E731
                               majority_sign_method=sign_method)
  out = A.loras((jax.jit(f) if jit else f)(ads, jnp.asarray(w)))
  for p, (k, _, _, st) in layout.items():
    ds = [_deltas64(ad)[p] for ad in ads]
    want = _mix64(ds, w, method, len(st), density=0.4, sign_method=sign_method)
    assert rel_err(L.delta_matrix(out[p]), want) < TOL, p
    plain = sum(wi * d for wi, d in zip(w, ds))
    assert rel_err(want, plain) > 0.05, p   # pruning changed the result


def test_dare_mix_matches_reference_with_the_same_masks(rng):
  ds = [jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32) for _ in range(3)]
  w, key, density = [0.5, 1.5, -0.7], jax.random.key(7), 0.3
  def run(d, w, k):   # mix draws task i's mask with bernoulli(split(key, n)[i]): redraw them
    masks = [jax.random.bernoulli(ki, density, (2, 5, 4)) for ki in jax.random.split(k, 3)]
    return [C.mix(d, w, m, stack=1, density=density, key=k) for m in ("dare", "dare_ties")], masks
  both, masks = jax.jit(run)(ds, jnp.asarray(w), key)
  masks = np.asarray(masks)
  for method, got in zip(("dare", "dare_ties"), both):
    want = _mix64([np.asarray(d, np.float64) for d in ds], w, method, 1, density=density,
                  masks=list(masks))
    assert rel_err(got, want) < 1e-6, method
  assert 0.1 < np.mean(masks) < 0.5


def test_dare_through_combine_drops_and_rescales(rng):
  ad = _adapter(rng, 2, 4.0, layout=DENSE)
  d = _deltas64(ad)["dense/kernel"]
  out = A.combine([ad], [2.0], method="dare", rank=5, density=0.5, key=jax.random.key(3))
  got = np.asarray(L.delta_matrix(A.loras(out)["dense/kernel"]), np.float64)
  kept = np.abs(got) > 1e-4 * np.abs(d).max()
  assert 0.2 < kept.mean() < 0.8
  np.testing.assert_allclose(got[kept], 2.0 * d[kept] / 0.5, rtol=1e-4)
  np.testing.assert_allclose(got[~kept], 0.0, atol=1e-4 * np.abs(d).max())
  again = A.combine([ad], [2.0], method="dare", rank=5, density=0.5, key=jax.random.key(3))
  other = A.combine([ad], [2.0], method="dare", rank=5, density=0.5, key=jax.random.key(4))
  lo1, lo2, lo3 = (A.loras(x)["dense/kernel"] for x in (out, again, other))
  np.testing.assert_array_equal(np.asarray(L.delta_matrix(lo1)), np.asarray(L.delta_matrix(lo2)))
  assert rel_err(L.delta_matrix(lo3), L.delta_matrix(lo1)) > 0.1


# --- cross-checks against PEFT -----------------------------------------------------

@pytest.mark.parametrize("name", ["task_arithmetic", "magnitude_prune", "ties_total", "ties_frequency",
                                  "dare_linear", "dare_ties"])
def test_mix_matches_peft_merge_utils(rng, monkeypatch, name):
  import torch
  from peft.utils import merge_utils as M

  ds = [rng.standard_normal((7, 6)).astype(np.float32) for _ in range(3)]
  w, density, key = [0.6, -1.1, 0.9], 0.45, jax.random.key(11)
  method = {"task_arithmetic": "svd", "magnitude_prune": "magnitude_prune", "ties_total": "ties",
            "ties_frequency": "ties", "dare_linear": "dare", "dare_ties": "dare_ties"}[name]
  sign = "frequency" if name == "ties_frequency" else "total"
  ours = C.mix([jnp.asarray(d) for d in ds], jnp.asarray(w), method, density=density, key=key,
               majority_sign_method=sign)
  # PEFT draws DARE's masks with torch.bernoulli, one call per task in order: feed it ours.
  masks = iter(torch.tensor(np.asarray(jax.random.bernoulli(k, density, (7, 6))), dtype=torch.float32)
               for k in jax.random.split(key, 3))
  monkeypatch.setattr(torch, "bernoulli", lambda x: next(masks))
  tt, tw = [torch.tensor(d) for d in ds], torch.tensor(w)
  theirs = {"task_arithmetic": lambda: M.task_arithmetic(tt, tw),
            "magnitude_prune": lambda: M.magnitude_prune(tt, tw, density),
            "ties_total": lambda: M.ties(tt, tw, density, "total"),
            "ties_frequency": lambda: M.ties(tt, tw, density, "frequency"),
            "dare_linear": lambda: M.dare_linear(tt, tw, density),
            "dare_ties": lambda: M.dare_ties(tt, tw, density, "total")}[name]()
  assert rel_err(ours, theirs.numpy()) < 1e-6


def test_combine_matches_peft_add_weighted_adapter(rng):
  import peft
  import torch
  from torch import nn

  torch.manual_seed(0)
  model = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 6))
  pm = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=4, target_modules=["0", "1"]),
                           adapter_name="x")
  pm.add_adapter("y", peft.LoraConfig(r=3, lora_alpha=9, target_modules=["0", "1"]))
  ours = [{}, {}]
  with torch.no_grad():
    for i, name in enumerate(("x", "y")):
      for m in ("0", "1"):
        lin = pm.base_model.model.get_submodule(m)
        for ab in (lin.lora_A[name], lin.lora_B[name]):
          ab.weight.copy_(torch.tensor(rng.standard_normal(tuple(ab.weight.shape)) / 2))
        ours[i][m] = {"kernel": L.LoRA(a=jnp.asarray(lin.lora_A[name].weight.numpy().T),
                                       b=jnp.asarray(lin.lora_B[name].weight.numpy().T),
                                       alpha=(4.0, 9.0)[i], rank=3)}
  w = [0.7, -0.4]
  runs = {"cat": ("cat", {}), "linear": ("linear", {}), "svd": ("svd", dict(rank=2)),
          "ties_svd": ("ties", dict(rank=5, density=0.5)),
          "magnitude_prune_svd": ("magnitude_prune", dict(rank=5, density=0.3))}
  for peft_name, (method, kw) in runs.items():
    pm.add_weighted_adapter(["x", "y"], w, f"m_{peft_name}", combination_type=peft_name,
                            svd_rank=kw.get("rank"), density=kw.get("density"))
    got = A.combine(ours, w, method=method, **kw)
    for m in ("0", "1"):
      theirs = pm.base_model.model.get_submodule(m).get_delta_weight(f"m_{peft_name}").detach().numpy().T
      assert rel_err(L.delta_matrix(got[m]["kernel"]), theirs) < 2e-5, (peft_name, m)


# --- errors --------------------------------------------------------------------------

def test_combine_errors(rng):
  a1, a2 = _adapter(rng, 2, 4.0), _adapter(rng, 3, 4.0)
  with pytest.raises(ValueError, match="method must be one of"):
    A.combine([a1, a2], method="mean")
  with pytest.raises(TypeError, match="non-empty list"):
    A.combine([])
  with pytest.raises(ValueError, match="3 weights for 2 adapters"):
    A.combine([a1, a2], [1, 2, 3])
  less = {k: v for k, v in a2.items() if k != "conv"}
  with pytest.raises(ValueError, match=r"path 'conv/kernel' is in adapter 0 but not in adapter 1"):
    A.combine([a1, less])
  other = _adapter(rng, 2, 4.0, layout={**LAYOUT, "dense/kernel": ((6, 3), (0,), (1,), ())})
  with pytest.raises(ValueError, match=r"adapter 1 at 'dense/kernel' adapts a kernel of \[6, 3\].*\[6, 5\]"):
    A.combine([a1, other])
  with pytest.raises(ValueError, match=r"'linear' needs the same rank .* 'attn/q/kernel' the ranks are \[2, 3\]"):
    A.combine([a1, a2], method="linear")
  with pytest.raises(ValueError, match=r"needs density in \[0, 1\], got None"):
    A.combine([a1, a2], method="ties")
  with pytest.raises(ValueError, match=r"needs density in \(0, 1\]"):
    A.combine([a1, a2], method="dare", density=0.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs key="):
    A.combine([a1, a2], method="dare_ties", density=0.5)
  with pytest.raises(ValueError, match="density is only used by"):
    A.combine([a1, a2], method="cat", density=0.5)
  with pytest.raises(ValueError, match=r"rank must be a positive int, got 0 \(at 'attn/q/kernel'\)"):
    A.combine([a1, a2], method="svd", rank=0)
  with pytest.raises(ValueError, match="majority_sign_method must be one of"):
    A.combine([a1, a2], method="ties", density=0.5, majority_sign_method="mode")
  dora = jax.tree.map(lambda lo: lo.replace(magnitude=jnp.ones(lo.stack_dims + lo.out_dims)), a2,
                      is_leaf=lambda x: isinstance(x, L.LoRA))
  with pytest.raises(ValueError, match=r"adapter 1 at '.*' is a DoRA adapter"):
    A.combine([a1, dora])


def test_scale_and_combine_name_a_node_that_is_not_lora():
  from jlora.methods.ia3 import IA3
  ad = {"d": {"kernel": IA3(out=jnp.ones(4))}}
  with pytest.raises(jlora.AdapterError, match="scale works on LoRA adapters; 'd/kernel' is a IA3"):
    jlora.negate(ad)
  with pytest.raises(jlora.AdapterError, match="combine works on LoRA adapters; 'd/kernel'"):
    jlora.combine([ad, ad])
