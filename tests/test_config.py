"""jlora.config: LoraConfig validation, target matching, rank/alpha patterns."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import adapter as A
from jlora.config import ALL_LINEAR, LoraConfig, scale_of


@pytest.mark.parametrize("kw, msg", [
    (dict(alpha=0), "alpha must be positive, got 0"),
    (dict(alpha=-2.0), "alpha must be positive"),
    (dict(alpha=float("nan")), "alpha must be positive"),
    (dict(rank=0), "rank must be a positive int"),
    (dict(rank=2.5), "rank must be a positive int"),
    (dict(rank=True), "rank must be a positive int"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\] must be positive"),
    (dict(targets="(q_proj"), r"targets: pattern '\(q_proj' does not compile"),
    (dict(rank_pattern={"[a-": 2}), r"rank_pattern: pattern '\[a-' does not compile"),
    (dict(alpha_pattern={"*x": 2}), "alpha_pattern: pattern .* does not compile"),
    (dict(exclude="a)"), "exclude: pattern .* does not compile"),
    (dict(targets=[]), "targets is empty"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(init="lecun"), "init must be one of"),
])
def test_invalid_configs_raise(kw, msg):
  with pytest.raises(ValueError, match=msg):
    LoraConfig(**kw)


def test_config_is_frozen_keyword_only_and_hashable():
  cfg = LoraConfig(rank=4, targets=["q_proj"], rank_pattern={"v_proj": 2})
  with pytest.raises(Exception):
    cfg.rank = 8
  with pytest.raises(TypeError):
    LoraConfig(4)
  same = LoraConfig(rank=4, targets=["q_proj"], rank_pattern={"v_proj": 2})
  assert cfg == same and hash(cfg) == hash(same)
  assert hash(cfg) != hash(LoraConfig(rank=4, targets=["q_proj"], rank_pattern={"v_proj": 3}))
  # usable as a static argument of jax.jit
  f = jax.jit(lambda x, c: x * c.rank, static_argnums=1)
  assert float(f(jnp.ones(()), cfg)) == 4.0


@pytest.mark.parametrize("targets, path, ndim, kind, want", [
    (["q_proj"], "layers_0/attn/q_proj/kernel", 2, None, True),
    (["q_proj"], "layers_0/attn/qq_proj/kernel", 2, None, False),     # suffix after "/" only
    (["attn/q_proj"], "layers_0/attn/q_proj/kernel", 2, None, True),
    (["q_proj"], "layers_0/attn/q_proj/bias", 1, None, False),        # 1-D never
    (["emb"], "emb/embedding", 2, None, True),
    (["q_proj"], "layers_0/attn/q_proj/scale", 2, None, False),       # not kernel/embedding
    (r".*(q|v)_proj", "layers_0/attn/v_proj/kernel", 2, None, True),
    (r".*(q|v)_proj", "layers_0/attn/o_proj/kernel", 2, None, False),
    (r"q_proj", "layers_0/attn/q_proj/kernel", 2, None, False),       # regex is a full match
    (r".*w_extra", "blk/w_extra", 2, None, True),                     # other leaves: named in full
    (ALL_LINEAR, "mlp/up/kernel", 2, None, True),
    (ALL_LINEAR, "lm_head/kernel", 2, None, False),
    (ALL_LINEAR, "emb/embedding", 2, None, False),
    (ALL_LINEAR, "blk/kernel", 3, None, True),      # selected; init_adapter asks for model=
    (ALL_LINEAR, "blk/kernel", 3, "dense", True),
    (ALL_LINEAR, "conv/kernel", 4, "conv", False),
])
def test_matches(targets, path, ndim, kind, want):
  assert LoraConfig(targets=targets).matches(path, ndim, kind) is want


def test_exclude_removes_targets():
  cfg = LoraConfig(targets=r".*_proj", exclude=["layers_1/attn/q_proj"])
  assert cfg.matches("layers_0/attn/q_proj/kernel", 2)
  assert not cfg.matches("layers_1/attn/q_proj/kernel", 2)
  cfg = LoraConfig(targets=ALL_LINEAR, exclude=r".*mlp.*")
  assert not cfg.matches("layers_0/mlp/up/kernel", 2)


def test_resolve_first_matching_pattern_wins():
  cfg = LoraConfig(rank=8, alpha=16, rank_pattern={"q_proj": 4, "layers_1/.*": 2},
                   alpha_pattern={"proj": 3})
  assert cfg.resolve("layers_1/attn/q_proj/kernel") == (4, 16.0)   # dict order
  assert cfg.resolve("layers_1/attn/k_proj/kernel") == (2, 16.0)
  assert cfg.resolve("layers_0/attn/k_proj/kernel") == (8, 16.0)   # "proj" is not a suffix name
  assert cfg.resolve("layers_0/proj/kernel") == (8, 3.0)


def test_scale_of():
  assert scale_of(16, 32, False) == 2.0
  assert scale_of(16, 32, True) == 8.0
  assert LoraConfig(use_rslora=True).scale(4, 6) == 3.0


# --- against PEFT: same modules, ranks, alphas and scales ---------------------

NAMES = [f"layers.{i}.{blk}.{m}" for i in range(2)
         for blk, ms in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("up", "down")))
         for m in ms]
DIMS = {"q_proj": (8, 6), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (6, 8), "up": (8, 10),
        "down": (10, 8)}   # [in, out]


def _torch_model():
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, names):
      super().__init__()
      for n in names:
        setattr(self, n, nn.Linear(*DIMS[n], bias=False))

  class Layer(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn = Block(("q_proj", "k_proj", "v_proj", "o_proj"))
      self.mlp = Block(("up", "down"))

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      self.layers = nn.ModuleList([Layer(), Layer()])

  torch.manual_seed(0)
  return Model()


@pytest.mark.parametrize("targets, rslora", [(["q_proj", "v_proj", "up", "o_proj"], False),
                                             (r".*(q|v)_proj|.*mlp.(up|down)", True)])
def test_patterns_and_rslora_select_peft_ranks_and_scales(rslora, targets):
  import peft
  from peft.utils.other import get_pattern_key

  rank_pattern = {"layers.1.attn.q_proj": 2, "v_proj": 3, "1.*up": 5}
  alpha_pattern = {"o_proj": 7, "layers.0.*": 12}
  pm = peft.get_peft_model(_torch_model(), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern, use_rslora=rslora))
  theirs = {}
  for name, mod in pm.base_model.model.named_modules():
    if hasattr(mod, "scaling") and "default" in mod.scaling:
      theirs[name] = (mod.r["default"], mod.lora_alpha["default"], mod.scaling["default"])
  # jlora on the same tree, "/"-joined (the patterns have no "." that must be literal)
  params = {}
  for n in NAMES:
    node = params
    for part in n.split("."):
      node = node.setdefault(part, {})
    node["kernel"] = jax.ShapeDtypeStruct(DIMS[n.split(".")[-1]], jnp.float32)
  cfg = LoraConfig(rank=4, alpha=8, targets=targets, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, use_rslora=rslora)
  ad = A.init_adapter(jax.random.key(0), params, cfg)
  ours = {p.replace("/", ".").removesuffix(".kernel"): (lo.rank, lo.alpha, lo.scale)
          for p, lo in A.loras(ad).items()}
  assert set(ours) == set(theirs) and len(ours) >= 4
  for name, (r, alpha, s) in theirs.items():
    assert ours[name][:2] == (r, alpha), name
    assert math.isclose(ours[name][2], s, rel_tol=1e-12), name
    want = alpha / (math.sqrt(r) if rslora else r)
    assert math.isclose(s, want)
    # and PEFT's own key lookup picks the key our resolve picks
    key = get_pattern_key(list(rank_pattern), name)
    assert rank_pattern.get(key, 4) == r
    np.testing.assert_equal(cfg.resolve(name.replace(".", "/") + "/kernel"), (r, float(alpha)))
