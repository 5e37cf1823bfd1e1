"""Gemma 1/2/3, Qwen3 and Phi-3 against transformers and PEFT on CPU; their pieces against NumPy.

Per family a tiny random transformers model (hidden 64, 2 layers, vocab 128)
is saved with ``save_pretrained`` and loaded with ``jlora.interop.from_hf``;
its logits must match PyTorch's (float32, 1e-5 relative, a left-padded row
included). A PEFT LoRA made on it loads with ``jlora.peft.load`` and gives
PEFT's logits; an adapter saved by ``jlora.peft.save`` loads in PEFT and
gives jlora's. Each config exercises what its family adds (sliding windows of
3 over 7 tokens, mixed sliding/full layers, soft-caps that bite, scaled RoPE).
"""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
from conftest import rel_err  # noqa: E402
from jlora.interop import from_hf, to_hf  # noqa: E402
from jlora.models import Llama, generate, preset, registry  # noqa: E402
from jlora.models.llama import RMSNorm, apply_rope, attention, causal_mask  # noqa: E402

TOL = 1e-5
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
UNFUSED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {   # name: (config class, model class, config fields, PEFT target_modules)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16), UNFUSED),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
        final_logit_softcapping=3.0), UNFUSED),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=3, sliding_window_pattern=2, tie_word_embeddings=False,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        UNFUSED + ["embed_tokens"]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=3,
        max_window_layers=1), UNFUSED),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        sliding_window=3, pad_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
IDS = np.random.default_rng(0).integers(0, 128, (2, 7))
MASK = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])   # the second row left-padded


