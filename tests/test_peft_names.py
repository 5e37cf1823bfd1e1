"""PEFT adapters for any model (name maps), the contract's ``peft.load(dir, params, model=model)``,
and Hugging Face Hub names resolved through a local cache.

The "any model" oracle: a PyTorch module written here (not a transformers
class), adapted by the installed PEFT; its Flax twin, also written here,
names its weights differently and loads the adapter through a table or a
function. Tolerance: logits to 1e-5 relative (float32, three matmuls).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
from jlora import paths  # noqa: E402
from conftest import rel_err  # noqa: E402

V, D, H, LAYERS = 40, 16, 24, 2
IDS = np.random.default_rng(0).integers(0, V, (3, 5))


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.fc_in, self.fc_out = torch.nn.Linear(D, H), torch.nn.Linear(H, D)

  def forward(self, x):
    return x + self.fc_out(torch.tanh(self.fc_in(x)))


class TorchNet(torch.nn.Module):
  """A model of our own, not a transformers class: PEFT names its modules blocks.{i}.fc_in, ..."""

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(V, D)
    self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])
    self.head = torch.nn.Linear(D, V, bias=False)

  def forward(self, ids):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class FlaxBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = jnp.tanh(nn.Dense(H, name="up")(x))
    return x + nn.Dense(D, name="down")(h), None


class FlaxNet(nn.Module):
  """Its Flax twin with other names (tok, mlp{i}_up/down, out), unrolled or scanned."""
  scanned: bool = False

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(V, D, name="tok")(ids)
    if self.scanned:
      stack = nn.scan(FlaxBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=LAYERS)
      x, _ = stack(name="stack")(x, None)
    else:
      for i in range(LAYERS):
        h = jnp.tanh(nn.Dense(H, name=f"mlp{i}_up")(x))
        x = x + nn.Dense(D, name=f"mlp{i}_down")(h)
    return nn.Dense(V, use_bias=False, name="out")(x)


TABLE = {"tok": "embed", "out": "head",
         **{f"mlp{i}_up": f"blocks.{i}.fc_in" for i in range(LAYERS)},
         **{f"mlp{i}_down": f"blocks.{i}.fc_out" for i in range(LAYERS)}}


def scanned_names(path, layer):
  """A function map for the scanned twin: stack/up/kernel, layer i -> blocks.i.fc_in."""
  if path.startswith("stack/"):
    return f"blocks.{layer}.{ {'up': 'fc_in', 'down': 'fc_out'}[path.split('/')[1]] }"
  return {"tok/embedding": "embed", "out/kernel": "head"}.get(path) if layer is None else None


def flax_params(torch_model, scanned=False):
  """The Flax twin's params from the PyTorch weights (Dense kernels are W.T)."""
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  flat = {"tok/embedding": sd["embed.weight"], "out/kernel": sd["head.weight"].T}
  for i in range(LAYERS):
    for ours, theirs in (("up", "fc_in"), ("down", "fc_out")):
      flat[f"mlp{i}_{ours}/kernel"] = sd[f"blocks.{i}.{theirs}.weight"].T
      flat[f"mlp{i}_{ours}/bias"] = sd[f"blocks.{i}.{theirs}.bias"]
  if scanned:
    for ours in ("up", "down"):
      for leaf in ("kernel", "bias"):
        flat[f"stack/{ours}/{leaf}"] = np.stack([flat.pop(f"mlp{i}_{ours}/{leaf}")
                                                  for i in range(LAYERS)])
  return paths.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


@pytest.fixture(scope="module")
def torch_base():
  torch.manual_seed(0)
  return TorchNet().eval()


@pytest.fixture(scope="module")
def peft_dir(torch_base, tmp_path_factory):
  """A PEFT adapter on TorchNet: linear layers and the embedding, a rank pattern, non-zero A, B."""
  import copy
  pm = peft.get_peft_model(copy.deepcopy(torch_base), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["fc_in", "fc_out", "head", "embed"],
      rank_pattern={"fc_out": 2}))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
  d = tmp_path_factory.mktemp("peft_own")
  pm.save_pretrained(d)
  with torch.no_grad():
    want = pm.eval()(torch.tensor(IDS)).numpy()
  return d, want


