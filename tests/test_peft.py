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


@pytest.fixture(scope="module")
def hf(base):
  """The base loaded by jlora.interop.from_hf: (model, params), unscanned and scanned."""
  return {scan: jlora.interop.from_hf(base[0], scan_layers=scan) for scan in (False, True)}


IDS = np.random.default_rng(0).integers(0, 128, (2, 7))


def _jlora_logits(model, params, adapter):
  run = jax.jit(lambda p, a, x: jlora.apply(model, {"params": p}, a, x))
  return np.asarray(run(params, adapter, jnp.asarray(IDS)))


def _peft_logits(pm):
  with torch.no_grad():
    return pm(input_ids=torch.tensor(IDS)).logits.numpy()


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


def test_logits_match_peft(peft_dir, hf):
  """A PEFT adapter loaded into jlora gives PEFT's logits (to 1e-5), on the base
  loaded by from_hf, scanned or not (the per-layer alpha of "plain" cannot be
  one stacked LoRA: see test_scanned_params)."""
  name, d, pm = peft_dir
  want = _peft_logits(pm)
  for scan in (False, True) if name != "plain" else (False,):
    model, params = hf[scan]
    adapter, _ = jlora.peft.load(d, params, model=model, args=(jnp.zeros((1, 3), jnp.int32),))
    got = _jlora_logits(model, params, adapter)
    assert rel_err(got, want) < 1e-5, scan
  assert rel_err(np.asarray(model.apply({"params": params}, jnp.asarray(IDS))), want) > 1e-2


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


def test_scanned_params(peft_dir, base):
  """Scanned params ([L, ...] stacks): layer i of PEFT is index i of a/b; a
  per-layer alpha (the "plain" adapter's) cannot be one stacked LoRA and is
  refused by name."""
  name, d, pm = peft_dir
  scanned = params_from_torch(base[1], scanned=True)
  if name == "plain":
    with pytest.raises(ValueError, match=r"'layers/self_attn/q_proj/kernel'.*different \(rank, alpha\)"):
      jlora.peft.load(d, scanned)
    return
  flat_ads = jlora.adapter.loras(jlora.peft.load(d, params_from_torch(base[1]))[0])
  adapter, cfg = jlora.peft.load(d, scanned)
  n_stacked = 0
  for path, lo in jlora.adapter.loras(adapter).items():
    if not path.startswith("layers/"):
      continue
    n_stacked += 1
    assert lo.stack == 1 and lo.a.shape[0] == N_LAYERS
    for i in range(N_LAYERS):
      one = flat_ads[path.replace("layers/", f"layers_{i}/")]
      np.testing.assert_array_equal(np.asarray(lo.a[i]), np.asarray(one.a))
      np.testing.assert_array_equal(np.asarray(lo.b[i]), np.asarray(one.b))
      np.testing.assert_array_equal(np.asarray(lo.magnitude[i]), np.asarray(one.magnitude))
  assert n_stacked == 2
  ours = paths.flatten(jax.jit(jlora.merge)(scanned, adapter))
  ref = paths.flatten(params_from_torch(copy.deepcopy(pm).merge_and_unload(), scanned=True))
  for k in ref:
    assert rel_err(ours[k], ref[k]) < 1e-6, k


def _lora_tensors(d):
  return {k: v for k, v in load_file(os.path.join(d, "adapter_model.safetensors")).items()
          if ".base_layer." not in k}


