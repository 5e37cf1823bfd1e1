"""Loading Hugging Face checkpoints into the reference model, against transformers on CPU.

Tiny random transformers models are saved with ``save_pretrained`` (no
downloads) and loaded with ``jlora.interop.from_hf``; logits must match
PyTorch's to 1e-5 relative in float32.
"""
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from jlora import paths  # noqa: E402
from jlora.interop import from_hf, to_hf  # noqa: E402
from jlora.interop.hf import config_from_hf, flax_path, hf_name  # noqa: E402
from jlora.sharding import make_mesh  # noqa: E402

TOL = 1e-5
SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                          high_freq_factor=2.0, original_max_position_embeddings=8))),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(   # layer 1 slides
        tie_word_embeddings=True, rope_theta=1000.0, use_sliding_window=True, sliding_window=3,
        max_window_layers=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        sliding_window=3, head_dim=16)),
}


def _randomize(model, seed):
  """Non-trivial weights everywhere: norm scales around 1, biases, kernels ~ 1/sqrt(in)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      else:
        p.copy_(noise / p.shape[-1] ** 0.5)


def _save(kind, directory, **save_kw):
  cfg_cls, model_cls, extra = MODELS[kind]
  cfg = cfg_cls(**SIZES, **extra)
  model = model_cls(cfg).eval()
  model.set_attn_implementation("eager")
  _randomize(model, seed=len(kind))
  model.save_pretrained(directory, **save_kw)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{kind: (torch model, directory)}; llama also sharded (5 files + index)."""
  root = tmp_path_factory.mktemp("hf")
  out = {k: (_save(k, root / k), root / k) for k in MODELS}
  shutil.copytree(root / "llama", root / "llama_single")
  model = transformers.LlamaForCausalLM.from_pretrained(root / "llama")
  model.save_pretrained(root / "llama_sharded", max_shard_size="20KB")
  out["llama_sharded"] = (out["llama"][0], root / "llama_sharded")
  return out


def _torch_logits(model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else dict(attention_mask=torch.tensor(mask))
    return model(torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


@pytest.fixture(scope="module")
def ids():
  return jnp.asarray(np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 7)), jnp.int32)


@pytest.mark.parametrize("kind", ["llama", "llama_sharded", "qwen2", "mistral"])
def test_logits_match_transformers(kind, checkpoints, ids):
  torch_model, directory = checkpoints[kind]
  if kind == "llama_sharded":
    assert (directory / "model.safetensors.index.json").exists()
    assert len(list(directory.glob("model-*.safetensors"))) > 2
  model, params = from_hf(directory, jnp.float32)
  assert params["embed_tokens"]["embedding"].dtype == jnp.float32
  logits = jax.jit(model.apply)({"params": params}, ids)
  assert rel_err(logits, _torch_logits(torch_model, ids)) < TOL


def test_config_mapping(checkpoints):
  qwen = json.loads((checkpoints["qwen2"][1] / "config.json").read_text())
  cfg = config_from_hf(qwen)
  assert (cfg.qkv_bias, cfg.o_bias, cfg.tie_word_embeddings) == (True, False, True)
  assert cfg.sliding_layers == (False, True) and cfg.sliding_window == 3
  llama = config_from_hf(json.loads((checkpoints["llama"][1] / "config.json").read_text()))
  assert llama.rope_scaling.kind == "llama3" and llama.rope_scaling.factor == 4.0
  assert llama.rope_theta == 500.0 and llama.rms_norm_eps == 1e-5
  # the transformers 4 layout (rope_theta / rope_scaling at the top) reads the same
  v4 = dict(SIZES, model_type="llama", rope_theta=500.0, rms_norm_eps=1e-5,
            rope_scaling=dict(MODELS["llama"][2]["rope_scaling"]))
  assert config_from_hf(v4) == llama
  assert config_from_hf(json.loads(
      (checkpoints["mistral"][1] / "config.json").read_text())).sliding_window == 3


