"""The reference Llama model against a float64 NumPy forward pass; layouts, caching, generation."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from jlora.models import KVCache, Llama, LlamaConfig, RopeScaling, generate, preset
from jlora.models.llama import abstract_params, unboxed_init

TOL = 2e-5  # float32 model vs float64 reference, relative (observed ~1e-6)

VARIANTS = {
    "llama3": dict(rope_scaling=RopeScaling(kind="llama3", factor=4.0, low_freq_factor=1.0,
                                            high_freq_factor=2.0,
                                            original_max_position_embeddings=8),
                   rope_theta=500.0),
    "qwen2": dict(qkv_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mistral": dict(sliding_window=3, rope_scaling=RopeScaling(kind="linear", factor=2.0)),
    "biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True, head_dim=8,
                   hidden_act="gelu_pytorch_tanh"),
}


def _config(name="llama3", **kw):
  return preset("tiny", initializer_range=0.1, **{**VARIANTS[name], **kw})


def _random_params(cfg, rng):
  """Random non-trivial params (norm scales and biases too) in the unscanned layout."""
  tree = nn.unbox(abstract_params(cfg.replace(scan_layers=False)))
  def draw(path, spec):
    if path[-1].key == "scale":
      return jnp.asarray(1 + 0.3 * rng.standard_normal(spec.shape), jnp.float32)
    std = 0.3 if path[-1].key == "bias" else 1 / math.sqrt(spec.shape[0])
    return jnp.asarray(std * rng.standard_normal(spec.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, tree)


def _stack(params, cfg):
  layers = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
  return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


# ----------------------------------------------------------------------------- NumPy reference

def _inv_freq(cfg):
  d = cfg.head_size
  inv = np.array([cfg.rope_theta ** (-2 * i / d) for i in range(d // 2)])
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  if sc.kind == "linear":
    return inv / sc.factor
  out = []
  for f in inv:
    wl = 2 * np.pi / f
    lo, hi = sc.original_max_position_embeddings / sc.low_freq_factor, \
        sc.original_max_position_embeddings / sc.high_freq_factor
    if wl < hi:
      out.append(f)
    elif wl > lo:
      out.append(f / sc.factor)
    else:
      s = (sc.original_max_position_embeddings / wl - sc.low_freq_factor) / \
          (sc.high_freq_factor - sc.low_freq_factor)
      out.append((1 - s) * f / sc.factor + s * f)
  return np.array(out)


def _ref_forward(p, cfg, ids, mask=None, positions=None):
  """float64 NumPy Llama: [batch, T] ids -> [batch, T, vocab] logits."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  b, t = ids.shape
  n, kh, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
  mask = np.ones((b, t), bool) if mask is None else np.asarray(mask, bool)
  positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
  act = {"silu": lambda x: x / (1 + np.exp(-x)),
         "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + np.tanh(
             np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))}[cfg.hidden_act]
  norm = lambda x, s: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * s
  lin = lambda x, m: x @ m["kernel"] + m.get("bias", 0.0)
  ang = np.asarray(positions)[..., None] * _inv_freq(cfg)               # [b, T, h/2]
  ang = np.concatenate([ang, ang], -1)[:, :, None, :]
  rope = lambda x: x * np.cos(ang) + np.concatenate(
      [-x[..., h // 2:], x[..., :h // 2]], -1) * np.sin(ang)
  q_i, k_i = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (k_i <= q_i) & (k_i > q_i - (cfg.sliding_window or t + 1))
  allowed = allowed[None] & mask[:, None, :]                      # [b, T, S]
  allowed |= np.eye(t, dtype=bool)[None] & ~mask[:, :, None]      # padding rows: finite junk
  x = p["embed_tokens"]["embedding"][ids]
  for i in range(cfg.num_hidden_layers):
    lp = p[f"layers_{i}"]
    a = lp["self_attn"]
    y = norm(x, lp["input_layernorm"]["scale"])
    q = rope(lin(y, a["q_proj"]).reshape(b, t, n, h))
    k = rope(lin(y, a["k_proj"]).reshape(b, t, kh, h))
    v = lin(y, a["v_proj"]).reshape(b, t, kh, h)
    k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
    s = np.where(allowed[:, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknh->bqnh", w, v).reshape(b, t, n * h)
    x = x + lin(o, a["o_proj"])
    y = norm(x, lp["post_attention_layernorm"]["scale"])
    m = lp["mlp"]
    x = x + lin(act(lin(y, m["gate_proj"])) * lin(y, m["up_proj"]), m["down_proj"])
  x = norm(x, p["norm"]["scale"])
  if cfg.tie_word_embeddings:
    return x @ p["embed_tokens"]["embedding"].T
  return x @ p["lm_head"]["kernel"]



@functools.lru_cache(maxsize=None)
def _forward(cfg):
  """One compiled forward per config, shared by the tests (mask and positions always given)."""
  return jax.jit(lambda p, ids, mask, pos: Llama(cfg).apply({"params": p}, ids, mask, pos))


def _ids(rng, cfg, shape=(2, 7)):
  return jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)


def _arange(shape):
  return jnp.broadcast_to(jnp.arange(shape[1]), shape)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name, scan, expected", [
    ("tinyllama-1.1b", True, 1_100_048_384),
    ("llama-3-8b", False, 8_030_261_248),
    ("llama-3.1-8b", True, 8_030_261_248),
    ("llama-3-70b", True, 70_553_706_496),
])
def test_parameter_counts_and_logical_axes(name, scan, expected):
  tree = abstract_params(preset(name, scan_layers=scan))   # eval_shape: no memory
  boxes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert sum(math.prod(b.value.shape) for b in boxes) == expected
  for box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned)
    assert len(box.names) == len(box.value.shape) and None not in box.names
  q = tree["layers" if scan else "layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == (("layers",) if scan else ()) + ("embed", "heads")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_numpy_reference(variant, rng):
  cfg = _config(variant)
  params, ids = _random_params(cfg, rng), _ids(rng, cfg)
  ref = _ref_forward(params, cfg, np.asarray(ids))
  jitted = _forward(cfg)(params, ids, jnp.ones(ids.shape, jnp.int32), _arange(ids.shape))
  assert jitted.shape == (2, 7, cfg.vocab_size) and jitted.dtype == jnp.float32
  assert rel_err(jitted, ref) < TOL
  if variant == "llama3":                      # and once without jit, default arguments
    assert rel_err(Llama(cfg).apply({"params": params}, ids), ref) < TOL


def test_padding_and_positions_match_reference(rng):
  cfg = _config("llama3")
  params, ids = _random_params(cfg, rng), _ids(rng, cfg)
  # row 0 right-padded after 5 tokens; row 1 left-padded by 2, positions from its first token
  mask = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  logits = _forward(cfg)(params, ids, jnp.asarray(mask), jnp.asarray(pos))
  ref0 = _ref_forward(params, cfg, np.asarray(ids[:1, :5]))
  ref1 = _ref_forward(params, cfg, np.asarray(ids[1:, 2:]))
  assert rel_err(logits[0, :5], ref0[0]) < TOL and rel_err(logits[1, 2:], ref1[0]) < TOL
  assert np.isfinite(np.asarray(logits)).all()


def test_scanned_equals_unscanned_with_remat(rng):
  cfg = _config("mistral")
  params, ids = _random_params(cfg, rng), _ids(rng, cfg)
  ones, pos = jnp.ones(ids.shape, jnp.int32), _arange(ids.shape)
  plain = _forward(cfg)(params, ids, ones, pos)
  scan_cfg = cfg.replace(scan_layers=True, remat="full")
  stacked = _stack(params, cfg)
  # the layout init produces is the one the stacked tree has
  init = jax.eval_shape(lambda k: unboxed_init(Llama(scan_cfg), k, ids), jax.random.key(0))
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  loss = lambda p, c: jnp.sum(Llama(c).apply({"params": p}, ids) * plain / plain.size)
  val_s, g_scan = jax.jit(jax.value_and_grad(loss), static_argnums=1)(stacked, scan_cfg)
  val_p, g_plain = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  assert rel_err(val_s, val_p) < 1e-6
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(_stack(g_plain, cfg))):
    assert rel_err(a, b) < 1e-5


def test_kv_cache_logits_equal_full_forward(rng):
  cfg = _config("qwen2", scan_layers=True)
  params, ids = _random_params(cfg, rng), _ids(rng, cfg)
  ref = _ref_forward(params, cfg, np.asarray(ids))
  model, stacked = Llama(cfg), _stack(params, cfg)
  cache = KVCache.init(cfg, batch=2, max_len=9)
  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
  parts = []
  for lo, hi in [(0, 5), (5, 6), (6, 7)]:       # prefill 5, then one token at a time
    out, cache = step(stacked, ids[:, lo:hi], cache)
    parts.append(out)
  assert int(cache.index) == 7 and cache.k.shape == (cfg.num_hidden_layers, 2, 9, 2, 16)
  assert rel_err(jnp.concatenate(parts, axis=1), ref) < TOL


def test_generate_equals_full_forward_argmax(rng):
  cfg = _config("mistral")
  params, model = _random_params(cfg, rng), Llama(cfg)
  ids = _ids(rng, cfg, (2, 5)).at[0, :2].set(0)
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])             # row 0: left padding
  out = np.asarray(generate(model, params, ids, 6, attention_mask=jnp.asarray(mask)))
  assert out.shape == (2, 11) and np.array_equal(out[:, :5], ids)
  for row, start in [(0, 2), (1, 0)]:           # each row as if it were alone, unpadded
    seq = out[row:row + 1, start:]
    ref = _ref_forward(params, cfg, seq)
    np.testing.assert_array_equal(np.argmax(ref[0, 4 - start:-1], -1), seq[0, 5 - start:])
  eos = int(out[1, 6])                          # row 1's second new token ends it
  stopped = np.asarray(generate(model, params, ids, 6, attention_mask=jnp.asarray(mask),
                                eos_token_id=eos))
  np.testing.assert_array_equal(stopped[1, :7], out[1, :7])
  assert (stopped[1, 7:] == eos).all()