def test_save_reproduces_peft_file_and_loads_in_peft(peft_dir, base, tmp_path):
  """load -> save writes PEFT's tensors bit for bit; PeftModel.from_pretrained
  on it computes what the original PEFT model computes."""
  name, d, pm = peft_dir
  for scanned in (False, True):
    if scanned and name == "plain":
      continue
    adapter, cfg = jlora.peft.load(d, params_from_torch(base[1], scanned=scanned))
    out = tmp_path / f"out_{scanned}"
    jlora.peft.save(out, adapter, cfg, base_model_name_or_path="tiny-llama")
    ours, ref = _lora_tensors(out), _lora_tensors(d)
    assert ours.keys() == ref.keys()
    for k in ref:
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(base[1]), out).eval()
  ids = torch.tensor(np.random.default_rng(0).integers(0, 128, (2, 7)))
  with torch.no_grad():
    want, got = pm(input_ids=ids).logits.numpy(), back(input_ids=ids).logits.numpy()
  assert rel_err(got, want) < 1e-6
  for n, layer in _peft_layers(back).items():
    assert layer.scaling["default"] == pytest.approx(_peft_layers(pm)[n].scaling["default"])


JLORA_CONFIGS = {
    "plain": jlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"],
                              rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 5}),
    "dora": jlora.LoraConfig(rank=3, alpha=5, use_rslora=True, use_dora=True,
                             targets=r".*(k_proj|o_proj|embed_tokens|lm_head)",
                             rank_pattern={"layers_1/self_attn/k_proj": 2}),
}


