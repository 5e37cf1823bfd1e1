"""PEFT adapters in and out, checked against the installed PEFT on a tiny random Llama.

Tolerances: merged weights to 1e-6 relative (float32, one matmul), logits to
1e-5 relative (float32 through two decoder layers).
"""
import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

import jlora  # noqa: E402
from jlora import paths  # noqa: E402
from jlora.interop import peft as jpeft  # noqa: E402
from conftest import rel_err  # noqa: E402

N_LAYERS = 2


def _torch_model(seed=0):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 tie_word_embeddings=False)
  return transformers.LlamaForCausalLM(cfg).float().eval()


def params_from_torch(model, scanned=False):
  """jlora param tree from a torch state dict (Dense kernels are W.T)."""
  flat = {}
  for key, w in model.state_dict().items():
    w = w.detach().numpy().astype(np.float32)
    name = key[len("model."):] if key.startswith("model.") else key
    mod, _, leaf = name.rpartition(".")
    mod = mod.replace("layers.", "layers_", 1).replace(".", "/")
    if mod == "embed_tokens":
      flat["embed_tokens/embedding"] = w
    elif w.ndim == 2:
      flat[f"{mod}/kernel"] = w.T
    else:
      flat[f"{mod}/scale"] = w
  flat = {k: jnp.asarray(v) for k, v in flat.items()}
  if scanned:
    flat = _scan(flat)
  return paths.unflatten(flat)


def _scan(flat):
  out, stacks = {}, {}
  for k, v in flat.items():
    first, _, rest = k.partition("/")
    if first.startswith("layers_"):
      stacks.setdefault(rest, {})[int(first[len("layers_"):])] = v
    else:
      out[k] = v
  for rest, by_i in stacks.items():
    out[f"layers/{rest}"] = jnp.stack([by_i[i] for i in range(N_LAYERS)])
  return out


def _randomize(peft_model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name and "magnitude" not in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
      elif "lora_magnitude_vector" in name:
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


PEFT_CONFIGS = {
    # plain LoRA, list targets, a portable rank pattern and a dotted alpha pattern
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"],
                  rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    # rsLoRA + DoRA, a regex target including the embedding and the head
    "dora": dict(r=4, lora_alpha=6, use_rslora=True, use_dora=True,
                 target_modules=r".*\.(q_proj|down_proj|embed_tokens)|lm_head",
                 rank_pattern={"down_proj": 3}, alpha_pattern={"lm_head": 2}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """The tiny random Llama, saved with save_pretrained, and its jlora params."""
  model = _torch_model()
  d = tmp_path_factory.mktemp("llama")
  model.save_pretrained(d)
  return d, model


@pytest.fixture(scope="module", params=sorted(PEFT_CONFIGS))
def peft_dir(request, base, tmp_path_factory):
  """A PEFT adapter with random non-zero A, B (and perturbed DoRA magnitudes)."""
  name = request.param
  model = copy.deepcopy(base[1])
  pm = peft.get_peft_model(model, peft.LoraConfig(**PEFT_CONFIGS[name]))
  _randomize(pm, seed=len(name))
  pm.eval()
  d = tmp_path_factory.mktemp(f"peft_{name}")
  pm.save_pretrained(d)
  return name, d, pm


def _peft_layers(pm):
  from peft.tuners.lora import LoraLayer
  return {n[len("base_model.model."):]: m for n, m in pm.named_modules()
          if isinstance(m, LoraLayer)}


def test_names_round_trip():
  for path in ["layers_1/self_attn/q_proj/kernel", "embed_tokens/embedding", "lm_head/kernel",
               "layers_0/mlp/down_proj/kernel"]:
    hf = jpeft.hf_module_name(path)
    assert jpeft.jlora_param_path(hf, path.rpartition("/")[2]) == (path, None)
  assert jpeft.hf_module_name("layers/mlp/up_proj/kernel", 1) == "model.layers.1.mlp.up_proj"
  assert jpeft.jlora_param_path("model.layers.1.mlp.up_proj", "kernel", scanned=True) == (
      "layers/mlp/up_proj/kernel", 1)


def test_load_layouts_ranks_and_scales(peft_dir, base):
  """a = lora_A.T, b = lora_B.T (embeddings too), magnitudes as saved; every
  module's rank and scale equal PEFT's own."""
  _, d, pm = peft_dir
  params = params_from_torch(base[1])
  adapter, cfg = jlora.peft.load(d, params)
  ads = jlora.adapter.loras(adapter)
  raw = load_file(os.path.join(d, "adapter_model.safetensors"))
  layers = _peft_layers(pm)
  assert len(ads) == len(layers)
  for name, layer in layers.items():
    path, _ = jpeft.jlora_param_path(name, "embedding" if "embed" in name else "kernel")
    lo = ads[path]
    assert lo.rank == layer.r["default"] and lo.scale == pytest.approx(layer.scaling["default"])
    stem = f"base_model.model.{name}."
    if "embed" in name:
      A, B = raw[stem + "lora_embedding_A"], raw[stem + "lora_embedding_B"]
      assert lo.kind == "embed"
    else:
      A, B = raw[stem + "lora_A.weight"], raw[stem + "lora_B.weight"]
    np.testing.assert_array_equal(np.asarray(lo.a), A.T)
    np.testing.assert_array_equal(np.asarray(lo.b), B.T)
    assert np.abs(A).min() > 0 and np.abs(B).min() > 0
    if lo.use_dora:
      np.testing.assert_array_equal(np.asarray(lo.magnitude), raw[stem + "lora_magnitude_vector"])
    assert cfg.resolve(path) == (lo.rank, lo.alpha)
    assert cfg.matches(path, 2, lo.kind)


def _merged_torch(pm):
  merged = copy.deepcopy(pm).merge_and_unload()
  return params_from_torch(merged)


@pytest.mark.parametrize("jit", [False, True])
def test_merge_equals_peft_merge_and_unload(peft_dir, base, jit):
  _, d, pm = peft_dir
  params = params_from_torch(base[1])
  adapter, _ = jlora.peft.load(d, params)
  merge = jax.jit(jlora.merge) if jit else jlora.merge
  ours = paths.flatten(merge(params, adapter))
  ref = paths.flatten(_merged_torch(pm))
  assert ours.keys() == ref.keys()
  changed = 0
  for k in ref:
    assert rel_err(ours[k], ref[k]) < 1e-6, k
    changed += not np.array_equal(np.asarray(params_flat(params)[k]), np.asarray(ref[k]))
  assert changed == len(jlora.adapter.loras(adapter))


def params_flat(params):
  return paths.flatten(params)
