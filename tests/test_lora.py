"""jlora.lora: the LoRA node, its initialisers, LoRA / DoRA weight math.

References are float64 NumPy (tests/lora_reference.py); tolerances are
relative Frobenius errors of float32 results: 2e-6 for one matmul and add.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_reference as ref
from conftest import rel_err
from jlora import lora as L

TOL = 2e-6


def _case_lora(rng, case, *, dora=False, rslora=False, alpha=3.0):
  """A base weight and a LoRA with random non-zero a, b (and magnitude)."""
  _, kshape, in_axes, out_axes, stack, kind, rank = case
  w = rng.standard_normal(stack + kshape).astype(np.float32)
  a = rng.standard_normal(stack + tuple(kshape[i] for i in in_axes) + (rank,)).astype(np.float32)
  b = rng.standard_normal(stack + (rank,) + tuple(kshape[i] for i in out_axes)).astype(np.float32)
  lo = L.LoRA(a=jnp.asarray(a), b=jnp.asarray(b), alpha=alpha, rank=rank, in_axes=in_axes,
              out_axes=out_axes, kind=kind, rslora=rslora)
  if dora:
    m = ref.dora_magnitude(w, a, b, lo.scale, in_axes, out_axes, len(stack))
    m = m * (1 + 0.3 * rng.uniform(size=m.shape))
    lo = lo.replace(magnitude=jnp.asarray(m, jnp.float32))
  return w, lo


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", ref.CASES, ids=ref.CASE_IDS)
def test_delta_merge_unmerge_match_reference(rng, case, jit):
  _, kshape, in_axes, out_axes, stack, _, rank = case
  w, lo = _case_lora(rng, case)
  assert lo.kernel_shape == stack + kshape
  assert lo.a.shape == stack + tuple(kshape[i] for i in in_axes) + (rank,)
  assert lo.b.shape == stack + (rank,) + tuple(kshape[i] for i in out_axes)
  want = ref.delta(lo.a, lo.b, lo.scale, in_axes, out_axes, len(stack))
  assert rel_err(_maybe_jit(L.delta, jit)(lo), want) < TOL
  merged = _maybe_jit(L.merge_weight, jit)(jnp.asarray(w), lo)
  assert merged.dtype == jnp.float32
  assert rel_err(merged, w + want) < TOL
  back = _maybe_jit(lambda m, lo: L.unmerge_weight(m, lo), jit)(merged, lo)
  bound = 4 * np.finfo(np.float32).eps * np.abs(w + want).max()
  assert np.abs(np.asarray(back) - w).max() <= bound


@pytest.mark.parametrize("case, jit", [(c, True) for c in ref.CASES] + [(ref.CASES[5], False)],
                         ids=[f"{i}-jit" for i in ref.CASE_IDS] + ["conv-eager"])
def test_dora_merge_matches_peft_formula(rng, case, jit):
  _, _, in_axes, out_axes, stack, _, _ = case
  w, lo = _case_lora(rng, case, dora=True, rslora=True)
  want = ref.dora_merge(w, lo.a, lo.b, lo.scale, lo.magnitude, in_axes, out_axes, len(stack))
  assert rel_err(_maybe_jit(L.merge_weight, jit)(jnp.asarray(w), lo), want) < TOL
  norm = _maybe_jit(L.dora_norm, jit)(jnp.asarray(w), lo)
  assert rel_err(norm, ref.dora_magnitude(w, lo.a, lo.b, lo.scale, in_axes, out_axes,
                                          len(stack))) < TOL
  with pytest.raises(ValueError, match="DoRA merge cannot be undone"):
    L.unmerge_weight(jnp.asarray(w), lo, "x/kernel")


@pytest.mark.parametrize("case", ref.CASES, ids=ref.CASE_IDS)
def test_as_matrix_roundtrip_and_grouping(rng, case):
  _, kshape, in_axes, out_axes, stack, _, _ = case
  w, lo = _case_lora(rng, case)
  m = np.asarray(L.as_matrix(jnp.asarray(w), lo))
  n_in = math.prod(kshape[i] for i in in_axes)
  assert m.shape == stack + (n_in, w.size // n_in // max(math.prod(stack), 1))
  perm = tuple(range(len(stack))) + tuple(len(stack) + i for i in in_axes + out_axes)
  np.testing.assert_array_equal(m, np.transpose(w, perm).reshape(m.shape))
  np.testing.assert_array_equal(np.asarray(L.from_matrix(jnp.asarray(m), lo)), w)


def test_scale_plain_and_rslora():
  lo = L.LoRA(a=jnp.ones((4, 16)), b=jnp.ones((16, 3)), alpha=32.0, rank=16)
  assert lo.scale == 2.0
  assert lo.replace(rslora=True).scale == 8.0


# --- initialisers (PEFT's) ---------------------------------------------------

def test_default_init_is_kaiming_uniform_on_fan_in(rng):
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 5)), jnp.float32)   # conv, fan_in 72
  lo = L.init(jax.random.key(1), w, rank=4, alpha=8, kind="conv")
  bound = 1 / math.sqrt(3 * 3 * 8)   # kaiming_uniform_(a=√5): gain √(1/3), bound √3·gain/√fan_in
  a = np.asarray(lo.a)
  assert a.shape == (3, 3, 8, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  assert abs(a.std() / (bound / math.sqrt(3)) - 1) < 0.15
  assert not np.asarray(lo.b).any()


def test_gaussian_init_std_is_one_over_rank(rng):
  w = jnp.asarray(rng.standard_normal((200, 30)), jnp.float32)
  lo = L.init(jax.random.key(2), w, rank=5, alpha=5, init="gaussian")
  assert abs(np.asarray(lo.a).std() * 5 - 1) < 0.1
  assert not np.asarray(lo.b).any()


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_embed_init_is_a_zero_b_normal(rng, init):
  w = jnp.asarray(rng.standard_normal((50, 40)), jnp.float32)
  lo = L.init(jax.random.key(3), w, rank=4, alpha=4, kind="embed", init=init)
  assert not np.asarray(lo.a).any()
  assert abs(np.asarray(lo.b).std() - 1) < 0.15


def test_zeros_init():
  lo = L.init(jax.random.key(0), jnp.ones((5, 7)), rank=2, alpha=2, init="zeros")
  assert not np.asarray(lo.a).any() and not np.asarray(lo.b).any()


@pytest.mark.parametrize("case", [ref.CASES[5], ref.CASES[6]], ids=["conv", "stacked"])
def test_pissa_is_top_r_svd_and_residual_restores_w(rng, case):
  _, kshape, in_axes, out_axes, stack, kind, rank = case
  w = rng.standard_normal(stack + kshape).astype(np.float32)
  lo = L.init(jax.random.key(0), jnp.asarray(w), rank=rank, alpha=5.0, kind=kind,
              in_axes=in_axes, out_axes=out_axes, stack=len(stack), init="pissa")
  d = ref.delta(lo.a, lo.b, lo.scale, in_axes, out_axes, len(stack))
  # s·a@b is the best rank-r approximation of W viewed as [in, out].
  m = np.asarray(L.as_matrix(jnp.asarray(w), lo), np.float64)
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  best = (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]
  assert rel_err(L.as_matrix(jnp.asarray(d), lo), best) < 1e-5
  residual = L.unmerge_weight(jnp.asarray(w), lo)
  assert rel_err(L.merge_weight(residual, lo), w) < TOL
  # a and b share the singular values equally, as PEFT's sqrt(S / scale) split.
  a2 = np.asarray(lo.a, np.float64).reshape(m.shape[:-1] + (rank,))
  b2 = np.asarray(lo.b, np.float64).reshape(stack + (rank, -1))
  np.testing.assert_allclose(np.linalg.norm(a2, axis=-2), np.linalg.norm(b2, axis=-1), rtol=1e-4)


def test_dora_magnitude_init(rng):
  w = rng.standard_normal((9, 4)).astype(np.float32)
  lo = L.init(jax.random.key(0), jnp.asarray(w), rank=2, alpha=2, use_dora=True)
  np.testing.assert_allclose(np.asarray(lo.magnitude), np.linalg.norm(w, axis=0), rtol=1e-6)
  # with PiSSA the base trained against is the residual, and ‖residual + ΔW‖ = ‖W‖.
  lo = L.init(jax.random.key(0), jnp.asarray(w), rank=2, alpha=2, use_dora=True, init="pissa")
  np.testing.assert_allclose(np.asarray(lo.magnitude), np.linalg.norm(w, axis=0), rtol=1e-5)
  residual = L.unmerge_weight(jnp.asarray(w), lo.replace(magnitude=None))
  assert rel_err(L.merge_weight(residual, lo), w) < 1e-5


def test_init_errors_name_the_path_and_shape():
  w = jnp.ones((4, 3, 2))
  with pytest.raises(ValueError, match=r"blk/kernel: rank 7 is larger .*\[4, 3, 2\].*\[4, 6\]"):
    L.init(jax.random.key(0), w, rank=7, alpha=1, path="blk/kernel")
  with pytest.raises(ValueError, match="blk/kernel: rank must be a positive int"):
    L.init(jax.random.key(0), w, rank=0, alpha=1, path="blk/kernel")
  with pytest.raises(ValueError, match="alpha must be positive"):
    L.init(jax.random.key(0), w, rank=1, alpha=0, path="blk/kernel")
  with pytest.raises(ValueError, match="must split the 3 kernel axes"):
    L.init(jax.random.key(0), w, rank=1, alpha=1, in_axes=(0,), out_axes=(1,))
  with pytest.raises(ValueError, match="unknown layer kind"):
    L.init(jax.random.key(0), w, rank=1, alpha=1, kind="lstm")


def test_check_weight_messages():
  lo = L.LoRA(a=jnp.ones((4, 2)), b=jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"'x/kernel' has a: \[4, 2\], b: \[2, 5\].*\[4, 5\].*\[4, 6\]"):
    L.check_weight((4, 6), lo, "x/kernel")
  bad = lo.replace(magnitude=jnp.ones(3))
  with pytest.raises(ValueError, match=r"magnitude of \[3\].*needs \[5\]"):
    L.check_weight((4, 5), bad, "x/kernel")


def test_lora_is_a_pytree_with_static_metadata():
  lo = L.LoRA(a=jnp.ones((4, 2)), b=jnp.ones((2, 5)), alpha=4.0, rank=2, rslora=True)
  leaves, tree = jax.tree.flatten(lo)
  assert len(leaves) == 2
  back = jax.tree.unflatten(tree, [x * 2 for x in leaves])
  assert back.scale == lo.scale and back.rslora and float(back.a[0, 0]) == 2.0


# --- cross-checks against the installed PEFT (torch, CPU) ----------------------

def _peft_model(rng, **cfg):
  import peft
  import torch
  from torch import nn

  class Tiny(nn.Module):
    def __init__(self):
      super().__init__()
      self.emb = nn.Embedding(11, 6)
      self.lin = nn.Linear(6, 5)
      self.conv = nn.Conv2d(3, 4, (3, 2))

  torch.manual_seed(int(rng.integers(1 << 30)))
  model = peft.get_peft_model(Tiny(), peft.LoraConfig(**cfg))
  return model, torch


def _t(x):
  return np.asarray(x.detach().numpy(), np.float32)


def test_dora_merge_matches_peft_merge_and_unload(rng):
  """PEFT's merged Linear / Embedding / Conv2d weights equal jlora.merge_weight."""
  pm, torch = _peft_model(rng, r=2, lora_alpha=3, target_modules=["emb", "lin", "conv"],
                          use_dora=True, use_rslora=True)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:   # random non-zero A, B; magnitudes perturbed, positive
        v = rng.standard_normal(tuple(p.shape))
        p.copy_(torch.tensor(np.abs(v) + 0.5 if "magnitude" in name else v))
  mods = {n: pm.base_model.model.get_submodule(n) for n in ("emb", "lin", "conv")}
  w = {n: _t(m.base_layer.weight) for n, m in mods.items()}
  mag = {n: _t(m.lora_magnitude_vector["default"].weight).reshape(-1) for n, m in mods.items()}
  lin, emb, conv = mods["lin"], mods["emb"], mods["conv"]
  meta = dict(alpha=3.0, rank=2, rslora=True)
  ours = {
      "lin": (w["lin"].T, L.LoRA(a=_t(lin.lora_A["default"].weight).T,
                                 b=_t(lin.lora_B["default"].weight).T, magnitude=mag["lin"], **meta)),
      "emb": (w["emb"], L.LoRA(a=_t(emb.lora_embedding_A["default"]).T,
                               b=_t(emb.lora_embedding_B["default"]).T, magnitude=mag["emb"],
                               kind="embed", **meta)),
      # torch conv [cout, cin, kh, kw] -> flax [kh, kw, cin, cout]; lora_B is a 1x1 conv.
      "conv": (w["conv"].transpose(2, 3, 1, 0),
               L.LoRA(a=_t(conv.lora_A["default"].weight).transpose(2, 3, 1, 0),
                      b=_t(conv.lora_B["default"].weight)[:, :, 0, 0].T, magnitude=mag["conv"],
                      in_axes=(0, 1, 2), out_axes=(3,), kind="conv", **meta)),
  }
  merged = pm.merge_and_unload()
  want = {"lin": _t(merged.lin.weight).T, "emb": _t(merged.emb.weight),
          "conv": _t(merged.conv.weight).transpose(2, 3, 1, 0)}
  for name, (kernel, lo) in ours.items():
    lo = jax.tree.map(jnp.asarray, lo)
    assert rel_err(L.merge_weight(jnp.asarray(kernel), lo), want[name]) < 1e-5, name
    assert rel_err(L.merge_weight(jnp.asarray(kernel), lo), kernel) > 1e-2, name  # it did change


def test_pissa_matches_peft_pissa(rng):
  pm, torch = _peft_model(rng, r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights="pissa")
  lin = pm.base_model.model.lin
  peft_delta = lin.scaling["default"] * _t(lin.lora_B["default"].weight @ lin.lora_A["default"].weight).T
  residual = _t(lin.base_layer.weight).T
  w = residual + peft_delta   # the original kernel, up to PEFT's float32 rounding
  lo = L.init(jax.random.key(0), jnp.asarray(w), rank=2, alpha=4, init="pissa")
  assert rel_err(L.delta(lo), peft_delta) < 1e-5
  assert rel_err(L.unmerge_weight(jnp.asarray(w), lo), residual) < 1e-5
  # same split of the singular values between the factors (up to sign): ‖a_j‖ = ‖B_j‖
  np.testing.assert_allclose(np.linalg.norm(np.asarray(lo.a), axis=0),
                             np.linalg.norm(_t(lin.lora_A["default"].weight), axis=1), rtol=1e-4)