def test_padding_matches_transformers(checkpoints, ids):
  torch_model, directory = checkpoints["llama"]
  model, params = from_hf(directory)
  mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, jnp.asarray(mask)))
  theirs = _torch_logits(torch_model, ids, mask)
  assert rel_err(ours[0], theirs[0]) < TOL and rel_err(ours[1, :5], theirs[1, :5]) < TOL


def test_scanned_sharded_quantize_hook(checkpoints, ids):
  torch_model, directory = checkpoints["llama_sharded"]
  seen = []
  def hook(path, x):
    seen.append((path, x.shape))
    return x
  mesh = make_mesh(fsdp=2, tensor=4)
  model, params = from_hf(directory, scan_layers=True, shardings=mesh, quantize=hook)
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (2, 32, 32) and q.sharding.spec == P(None, "fsdp", "tensor")
  assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert sorted(p for p, _ in seen) == sorted(paths.flatten(params))
  assert dict(seen)["layers/mlp/down_proj/kernel"] == (2, 48, 32)
  logits = jax.jit(model.apply)({"params": params}, ids)
  assert rel_err(logits, _torch_logits(torch_model, ids)) < TOL
  # a callable placing everything on one device, and bfloat16
  one = NamedSharding(mesh, P())
  _, p16 = from_hf(directory, jnp.bfloat16, shardings=lambda path, spec: one)
  assert p16["layers_1"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  assert p16["norm"]["scale"].sharding == one


def test_to_hf_round_trip(checkpoints, ids, tmp_path):
  torch_model, directory = checkpoints["qwen2"]
  model, params = from_hf(directory, scan_layers=True)
  files = to_hf(tmp_path / "out", model.config, params, max_shard_size=16_000)
  assert "model.safetensors.index.json" in files and "config.json" in files
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  reloaded.set_attn_implementation("eager")
  assert rel_err(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids)) < 1e-6
  _, again = from_hf(tmp_path / "out", scan_layers=True)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_names():
  for path, layer in [("layers_1/mlp/gate_proj/kernel", None), ("norm/scale", None),
                      ("layers/self_attn/k_proj/bias", 1), ("lm_head/kernel", None),
                      ("embed_tokens/embedding", None), ("layers/input_layernorm/scale", 0)]:
    assert flax_path(hf_name(path, layer), scan_layers=layer is not None) == (path, layer)
  assert hf_name("layers/input_layernorm/scale", 0) == "model.layers.0.input_layernorm.weight"


# ----------------------------------------------------------------------------- malformed inputs

def _copy(checkpoints, tmp_path, kind="llama"):
  dst = tmp_path / "ckpt"
  shutil.copytree(checkpoints[kind][1], dst)
  return dst


def _header(path):
  raw = path.read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data):
  hb = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_truncated_file(checkpoints, tmp_path):
  d = _copy(checkpoints, tmp_path)
  f = d / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors"):
    from_hf(d)


def test_header_lies_about_sizes(checkpoints, tmp_path):
  d = _copy(checkpoints, tmp_path)
  header, data = _header(d / "model.safetensors")
  header["model.norm.weight"]["shape"] = [64]
  _write(d / "model.safetensors", header, data)
  with pytest.raises(ValueError, match="not a valid safetensors"):
    from_hf(d)


def test_missing_unexpected_and_misshapen_tensors(checkpoints, tmp_path):
  d = _copy(checkpoints, tmp_path)
  header, data = _header(d / "model.safetensors")
  good = dict(header)
  header["model.layers.1.mlp.up_projection.weight"] = header.pop("model.layers.1.mlp.up_proj.weight")
  _write(d / "model.safetensors", header, data)
  with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    from_hf(d)
  cfg = json.loads((d / "config.json").read_text())
  json.dump(dict(cfg, num_hidden_layers=1), open(d / "config.json", "w"))
  _write(d / "model.safetensors", good, data)
  with pytest.raises(ValueError, match=r"config\.json declares 1 layers but the checkpoint's "
                     r"tensors are for 2"):   # checked before a model of that size is traced
    from_hf(d)
  json.dump(dict(cfg, intermediate_size=40), open(d / "config.json", "w"))
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' in "
                     r".*model\.safetensors has shape \[32, 48\], but config\.json implies"):
    from_hf(d)