def test_bfloat16_close_to_float32(rng):
  cfg = _config("llama3")
  params, ids = _random_params(cfg, rng), _ids(rng, cfg)
  ref = _ref_forward(params, cfg, np.asarray(ids))
  cfg16 = cfg.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  b16 = jax.jit(Llama(cfg16).apply)({"params": p16}, ids)
  assert b16.dtype == jnp.bfloat16
  assert rel_err(b16, ref) < 5e-2               # bf16 has 8 mantissa bits


def test_errors():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
  with pytest.raises(ValueError, match="remat"):
    preset("tiny", remat="everything")
  with pytest.raises(ValueError, match="hidden_act"):
    preset("tiny", hidden_act="tanh")
  with pytest.raises(ValueError, match="unknown preset"):
    preset("llama-9")
  with pytest.raises(ValueError, match="RopeScaling.kind"):
    RopeScaling(kind="yarn")
  model = Llama(preset("tiny"))
  params = nn.unbox(abstract_params(model.config))
  apply = lambda *a: jax.eval_shape(lambda p: model.apply({"params": p}, *a), params)
  assert apply(jnp.ones((1, 3), jnp.int32)).shape == (1, 3, 128)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
    apply(jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask has shape"):
    apply(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, params, jnp.ones((1, 3), jnp.int32), 0)


def _lora_adapter(params, pattern, rng, rank=4):
  """A hand-made adapter (non-zero a and b) on every stacked kernel whose path matches."""
  import re
  from jlora import LoRA, paths
  out = {}
  for path, w in paths.flatten(params).items():
    if re.fullmatch(pattern, path):
      n, d_in, d_out = w.shape
      a = 0.3 * rng.standard_normal((n, d_in, rank)) / math.sqrt(d_in)
      b = 0.3 * rng.standard_normal((n, rank, d_out))
      out[path] = LoRA(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32),
                       alpha=8.0, rank=rank)
  return paths.unflatten(out)