@pytest.mark.parametrize("scanned", [False, True], ids=["table", "scanned_function"])
def test_peft_adapter_loads_into_our_own_flax_model(torch_base, peft_dir, scanned):
  d, want = peft_dir
  model, params = FlaxNet(scanned=scanned), flax_params(torch_base, scanned)
  ids = jnp.asarray(IDS)
  np.testing.assert_allclose(model.apply({"params": params}, ids),
                             torch_base(torch.tensor(IDS)).detach().numpy(), rtol=1e-5, atol=1e-5)
  if scanned:   # the stack's layout is learnt by tracing the model
    adapter, cfg = jlora.peft.load(d, params, model=model, args=(ids,), names=scanned_names)
    assert adapter["stack"]["down"]["kernel"].a.shape == (LAYERS, H, 2)
  else:
    adapter, cfg = jlora.peft.load(d, params, names=TABLE)
    assert adapter["mlp1_down"]["kernel"].rank == 2 and adapter["tok"]["embedding"].kind == "embed"
  assert len(jlora.adapted_paths(adapter)) == (4 if scanned else 6)
  got = jlora.apply(model, {"params": params}, adapter, ids)
  assert rel_err(got, want) < 1e-5
  # the translated LoraConfig selects the same weights with the same ranks
  again = jlora.init_adapter(jax.random.key(0), params, cfg, model=model, args=(ids,))
  assert jax.tree.map(jnp.shape, again) == jax.tree.map(jnp.shape, adapter)


def test_our_adapter_saves_for_peft_through_the_map(torch_base, tmp_path):
  model, params = FlaxNet(), flax_params(torch_base)
  cfg = jlora.LoraConfig(rank=3, alpha=6, targets=["mlp0_up", "mlp1_down", "out"])
  adapter = jlora.init_adapter(jax.random.key(2), params, cfg)
  adapter = jax.tree.map(lambda lo: lo.replace(b=jax.random.normal(jax.random.key(3), lo.b.shape)),
                         adapter, is_leaf=lambda x: isinstance(x, jlora.LoRA))
  jlora.peft.save(tmp_path / "ad", adapter, cfg, names=TABLE, task_type=None)
  import json
  config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["blocks.0.fc_in", "blocks.1.fc_out", "head"]
  import copy
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), tmp_path / "ad").eval()
  with torch.no_grad():
    want = pm(torch.tensor(IDS)).numpy()
  got = jlora.apply(model, {"params": params}, adapter, jnp.asarray(IDS))
  assert rel_err(got, want) < 1e-5
  # and back, shapes from the file alone through the table's inverse
  shapes = jlora.peft.params_from_file(tmp_path / "ad", names=TABLE)
  assert shapes["mlp1_down"]["kernel"].shape == (H, D)


def test_name_map_errors(torch_base, peft_dir):
  d, _ = peft_dir
  params = flax_params(torch_base)
  with pytest.raises(jlora.ConfigError, match=r"entries \['mlp9_up'\] are not adaptable weights"):
    jlora.peft.load(d, params, names={**TABLE, "mlp9_up": "blocks.9.fc_in"})
  with pytest.raises(jlora.ConfigError, match="the same PEFT module name 'head'"):
    jlora.peft.load(d, params, names=lambda path, layer: "head")
  with pytest.raises(jlora.FormatError, match="modules the model lacks"):   # default layout
    jlora.peft.load(d, params)
  with pytest.raises(jlora.ConfigError, match="names must be a table"):
    jlora.peft.load(d, params, names=3)
  with pytest.raises(jlora.AdapterError, match="no PEFT module name"):
    jlora.peft.save(d.parent / "x", jlora.peft.load(d, params, names=TABLE)[0],
                    names={"tok": "embed"})