def test_unsupported_inputs(checkpoints, tmp_path):
  d = _copy(checkpoints, tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  json.dump(dict(cfg, model_type="falcon"), open(d / "config.json", "w"))
  with pytest.raises(ValueError, match=r"config\.json: model_type 'falcon' is not supported"):
    from_hf(d)
  json.dump(dict(cfg, rope_parameters=dict(rope_type="yarn", factor=2.0)),
            open(d / "config.json", "w"))
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    from_hf(d)
  json.dump(cfg, open(d / "config.json", "w"))
  os.rename(d / "model.safetensors", d / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="pickle checkpoints are never loaded"):
    from_hf(d)


def test_sharded_index_errors(checkpoints, tmp_path):
  d = _copy(checkpoints, tmp_path, "llama_sharded")
  index = json.loads((d / "model.safetensors.index.json").read_text())
  wmap = index["weight_map"]
  first = sorted(set(wmap.values()))[0]
  other = next(n for n, f in wmap.items() if f != first)
  json.dump(dict(index, weight_map=dict(wmap, **{other: first})),
            open(d / "model.safetensors.index.json", "w"))
  with pytest.raises(ValueError, match=f"maps tensor '{other}' to {first}, which does not"):
    from_hf(d)
  os.remove(d / first)
  json.dump(index, open(d / "model.safetensors.index.json", "w"))
  with pytest.raises(FileNotFoundError, match=f"{first} does not exist"):
    from_hf(d)


def test_quantize_while_loading(checkpoints, ids, tmp_path):
  import jlora
  _, directory = checkpoints["llama"]
  model, qparams = from_hf(directory, scan_layers=True, quantize=dict(scheme="nf4", min_size=0))
  _, plain = from_hf(directory, scan_layers=True)
  whole = jlora.quantize(plain, "nf4", min_size=0)      # the same as quantizing afterwards
  assert jax.tree.structure(whole) == jax.tree.structure(qparams)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(a, b)
  q = qparams["layers"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(q, jlora.QArray) and q.shape == (2, 32, 48)
  assert not isinstance(qparams["lm_head"]["kernel"], jlora.QArray)   # heads stay (PEFT's rule)
  # the quantized base runs through jlora.apply; to_hf writes it dequantized
  deq = jlora.dequantize(qparams)
  q_proj = deq["layers"]["self_attn"]["q_proj"]["kernel"]         # [2, 32, 32]
  lora = jlora.LoRA(a=0.1 * jnp.ones((2, 32, 2)), b=0.1 * jnp.ones((2, 2, 32)), alpha=2.0,
                    rank=2)
  adapter = {"layers": {"self_attn": {"q_proj": {"kernel": lora}}}}
  assert q_proj.shape == lora.kernel_shape
  ours = jax.jit(lambda p, a: jlora.apply(model, {"params": p}, a, ids))(qparams, adapter)
  ref = jax.jit(model.apply)({"params": jlora.merge(deq, adapter)}, ids)
  assert rel_err(ours, ref) < 1e-5
  to_hf(tmp_path / "deq", model.config, qparams)
  _, back = from_hf(tmp_path / "deq", scan_layers=True)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(deq)):
    np.testing.assert_array_equal(a, b)


def test_progress_bar_is_optional(checkpoints, capsys, monkeypatch):
  import sys
  _, directory = checkpoints["llama"]
  from_hf(directory, progress=True)
  assert "loading llama" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, "tqdm", None)       # tqdm not installed: no bar, no error
  _, params = from_hf(directory, progress=True)
  assert capsys.readouterr().err == "" and params["norm"]["scale"].shape == (32,)