def _trained(params, cfg, seed):
  """A jlora adapter for ``cfg`` with random non-zero a, b and DoRA magnitudes
  ‖W + ΔW‖ perturbed, as after training (built in NumPy: no compilation)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, w in paths.flatten(params).items():
    kind = "embed" if path.endswith("embedding") else "dense"
    if not cfg.matches(path, w.ndim, kind):
      continue
    rank, alpha = cfg.resolve(path)
    lo = jlora.LoRA(a=rng.normal(size=(w.shape[0], rank)).astype(np.float32) * 0.2,
                    b=rng.normal(size=(rank, w.shape[1])).astype(np.float32) * 0.2,
                    alpha=alpha, rank=rank, kind=kind, rslora=cfg.use_rslora)
    if cfg.use_dora:
      norm = np.linalg.norm(np.asarray(w) + lo.scale * lo.a @ lo.b, axis=0)
      lo = lo.replace(magnitude=norm * (1 + 0.2 * rng.normal(size=norm.shape)).astype(np.float32))
    out[path] = jax.tree.map(jnp.asarray, lo)
  return paths.unflatten(out)


@pytest.mark.parametrize("which", sorted(JLORA_CONFIGS))
def test_jlora_adapter_loads_in_peft(which, base, hf, tmp_path):
  """An adapter made in jlora, saved with jlora.peft.save, loads in PEFT: PEFT's
  logits equal jlora.apply's, PEFT's merge_and_unload equals jlora.merge at
  every weight, and loading it back gives the same adapter and config."""
  cfg = JLORA_CONFIGS[which]
  params = params_from_torch(base[1])
  adapter = _trained(params, cfg, seed=len(which))
  jlora.peft.save(tmp_path, adapter, cfg)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  back = peft.PeftModel.from_pretrained(copy.deepcopy(base[1]), tmp_path).eval()
  assert len(_peft_layers(back)) == len(jlora.adapter.loras(adapter))
  back_logits = _peft_logits(back)
  ref = paths.flatten(params_from_torch(back.merge_and_unload()))
  ours = paths.flatten(jax.jit(jlora.merge)(params, adapter))
  for k in ref:
    assert rel_err(ours[k], ref[k]) < 1e-6, k
  model, hf_params = hf[False]
  assert rel_err(_jlora_logits(model, hf_params, adapter), back_logits) < 1e-5
  again, cfg2 = jlora.peft.load(tmp_path, params)
  for p, lo in jlora.adapter.loras(adapter).items():
    lo2 = jlora.adapter.loras(again)[p]
    assert (lo2.rank, lo2.alpha, lo2.rslora, lo2.use_dora) == (lo.rank, lo.alpha, lo.rslora, lo.use_dora)
    np.testing.assert_array_equal(np.asarray(lo2.b), np.asarray(lo.b))
    assert cfg2.resolve(p) == cfg.resolve(p)
  if which == "plain":   # bare names and separator-free patterns survive as written
    assert config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    assert config["rank_pattern"] == {"v_proj": 2} and config["alpha_pattern"] == {"up_proj": 5}
    assert (cfg2.targets, cfg2.rank_pattern, cfg2.alpha_pattern) == (
        ["q_proj", "up_proj", "v_proj"], {"v_proj": 2}, {"up_proj": 5})


# ---------------------------------------------------------------- malformed inputs

@pytest.fixture(scope="module")
def small(base, tmp_path_factory):
  """A small PEFT adapter (q/v projections and the embedding, r=2) and its params."""
  pm = peft.get_peft_model(copy.deepcopy(base[1]), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
  _randomize(pm, seed=7)
  d = tmp_path_factory.mktemp("small")
  pm.save_pretrained(d)
  return d, params_from_torch(base[1])


def _copy(src, tmp_path, config_edit=None, tensors_edit=None):
  from safetensors.numpy import save_file
  d = tmp_path / "edited"
  shutil.copytree(src, d)
  if config_edit:
    c = json.loads((d / "adapter_config.json").read_text())
    config_edit(c)
    (d / "adapter_config.json").write_text(json.dumps(c))
  if tensors_edit:
    t = load_file(d / "adapter_model.safetensors")
    tensors_edit(t)
    save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
  return d


def test_small_loads(small):
  adapter, cfg = jlora.peft.load(*small)
  assert len(jlora.adapter.loras(adapter)) == 2 * N_LAYERS + 1
  assert sorted(cfg.targets) == ["embed_tokens", "q_proj", "v_proj"]   # PEFT saves a set
  assert (cfg.rank, cfg.alpha) == (2, 4.0)


@pytest.mark.parametrize("field,value,match", [
    ("bias", "all", r"bias='all'"),
    ("modules_to_save", ["lm_head"], r"modules_to_save=\['lm_head'\]"),
    ("fan_in_fan_out", True, r"fan_in_fan_out=True"),
    ("layers_to_transform", [0], r"layers_to_transform=\[0\]"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa'.*rewrites the base"),
    ("init_lora_weights", "mica", r"init_lora_weights='mica'"),
    ("use_qalora", True, r"use_qalora=True"),
    ("peft_type", "IA3", r"peft_type='IA3'"),
    ("some_future_field", 3, r"some_future_field=3 \(a field jlora does not know\)"),
    ("rank_pattern", {"v_proj(": 2}, r"rank_pattern key 'v_proj\(' does not compile"),
    ("rank_pattern", {"v_proj": 0}, r"rank_pattern\['v_proj'\]=0 \(must be a positive int\)"),
    ("lora_alpha", -1, r"lora_alpha=-1"),
    ("use_dora", "yes", r"use_dora='yes'"),
])
def test_unsupported_config_fields_are_named(small, tmp_path, field, value, match):
  d = _copy(small[0], tmp_path, config_edit=lambda c: c.update({field: value}))
  with pytest.raises(ValueError, match=match):
    jlora.peft.load(d, small[1])


def test_unknown_default_fields_are_accepted(small, tmp_path):
  d = _copy(small[0], tmp_path, config_edit=lambda c: c.update(some_future_field=None, task_type="SEQ_2_SEQ_LM"))
  jlora.peft.load(d, small[1])


def _rename_layer(t):
  for k in [k for k in t if ".layers.1.self_attn.q_proj." in k]:
    t[k.replace(".layers.1.", ".layers.7.")] = t.pop(k)


def _rank3(c):
  c["r"] = 3


def _drop_col(t):
  k = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
  t[k] = t[k][:, :1].copy()


def _wide_a(t):
  k = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
  t[k] = np.concatenate([t[k], t[k][:, :1]], axis=1)


@pytest.mark.parametrize("config_edit,tensors_edit,error,match", [
    (lambda c: c.update(target_modules=["q_proj", "v_proj", "embed_tokens", "c_attn"]), None,
     ValueError, r"target_modules names \['c_attn'\] but the model has no such module"),
    (None, _rename_layer, ValueError, r"modules the model lacks: \['model\.layers\.7\.self_attn\.q_proj'\]"),
    (_rank3, None, ValueError, r"module 'model\.[a-z_.0-9]+' has rank 2 \(lora_A \[2, \d+\]\) but adapter_config\.json gives it r=3"),
    (None, _drop_col, ValueError, r"v_proj\.lora_B\.weight' is \[32, 1\].*same r"),
    (None, _wide_a, ValueError, r"lora_A \[2, 65\].*'layers_0/self_attn/v_proj/kernel' is \[64, 32\]"),
    (lambda c: c.update(use_dora=True), None, ValueError, r"lacks a lora_magnitude_vector"),
    (lambda c: c.update(target_modules=["q_proj", "v_proj", "k_proj", "embed_tokens"]), None,
     ValueError, r"selects \['model\.layers\.0\.self_attn\.k_proj'.*no weights"),
    (lambda c: c.update(target_modules=["q_proj", "embed_tokens"]), None,
     ValueError, r"has weights for \['model\.layers\.0\.self_attn\.v_proj'.*does not select"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias":
                               np.ones(64, np.float32)}), ValueError, r"does not understand.*lora_B\.bias"),
])
def test_malformed_inputs_fail_clearly(small, tmp_path, config_edit, tensors_edit, error, match):
  d = _copy(small[0], tmp_path, config_edit, tensors_edit)
  with pytest.raises(error, match=match):
    jlora.peft.load(d, small[1])


def test_truncated_and_foreign_files(small, tmp_path):
  d = _copy(small[0], tmp_path)
  data = (d / "adapter_model.safetensors").read_bytes()
  (d / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
    jlora.peft.load(d, small[1])
  (d / "adapter_model.safetensors").unlink()
  (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")   # a pickle: must never be opened
  with pytest.raises(ValueError, match=r"only a pickled adapter_model\.bin.*never pickle"):
    jlora.peft.load(d, small[1])
  (d / "adapter_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
    jlora.peft.load(d, small[1])
  with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
    jlora.peft.load(tmp_path / "nowhere", small[1])


def test_embedding_base_copy_must_match(small):
  """PEFT saves embedding base weights beside the adapter; a copy that differs
  from the model's (resized or trained embeddings) is refused, not dropped."""
  d, params = small
  changed = jax.tree.map(lambda x: x, params)
  changed["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"].at[3, 5].add(1e-3)
  with pytest.raises(ValueError, match=r"base_layer\.weight'.*differs from the model's 'embed_tokens/embedding'"):
    jlora.peft.load(d, changed)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  with pytest.raises(ValueError, match=r"copy of the base weight.*concrete"):
    jlora.peft.load(d, abstract)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)   # same weights, rounded
  jlora.peft.load(d, bf16)