def _tiny_llama(scan_layers=False):
  """The reference model and random params of its abstract shapes (no init to compile)."""
  import flax.linen as fnn
  from jlora.models import Llama, preset
  from jlora.models.llama import abstract_params
  cfg = preset("tiny").replace(scan_layers=scan_layers)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                        fnn.unbox(abstract_params(cfg)))
  return Llama(cfg), params


def test_contract_call_needs_no_args_for_the_reference_model(tmp_path):
  """``jlora.peft.load(dir, params, model=model)`` as DESIGN.md writes it: the scanned
  stack's layout comes from tracing the model with its own example_args()."""
  model, params = _tiny_llama(scan_layers=True)
  rng = np.random.default_rng(1)
  lo = jlora.LoRA(a=jnp.asarray(rng.standard_normal((LAYERS, 64, 2)), jnp.float32),
                  b=jnp.asarray(rng.standard_normal((LAYERS, 2, 64)), jnp.float32), alpha=4.0)
  adapter = {"layers": {"self_attn": {"q_proj": {"kernel": lo}}}}
  jlora.peft.save(tmp_path / "ad", adapter, names=model.name_map())
  back, cfg = jlora.peft.load(tmp_path / "ad", params, model=model)
  np.testing.assert_array_equal(back["layers"]["self_attn"]["q_proj"]["kernel"].b, lo.b)
  assert cfg.targets == ["layers/self_attn/q_proj"] and back["layers"]["self_attn"]["q_proj"]["kernel"].stack == 1
  with pytest.raises(jlora.AdapterError, match=r"pass args=\(x, \.\.\.\)"):
    jlora.peft.load(tmp_path / "ad", params, model=lambda p, x: x)


def _fake_cache(root, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
  """The Hugging Face cache layout: refs/main -> commit, snapshots/<commit>/<files>."""
  repo = root / f"models--{repo_id.replace('/', '--')}"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  for f in files:
    os.symlink(f, snap / f.name)
  return snap


def test_hub_names_resolve_through_the_local_cache(tmp_path, monkeypatch):
  from jlora.interop import from_hf, to_hf
  model, params = _tiny_llama()
  to_hf(tmp_path / "model", model.config, params)
  adapter = jlora.init_adapter(jax.random.key(1), params, jlora.LoraConfig(rank=2, targets=["v_proj"]))
  jlora.peft.save(tmp_path / "adapter", adapter)
  cache = tmp_path / "hub"
  _fake_cache(cache, "acme/tiny-llama", list((tmp_path / "model").iterdir()))
  _fake_cache(cache, "acme/tiny-lora", list((tmp_path / "adapter").iterdir()))
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.chdir(tmp_path)                  # "acme/..." is no directory here

  _, loaded = from_hf("acme/tiny-llama")
  np.testing.assert_array_equal(loaded["layers_1"]["mlp"]["up_proj"]["kernel"],
                                params["layers_1"]["mlp"]["up_proj"]["kernel"])
  back, _ = jlora.peft.load("acme/tiny-lora", loaded)
  assert jlora.adapted_paths(back) == jlora.adapted_paths(adapter)
  with pytest.raises(jlora.CheckpointError, match=r"cache \(.*hub\) has no model acme/missing.*"
                                                  r"hf download acme/missing.*download=True"):
    from_hf("acme/missing")
  with pytest.raises(jlora.CheckpointError, match="has no PEFT adapter acme/tiny-llama"):
    jlora.peft.load("acme/tiny-llama", loaded)     # cached, but a model, not an adapter
  with pytest.raises(FileNotFoundError):           # a path, not a Hub name: as before
    from_hf("./not/here")


def test_summary_matches_peft_trainable_parameters(torch_base, peft_dir):
  """The first line is PEFT's print_trainable_parameters for the same adapter."""
  import contextlib
  import copy
  import io
  d, _ = peft_dir
  params = flax_params(torch_base)
  adapter, _ = jlora.peft.load(d, params, names=TABLE)
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_base), d, is_trainable=True)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    pm.print_trainable_parameters()
  text = jlora.summary(adapter, params)
  assert text.splitlines()[0] == buf.getvalue().strip()
  assert "mlp1_down/kernel" in text and "[24, 16]" in text
