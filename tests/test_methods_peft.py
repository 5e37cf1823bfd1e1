"""Prompt tuning, prefix tuning and IA³ against the installed PEFT on a tiny random Llama.

Both directions go through PEFT's own files: PEFT saves (``save_pretrained``)
and jlora loads, and jlora saves and PEFT loads (``PeftModel.from_pretrained``);
logits must agree to 1e-5 relative (float32, two decoder layers) at every real
position of a batch with an unpadded row and a left-padded one.
"""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
from jlora.errors import ConfigError, FormatError  # noqa: E402
from jlora.interop import peft_ia3, peft_prompt  # noqa: E402
from jlora.methods import ia3, prefix, prompt  # noqa: E402
from conftest import rel_err  # noqa: E402

IDS = np.random.default_rng(3).integers(0, 128, (2, 7))
MASK = np.ones((2, 7), np.int64)
MASK[1, :2] = 0                      # left padding in the second row
REAL = MASK.astype(bool)

PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_mlp": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                  prefix_projection=True, encoder_hidden_size=24),
    "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random HF Llama saved with save_pretrained, and jlora's (model, params) of it."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).float().eval()
  d = tmp_path_factory.mktemp("llama")
  model.save_pretrained(d)
  return model, {scan: jlora.interop.from_hf(d, scan_layers=scan) for scan in (False, True)}


def _peft_logits(pm, mask):
  kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
  with torch.no_grad():
    return pm(input_ids=torch.tensor(IDS), **kw).logits.numpy()


_RUNNERS = {}


def _jlora_logits(kind, model, params, trained, mask):
  """jlora's logits, one compiled function per kind and model (both directions share it)."""
  def run(params, trained, ids, m):
    if kind == "prompt":
      return prompt.apply(model, params, trained, ids, attention_mask=m)
    if kind.startswith("prefix"):
      return prefix.apply(model, params, trained, ids, attention_mask=m)
    return jlora.apply(model, {"params": params}, trained, ids, attention_mask=m)
  fn = _RUNNERS.setdefault((kind, model), jax.jit(run))
  return np.asarray(fn(params, trained, jnp.asarray(IDS), jnp.asarray(mask)))


def _agree(got, want):
  """rel. error at the real positions (padded queries attend to nothing: undefined)."""
  assert got.shape == want.shape
  n = got.shape[1] - REAL.shape[1]       # prompt tuning: n virtual positions first
  assert rel_err(got[0], want[0]) < 1e-5  # the unpadded row, virtual positions too
  return rel_err(got[:, n:][REAL], want[:, n:][REAL])


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_peft_files_load_into_jlora(kind, base, tmp_path):
  """PEFT's randomised adapter, saved by PEFT, gives PEFT's logits in jlora."""
  torch_model, hf = base
  pm = peft.get_peft_model(copy.deepcopy(torch_model), PEFT_CONFIGS[kind]())
  g = torch.Generator().manual_seed(len(kind))
  with torch.no_grad():
    for _, p in pm.named_parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if kind == "ia3" else 0.0))
  pm.eval().save_pretrained(tmp_path)
  want = _peft_logits(pm, MASK)
  model, params = hf[kind == "ia3"]     # IA³ into a scanned stack (both directions)
  if kind == "ia3":
    trained = peft_ia3.load(tmp_path, params, model=model, args=(jnp.zeros((1, 3), jnp.int32),))
    assert len(jlora.adapter.loras(trained)) == 3
  else:
    trained = peft_prompt.load(tmp_path, model.config)
  assert _agree(_jlora_logits(kind, model, params, trained, MASK), want) < 1e-5
  if kind == "ia3":             # the adapter does something
    ones = jax.tree.map(jnp.ones_like, trained)
    assert rel_err(_jlora_logits(kind, model, params, ones, MASK)[REAL], want[REAL]) > 1e-2


def _jlora_trained(kind, model, params, key):
  """A trained-looking tree made in jlora (random, nothing PEFT-made)."""
  cfg = model.config
  if kind == "prompt":
    return prompt.init_prompt(key, 4, params["embed_tokens"]["embedding"], init="random")
  if kind == "prefix":
    return prefix.init_prefix(key, cfg, 4)
  if kind == "prefix_mlp":
    return prefix.init_prefix(key, cfg, 4, projection=20)
  ad = ia3.init_ia3(params, model=model, args=(jnp.zeros((1, 3), jnp.int32),))
  return jax.tree.map(lambda v: v + jax.random.normal(key, v.shape) * 0.5, ad)


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_jlora_files_load_in_peft(kind, base, tmp_path):
  """jlora's tree, saved in PEFT's format, loads in PEFT (from_pretrained) with jlora's
  logits, and reads back into jlora unchanged (a prefix MLP: as its output)."""
  torch_model, hf = base
  model, params = hf[kind == "ia3"]
  trained = _jlora_trained(kind, model, params, jax.random.key(len(kind)))
  if kind == "ia3":
    peft_ia3.save(tmp_path, trained)
  else:
    peft_prompt.save(tmp_path, trained, model.config)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  pm = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  got = _jlora_logits(kind, model, params, trained, MASK)
  assert _agree(got, _peft_logits(pm, MASK)) < 1e-5
  if kind == "ia3":
    assert config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    back = peft_ia3.load(tmp_path, params, model=model, args=(jnp.zeros((1, 3), jnp.int32),))
  else:
    back = peft_prompt.load(tmp_path, model.config)
    if kind == "prefix_mlp":
      assert config["prefix_projection"] and config["encoder_hidden_size"] == 20
      trained = trained.frozen()
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_unsupported_files_are_refused_by_name(base, tmp_path):
  torch_model, hf = base
  model, params = hf[False]
  peft_prompt.save(tmp_path / "p", prompt.Prompt(jnp.ones((2, 64))), model.config)
  cfg_path = tmp_path / "p" / "adapter_config.json"
  d = json.loads(cfg_path.read_text())
  cfg_path.write_text(json.dumps({**d, "num_transformer_submodules": 2}))
  with pytest.raises(ConfigError, match="num_transformer_submodules=2"):
    peft_prompt.load(tmp_path / "p")
  cfg_path.write_text(json.dumps({**d, "token_dim": 32}))
  with pytest.raises(FormatError, match="token_dim=32 but the model's hidden_size is 64"):
    peft_prompt.load(tmp_path / "p", model.config)
  peft_prompt.save(tmp_path / "x", prefix.init_prefix(jax.random.key(0), model.config, 2))
  with pytest.raises(FormatError, match="the prefix is for"):
    peft_prompt.load(tmp_path / "x", model.config.replace(num_hidden_layers=3))
  ad = ia3.init_ia3(params)
  peft_ia3.save(tmp_path / "i", ad)
  biased = jax.tree.map(lambda x: x, params)
  biased["layers_0"]["self_attn"]["k_proj"]["bias"] = jnp.zeros(32)
  with pytest.raises(jlora.AdapterError, match="has a bias"):
    peft_ia3.load(tmp_path / "i", biased)
  with pytest.raises(jlora.AdapterError, match="model lacks"):
    peft_ia3.load(tmp_path / "i", {"layers_0": params["layers_0"]})