def test_adapts_through_jlora_apply(rng):
  """The model is plain Linen: jlora.apply intercepts its Dense layers inside nn.scan."""
  import jlora
  cfg = _config("qwen2", scan_layers=True)
  params, ids = _stack(_random_params(cfg, rng), cfg), _ids(rng, cfg, (2, 5))
  model = Llama(cfg)
  adapter = _lora_adapter(params, r".*(q|v|down)_proj/kernel", rng)
  merged = jlora.merge(params, adapter)
  apply_fn = lambda pa, x, **kw: jlora.apply(model, {"params": pa[0]}, pa[1], x, **kw)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  ours, ref = jax.jit(apply_fn)((params, adapter), ids), forward(merged, ids)
  assert rel_err(ours, ref) < 1e-5 and rel_err(ref, forward(params, ids)) > 1e-2
  # generate takes the pair and apply_fn; cached decoding runs through the adapter
  out = generate(model, (params, adapter), ids, 3, apply_fn=apply_fn)
  full = forward(merged, out[:, :-1])
  np.testing.assert_array_equal(np.argmax(full[:, 4:], -1), out[:, 5:])


def test_causal_fast_path_equals_explicit_mask():
  """Without padding the model asks for ``is_causal`` (no mask array); same logits."""
  cfg = _config()
  model = Llama(cfg)
  ids = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
  params = unboxed_init(model, jax.random.key(0), ids)
  plain = model.apply({"params": params}, ids)
  masked = model.apply({"params": params}, ids, attention_mask=jnp.ones_like(ids))
  np.testing.assert_allclose(plain, masked, rtol=1e-6, atol=1e-6)


def test_quantized_init_is_layer_by_layer_quantize():
  """quantized_init: quantize(unboxed_init)'s tree and shapes; scanned == unscanned values."""
  import jlora
  from jlora.models import quantized_init
  ids = jnp.ones((1, 4), jnp.int32)
  trees = {}
  for scan in (False, True):
    cfg = _config(scan_layers=scan)
    # the tree and shapes only: traced, not compiled
    q = jax.eval_shape(lambda: quantized_init(cfg, jax.random.key(5), scheme="nf4"))
    ref = jax.eval_shape(
        lambda: jlora.quantize(unboxed_init(Llama(cfg), jax.random.key(0), ids), "nf4"))
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert jax.tree.structure(q) == jax.tree.structure(ref) and shapes(q) == shapes(ref)
    trees[scan] = jlora.dequantize(quantized_init(cfg, jax.random.key(5), scheme="nf4",
                                                  min_size=0))
  flat, stacked = trees[False], trees[True]
  for i in range(cfg.num_hidden_layers):
    jax.tree.map(np.testing.assert_array_equal, flat[f"layers_{i}"],
                 jax.tree.map(lambda a: a[i], stacked["layers"]))
  w = stacked["layers"]["mlp"]["up_proj"]["kernel"]
  assert abs(float(jnp.std(w)) / cfg.initializer_range - 1) < 0.05  # the model's initializer
  assert float(jnp.abs(w[0] - w[1]).max()) > 0  # each layer its own draw