# ---------------------------------------------------------------- saving

def _node(rng, n_in, n_out, r, stack=(), **kw):
  return jlora.LoRA(a=jnp.asarray(rng.normal(size=stack + (n_in, r)), jnp.float32),
                    b=jnp.asarray(rng.normal(size=stack + (r, n_out)), jnp.float32),
                    rank=r, **kw)


def test_save_is_atomic(tmp_path, rng, monkeypatch):
  """A failed save leaves the previous adapter as it was, and no temp dirs."""
  good = {"layers_0": {"mlp": {"up_proj": {"kernel": _node(rng, 6, 10, 2, alpha=4.0)}}}}
  out = tmp_path / "adapter"
  jlora.peft.save(out, good, None)
  (out / "README.md").write_text("kept")
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  bad = {"x": {"kernel": _node(rng, 6, 10, 2, kind="conv")}}
  with pytest.raises(ValueError, match=r"'x/kernel' is a conv LoRA"):
    jlora.peft.save(out, bad, None)

  import safetensors.numpy
  def broken(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(OSError, match="disk full"):
    jlora.peft.save(out, good, None)
  with pytest.raises(OSError, match="disk full"):
    jlora.peft.save(tmp_path / "fresh", good, None)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_layouts_without_model(tmp_path, rng):
  """Keys, transposes, stacked layers and derived config, checked on the raw file."""
  stacked = _node(rng, 6, 10, 3, stack=(2,), alpha=5.0, rslora=True)
  emb = _node(rng, 12, 6, 2, alpha=5.0, rslora=True, kind="embed")
  adapter = {"layers": {"mlp": {"up_proj": {"kernel": stacked}}},
             "embed_tokens": {"embedding": emb}}
  jlora.peft.save(tmp_path, adapter, None, base_model_name_or_path="x/y")
  t = load_file(tmp_path / "adapter_model.safetensors")
  c = json.loads((tmp_path / "adapter_config.json").read_text())
  for i in range(2):
    k = f"base_model.model.model.layers.{i}.mlp.up_proj."
    np.testing.assert_array_equal(t[k + "lora_A.weight"], np.asarray(stacked.a[i]).T)
    np.testing.assert_array_equal(t[k + "lora_B.weight"], np.asarray(stacked.b[i]).T)
  np.testing.assert_array_equal(t["base_model.model.model.embed_tokens.lora_embedding_A"],
                                np.asarray(emb.a).T)
  np.testing.assert_array_equal(t["base_model.model.model.embed_tokens.lora_embedding_B"],
                                np.asarray(emb.b).T)
  assert len(t) == 6
  assert c["target_modules"] == ["model.embed_tokens", "model.layers.0.mlp.up_proj",
                                 "model.layers.1.mlp.up_proj"]
  assert (c["r"], c["lora_alpha"], c["use_rslora"], c["use_dora"]) == (3, 5, True, False)
  assert c["rank_pattern"] == {r"model\.embed_tokens": 2} and c["alpha_pattern"] == {}
  assert c["base_model_name_or_path"] == "x/y" and c["peft_type"] == "LORA"
  jlora.interop.peft.config.validate(c)


@pytest.mark.parametrize("make,match", [
    (lambda rng: {"a": {"kernel": _node(rng, 4, 6, 2, rslora=True)},
                  "b": {"kernel": _node(rng, 4, 6, 2)}}, r"rsLoRA on all adapted weights or none"),
    (lambda rng: {"a": {"kernel": _node(rng, 4, 6, 2).replace(rank=1)}}, r"padded beyond its rank 1"),
    (lambda rng: {"layers": {"kernel": _node(rng, 4, 6, 2, stack=(2, 3))}}, r"2 stacked axes \[2, 3\]"),
    (lambda rng: {"blocks": {"kernel": _node(rng, 4, 6, 2, stack=(2,))}}, r"gives layer 0 of the stacked 'blocks/kernel' no PEFT module name \(only a scanned 'layers/...' stack"),
])
def test_save_rejects_what_peft_cannot_hold(tmp_path, rng, make, match):
  with pytest.raises(ValueError, match=match):
    jlora.peft.save(tmp_path / "out", make(rng), None)
  assert not (tmp_path / "out").exists()


def test_save_checks_cfg(tmp_path, rng):
  ad = {"a": {"kernel": _node(rng, 4, 6, 2)}}
  with pytest.raises(ValueError, match=r"DoRA setting False disagrees with cfg's True"):
    jlora.peft.save(tmp_path, ad, jlora.LoraConfig(rank=2, use_dora=True))
  with pytest.raises(ValueError, match=r"PiSSA adapter"):
    jlora.peft.save(tmp_path, ad, jlora.LoraConfig(rank=2, init="pissa"))


def test_partial_stack_fills_zero_updates(base, tmp_path):
  """A DoRA adapter on layer 1 only, loaded into scanned params: layer 0 gets a
  zero update and the magnitude ‖W‖ (so W is unchanged), as PEFT leaves it."""
  pm = peft.get_peft_model(copy.deepcopy(base[1]), peft.LoraConfig(
      r=2, lora_alpha=4, use_dora=True, target_modules=r"model\.layers\.1\.mlp\.up_proj"))
  _randomize(pm, seed=5)
  pm.save_pretrained(tmp_path)
  scanned = params_from_torch(base[1], scanned=True)
  adapter, cfg = jlora.peft.load(tmp_path, scanned)
  lo = adapter["layers"]["mlp"]["up_proj"]["kernel"]
  assert lo.a.shape == (N_LAYERS, 64, 2) and not np.any(np.asarray(lo.a[0]))
  assert cfg.targets == ["layers/mlp/up_proj"]
  ours = paths.flatten(jax.jit(jlora.merge)(scanned, adapter))
  ref = paths.flatten(params_from_torch(pm.merge_and_unload(), scanned=True))
  for k in ref:
    assert rel_err(ours[k], ref[k]) < 1e-6, k
  assert rel_err(ours["layers/mlp/up_proj/kernel"][0], scanned["layers"]["mlp"]["up_proj"]["kernel"][0]) < 1e-6


def test_bfloat16_round_trip(tmp_path, rng):
  """bf16 adapters are written as BF16 tensors (as PyTorch reads them) and read back exactly."""
  from safetensors.torch import load_file as torch_load
  lo = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _node(rng, 16, 24, 4, alpha=8.0))
  jlora.peft.save(tmp_path, {"lm_head": {"kernel": lo}}, None)
  t = torch_load(tmp_path / "adapter_model.safetensors")
  assert {v.dtype for v in t.values()} == {torch.bfloat16}
  params = {"lm_head": {"kernel": jnp.zeros((16, 24), jnp.bfloat16)}}
  back, _ = jlora.peft.load(tmp_path, params, dtype=jnp.bfloat16)
  back = back["lm_head"]["kernel"]
  assert back.a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(back.a, np.float32), np.asarray(lo.a, np.float32))
  np.testing.assert_array_equal(np.asarray(back.b, np.float32), np.asarray(lo.b, np.float32))