def _randomize(model, seed, lora=False):
  """Non-trivial weights: norm weights (Gemma's 1 + w too) ~ 0.3 N(0, 1), biases, kernels ~ 1/√in;
  with ``lora`` only the LoRA tensors, ~ 0.2 N(0, 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if lora != ("lora_" in name):
        continue
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(0.2 * noise if lora else 0.3 * noise if "norm" in name or name.endswith("bias")
              else noise / p.shape[-1] ** 0.5)


def _torch_logits(model, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask)).logits.numpy()


def _close(got, want):
  """Relative error over the real tokens (the padded row's padding positions are junk)."""
  got, want = np.asarray(got), np.asarray(want)
  return max(rel_err(got[0], want[0]), rel_err(got[1, 2:], want[1, 2:]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{family: (torch model, checkpoint directory)}, made on first use."""
  out = {}

  def get(name):
    if name not in out:
      cfg_cls, model_cls, fields, _ = FAMILIES[name]
      cfg = getattr(transformers, cfg_cls)(**SIZES, **fields)
      model = getattr(transformers, model_cls)(cfg).eval()
      model.set_attn_implementation("eager")
      _randomize(model, seed=len(name))
      d = tmp_path_factory.mktemp(name)
      model.save_pretrained(d)
      out[name] = model, d
    return out[name]
  return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_and_peft_both_ways(name, saved, tmp_path):
  torch_model, d = saved(name)
  model, params = from_hf(d)
  ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
  base = jax.jit(model.apply)({"params": params}, ids, mask)
  assert _close(base, _torch_logits(torch_model)) < TOL

  # a PEFT adapter on the attention and MLP projections (Phi-3: the fused ones) -> jlora
  pm = peft.get_peft_model(copy.deepcopy(torch_model),
                           peft.LoraConfig(r=4, lora_alpha=8, target_modules=FAMILIES[name][3]))
  _randomize(pm, seed=7, lora=True)
  pm.eval().save_pretrained(tmp_path / "peft")
  adapter, cfg = jlora.peft.load(tmp_path / "peft", params, model=model, args=(ids,))
  targets = FAMILIES[name][3]
  n_modules = sum(1 if t == "embed_tokens" else SIZES["num_hidden_layers"] for t in targets)
  assert len(jlora.adapter.loras(adapter)) == n_modules
  run = jax.jit(lambda p, a: jlora.apply(model, {"params": p}, a, ids, mask))
  ours = run(params, adapter)
  assert _close(ours, _torch_logits(pm)) < TOL and _close(ours, base) > 1e-2

  # a jlora adapter -> PEFT
  rng = np.random.default_rng(1)
  mine = jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      adapter)
  jlora.peft.save(tmp_path / "mine", mine, cfg)
  back = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "mine").eval()
  ours = run(params, mine)
  assert _close(ours, _torch_logits(back)) < TOL and _close(ours, _torch_logits(pm)) > 1e-2


def test_scanned_remat_cache_and_generate(saved):
  """Gemma 3's mixed sliding/global layers (each with its own RoPE) in one nn.scan with
  remat; KV-cache decoding through jlora.models.generate gives transformers' greedy tokens."""
  torch_model, d = saved("gemma3")
  model, params = from_hf(d, scan_layers=True)
  model = Llama(model.config.replace(remat="full"))
  assert params["layers"]["self_attn"]["q_norm"]["scale"].shape == (2, 16)
  prompts = jnp.asarray(IDS[:, :4])
  out = generate(model, params, prompts, 5)
  with torch.no_grad():
    want = torch_model.generate(torch.tensor(IDS[:, :4]), max_new_tokens=5, do_sample=False,
                                attention_mask=torch.ones((2, 4), dtype=torch.long))
  np.testing.assert_array_equal(np.asarray(out), want.numpy())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_to_hf_loads_in_transformers(name, saved, tmp_path):
  """to_hf writes a checkpoint transformers loads as the same model; from_hf reads it back."""
  torch_model, d = saved(name)
  model, params = from_hf(d, scan_layers=True)
  tokens = {k: getattr(torch_model.config, k) for k in ("bos_token_id", "eos_token_id",
                                                         "pad_token_id")}
  to_hf(tmp_path, model.config, params, extra_config=tokens)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["architectures"] == [type(torch_model).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  reloaded.set_attn_implementation("eager")
  assert rel_err(_torch_logits(reloaded), _torch_logits(torch_model)) < 1e-6
  model2, _ = from_hf(tmp_path, scan_layers=True)
  assert model2.config == model.config


# ----------------------------------------------------------------------------- config.json

def _config(name, **edits):
  cfg_cls, _, fields, _ = FAMILIES[name]
  hf = getattr(transformers, cfg_cls)(**SIZES, **fields).to_dict()
  return {**hf, **edits}


def test_config_fields_and_defaults():
  gemma2 = registry.config_from_hf({"model_type": "gemma2", **SIZES, "head_dim": 16})
  assert (gemma2.query_pre_attn_scalar, gemma2.attn_logit_softcapping,
          gemma2.final_logit_softcapping, gemma2.sliding_window) == (256.0, 50.0, 30.0, 4096)
  assert gemma2.sliding_layers == (True, False) and gemma2.tie_word_embeddings
  assert gemma2.norm_plus_one and gemma2.scale_embeddings and gemma2.sandwich_norms
  assert registry.config_from_hf({"model_type": "gemma", **SIZES, "hidden_act": "gelu"}
                                 ).hidden_act == "gelu_pytorch_tanh"   # as transformers reads it
  # Gemma 3 in the transformers 4 layout reads as the 5 one
  v5 = registry.config_from_hf(_config("gemma3"))
  v4 = {k: v for k, v in _config("gemma3").items() if k not in ("rope_parameters", "layer_types")}
  v4.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2,
            rope_scaling={"rope_type": "linear", "factor": 2.0})
  assert registry.config_from_hf(v4) == v5
  assert (v5.rope_theta, v5.rope_scaling.factor, v5.rope_local_base_freq, v5.qk_norm) == (
      1e6, 2.0, 1e4, True)
  phi3 = registry.config_from_hf(_config("phi3"))
  assert phi3.fused_projections and phi3.partial_rotary_factor == 0.5 and phi3.rotary_size == 8


@pytest.mark.parametrize("name, edits, match", [
    ("gemma2", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=True is "
     r"not supported for model_type 'gemma2'"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_parameters\.sliding_attention: rope type 'linear' is not supported"),
    ("gemma3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     "rope_parameters must be keyed by layer type"),
    ("gemma3", dict(model_type="gemma3"), "model_type 'gemma3' is not supported"),
    ("phi3", dict(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4}), "rope type 'longrope'"),
    ("qwen3", dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
     r"partial_rotary_factor=0\.5 is not supported for model_type 'qwen3'"),
    ("gemma", dict(hidden_act="relu6"), "hidden_act 'relu6' is not supported"),
])
def test_refused_fields_are_named(name, edits, match):
  with pytest.raises(jlora.ConfigError, match=match):
    registry.config_from_hf(_config(name, **edits))


def test_registry():
  assert set(registry.model_types()) >= {"gemma", "gemma2", "gemma3_text", "qwen3", "phi3"}
  assert registry.family("qwen3").names.hf_name("layers_1/self_attn/q_norm/scale") == (
      "model.layers.1.self_attn.q_norm.weight")
  with pytest.raises(jlora.ConfigError, match="already belong to family 'llama'"):
    registry.register(registry.Family(name="mine", architectures={"llama": "X"}, defaults={},
                                      read=dict, write=dict))
  cfg = registry.config_from_hf(_config("gemma2")).replace(qk_norm=True)
  with pytest.raises(jlora.ConfigError, match=r"'gemma2' cannot express qk_norm=True"):
    registry.config_to_hf(cfg)


# ----------------------------------------------------------------------------- pieces vs NumPy

def test_plus_one_rms_norm_matches_float64(rng):
  x = rng.standard_normal((3, 5, 24))
  w = 0.3 * rng.standard_normal(24)
  got = RMSNorm(1e-6, plus_one=True).apply({"params": {"scale": jnp.asarray(w, jnp.float32)}},
                                           jnp.asarray(x, jnp.float32))
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
  assert rel_err(got, want) < 1e-6
  init = RMSNorm(1e-6, plus_one=True).init(jax.random.key(0), jnp.ones((1, 4)))
  assert not np.asarray(init["params"]["scale"].value).any()   # (1 + 0): the identity scale


def test_softcapped_attention_and_partial_rope_match_float64(rng):
  b, t, n, kh, h, cap, scale = 2, 6, 4, 2, 8, 1.5, 0.3
  q, k, v = (rng.standard_normal((b, t, heads, h)) for heads in (n, kh, kh))
  valid = np.array([[1] * t, [0, 0] + [1] * (t - 2)], bool)
  mask = causal_mask(jnp.arange(t), jnp.asarray(valid), sliding_window=3)
  got = jax.jit(lambda *a: attention(*a, mask, scale, logit_cap=cap))(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  kr, vr = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)
  s = cap * np.tanh(np.einsum("bqnh,bknh->bnqk", q, kr) * scale / cap)
  s = np.where(np.asarray(mask), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bnqk,bknh->bqnh", w / w.sum(-1, keepdims=True), vr)
  assert rel_err(np.asarray(got)[0], want[0]) < 1e-6
  assert rel_err(np.asarray(got)[1, 2:], want[1, 2:]) < 1e-6
  # partial rotary: the first 4 of 8 dims rotate (halves 0:2 and 2:4), the rest pass through
  inv = np.array([1.0, 0.1], np.float32)
  pos = np.arange(t)[None].repeat(b, 0)
  got = apply_rope(jnp.asarray(q, jnp.float32), jnp.asarray(pos), inv)
  ang = pos[..., None, None] * np.concatenate([inv, inv])          # [b, t, 1, 4]
  rot = np.concatenate([-q[..., 2:4], q[..., 0:2]], -1)
  want = np.concatenate([q[..., :4] * np.cos(ang) + rot * np.sin(ang), q[..., 4:]], -1)
  assert rel_err(got, want) < 1e-6
  assert preset("tiny", partial_rotary_factor=0.5).rotary_size == 8