def test_training_steps_match_peft(base, hf, tmp_path):
  """Three AdamW steps on one batch: jlora's train step and PEFT + torch.optim.AdamW
  give the same losses and the same adapter (float32 rounding), from the same
  non-zero start. Catches gradient, scale or optimizer differences that
  forward-only checks cannot."""
  from jlora import train
  pm = peft.get_peft_model(copy.deepcopy(base[1]), peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                                                           "o_proj", "gate_proj", "up_proj",
                                                           "down_proj"]))
  _randomize(pm, seed=7)
  pm.save_pretrained(tmp_path)
  model, params = hf[False]
  adapter, _ = jlora.peft.load(tmp_path, params)
  lr, steps = 1e-2, 3
  opt_t = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
  ids = torch.tensor(IDS)
  want = []
  for _ in range(steps):
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    opt_t.step()
    opt_t.zero_grad()
    want.append(out.loss.item())

  def loss_fn(ad, p, batch, rng):
    logits = jlora.apply(model, {"params": p}, ad, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])

  opt = train.make_optimizer(lr)
  step = train.make_train_step(loss_fn, opt)
  state = train.init_train_state(adapter, opt)
  got = []
  for _ in range(steps):
    adapter, state, m = step(adapter, state, params, jnp.asarray(IDS))
    got.append(float(m["loss"]))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want[-1] < want[0] - 0.1  # it did train
  jlora.peft.save(tmp_path / "ours", adapter)
  pm.save_pretrained(tmp_path / "theirs")
  ours, theirs = _lora_tensors(tmp_path / "ours"), _lora_tensors(tmp_path / "theirs")
  assert ours.keys() == theirs.keys()
  for k in theirs:
    assert rel_err(ours[k], theirs[k]) < 1e-4, k
