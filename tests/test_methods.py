"""The fine-tuning family: trainable sets by path, IA³, bottleneck adapters, prompt and
prefix tuning, DPO. Float64 NumPy references at 1e-5 relative (float32 compute)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import paths, train
from jlora.errors import AdapterError, ConfigError
from jlora.methods import bottleneck, dpo, ia3, prefix, prompt, select
from jlora.models import KVCache, Llama, preset, unboxed_init
from conftest import rel_err


# ----------------------------------------------------------------------------- select + train

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):                        # x: [B, 7]
    h = nn.LayerNorm(name="norm")(nn.Dense(5, name="up_proj")(x))
    return nn.Dense(3, name="down_proj")(jnp.tanh(h))


@pytest.fixture(scope="module")
def net():
  x = jax.random.normal(jax.random.key(0), (4, 7))
  params = Net().init(jax.random.key(1), x)["params"]
  return Net(), params, x


def test_selections_split_and_join(net):
  _, params, _ = net
  flat = paths.flatten(params)
  for sel, want in [(select.BIASES, {"up_proj/bias", "down_proj/bias", "norm/bias"}),
                    (select.NORMS, {"norm/scale"}),
                    (select.ALL, set(flat)),
                    (r".*_proj/kernel", {"up_proj/kernel", "down_proj/kernel"}),
                    (["up_proj", "norm/scale"], {"up_proj/kernel", "up_proj/bias", "norm/scale"}),
                    (lambda p, x: x.ndim == 2, {"up_proj/kernel", "down_proj/kernel"})]:
    t, f = select.split(params, sel)
    assert set(select.selected_paths(t)) == want, sel
    assert set(select.selected_paths(f)) == set(flat) - want
    back = paths.flatten(select.join(t, f))
    assert all(back[p] is flat[p] for p in flat)
  with pytest.raises(ConfigError, match="picks no leaf.*no biases: BitFit needs"):
    select.split({"k": {"kernel": jnp.ones((2, 2))}}, select.BIASES)
  with pytest.raises(ConfigError, match="both the trainable and the frozen tree hold 'a'"):
    select.join({"a": 1.0}, {"a": 2.0})
  with pytest.raises(ConfigError, match="a trainable selection is"):
    select.split(params, 3)


def _dots_shaped(step, args, shapes):
  """The dot_general equations of ``step``'s jaxpr (nested ones too) with an output in ``shapes``."""
  def subjaxprs(params):
    for v in params.values():
      for u in v if isinstance(v, (list, tuple)) else [v]:
        if hasattr(u, "eqns"):
          yield u
        elif hasattr(getattr(u, "jaxpr", None), "eqns"):
          yield u.jaxpr

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        yield tuple(eqn.outvars[0].aval.shape)
      for sub in subjaxprs(eqn.params):
        yield from walk(sub)
  return [s for s in walk(jax.make_jaxpr(step)(*args).jaxpr) if s in shapes]


@pytest.mark.parametrize("sel", ["biases", "all", "lora+norms"])
def test_gradients_reach_exactly_the_selected_leaves(net, sel):
  """One AdamW step changes exactly the selected leaves (every other leaf keeps its
  bytes), optimizer state exists only for them, and the step's jaxpr forms no
  weight gradient of a frozen kernel (no dot_general of a kernel's shape)."""
  model, params, x = net
  y = jnp.ones((4, 3))
  if sel == "lora+norms":
    ad = jlora.init_adapter(jax.random.key(2), params, jlora.LoraConfig(rank=2, targets=["up_proj"]))
    ad = jax.tree.map(lambda v: v + 0.3, ad)             # b != 0, so a gets a gradient too
    tree, selection = {"adapter": ad, "params": params}, ["adapter", "norms"]
    def loss_fn(t, base, batch, rng):
      out = jlora.apply(model, {"params": t["params"]}, t["adapter"], batch)
      return jnp.mean((out - y) ** 2)
    want = {"adapter/up_proj/kernel", "params/norm/scale"}
  else:
    tree, selection = params, sel
    def loss_fn(t, base, batch, rng):
      return jnp.mean((model.apply({"params": t}, batch) - y) ** 2)
    want = set(select.selected_paths(select.split(params, sel)[0]))
  opt = train.make_optimizer(1e-2)
  state = train.init_train_state(tree, opt, trainable=selection)
  step = train.make_train_step(loss_fn, opt, trainable=selection, donate=False)
  new, state2, metrics = step(tree, state, None, x)
  before, after = paths.flatten(tree), paths.flatten(new)
  changed = {p for p in before if not all(
      np.array_equal(u, v) for u, v in zip(jax.tree.leaves(before[p]), jax.tree.leaves(after[p])))}
  assert changed == want and float(metrics["grad_norm"]) > 0
  adam = state2[0]
  assert set(select.selected_paths(adam.mu)) == want == set(select.selected_paths(adam.nu))
  n_state = sum(v.size for v in jax.tree.leaves((adam.mu, adam.nu)))
  assert n_state == 2 * sum(before[p].size if hasattr(before[p], "size") else
                            sum(v.size for v in jax.tree.leaves(before[p])) for p in want)
  kernels = {(7, 5), (5, 7), (5, 3), (3, 5)}          # either layout of a kernel's gradient
  grads_formed = _dots_shaped(step, (tree, state, None, x), kernels)
  assert (len(grads_formed) == 2) == (sel == "all") and len(grads_formed) in (0, 2)


# ----------------------------------------------------------------------------- IA³

def _mlp(rng):
  """A function with a 2-D and a DenseGeneral-like 3-D weight, non-square, used as matmuls."""
  p = {"k_proj": {"kernel": rng.normal(size=(6, 2, 5))},        # [in, heads, head] (2 out axes)
       "down_proj": {"kernel": rng.normal(size=(10, 4))}}
  p = jax.tree.map(lambda v: jnp.asarray(v * 0.4, jnp.float32), p)
  def fn(p, x):
    h = jnp.einsum("bi,ihd->bhd", x, p["k_proj"]["kernel"]).reshape(x.shape[0], 10)
    return jnp.tanh(h) @ p["down_proj"]["kernel"]
  return p, fn


@pytest.mark.parametrize("jit", [False, True])
def test_ia3_equals_float64_reference_and_merges_exactly(rng, jit):
  p, fn = _mlp(rng)
  x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  ad = ia3.init_ia3(p, feedforward=["down_proj"], model=fn, args=(x,))
  run = jax.jit(lambda p, ad: jlora.adapt(fn, p, ad)(x)) if jit else (
      lambda p, ad: jlora.adapt(fn, p, ad)(x))
  np.testing.assert_array_equal(run(p, ad), fn(p, x))          # ones: no change at all
  ad = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype), ad)
  lo = np.asarray(ad["k_proj"]["kernel"].out, np.float64)     # [2, 5]
  li = np.asarray(ad["down_proj"]["kernel"].inp, np.float64)  # [10]
  w1 = np.asarray(p["k_proj"]["kernel"], np.float64)
  w2 = np.asarray(p["down_proj"]["kernel"], np.float64)
  h = np.einsum("bi,ihd->bhd", np.asarray(x, np.float64), w1) * lo[None]
  ref = (np.tanh(h.reshape(3, 10)) * li[None]) @ w2
  assert rel_err(run(p, ad), ref) < 1e-5
  merged = (jax.jit(jlora.merge) if jit else jlora.merge)(p, ad)
  assert rel_err(fn(merged, x), ref) < 1e-5
  back = jlora.unmerge(merged, ad)
  assert rel_err(back["k_proj"]["kernel"], w1) < 1e-6
  with pytest.raises(AdapterError, match="'k_proj/kernel' has out: \\[2, 4\\]"):
    bad = {"k_proj": {"kernel": ad["k_proj"]["kernel"].replace(out=jnp.ones((2, 4)))}}
    jlora.adapt(fn, p, bad)(x)


def test_ia3_through_a_quantized_base(rng):
  """Through an NF4 base IA³ equals the dequantized base; merge re-quantizes."""
  p, fn = _mlp(rng)
  x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  ad = ia3.init_ia3(p, model=fn, args=(x,))
  ad = jax.tree.map(lambda v: v * jnp.asarray(1 + 0.5 * rng.normal(size=v.shape), v.dtype), ad)
  q = jlora.quantize(p, scheme="nf4", min_size=0)
  run = jax.jit(lambda p, ad: jlora.adapt(fn, p, ad)(x))
  assert rel_err(run(q, ad), run(jlora.dequantize(q), ad)) < 1e-5
  qm = jlora.merge(q, ad)
  assert isinstance(qm["k_proj"]["kernel"], jlora.QArray)
  assert rel_err(jlora.dequantize(qm)["k_proj"]["kernel"],
                 jlora.merge(jlora.dequantize(q), ad)["k_proj"]["kernel"]) < 0.15   # NF4 rounding


# ----------------------------------------------------------------------------- bottleneck

def test_bottleneck_equals_float64_reference_and_does_not_merge(rng):
  p, fn = _mlp(rng)
  x = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  ad = bottleneck.init_bottleneck(jax.random.key(0), p, width=3, targets=["k_proj"],
                                  activation="gelu", model=fn, args=(x,))
  node = ad["k_proj"]["kernel"]
  assert (node.down.shape, node.up.shape, node.up_bias.shape) == ((2, 5, 3), (3, 2, 5), (2, 5))
  np.testing.assert_array_equal(jlora.adapt(fn, p, ad)(x), fn(p, x))   # up = 0: no change
  ad = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype) * 0.5, ad)
  node = ad["k_proj"]["kernel"]
  f64 = lambda v: np.asarray(v, np.float64)
  y = np.einsum("bi,ihd->bhd", f64(x), f64(p["k_proj"]["kernel"])).reshape(3, 10)
  z = y @ f64(node.down).reshape(10, 3) + f64(node.down_bias)
  gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  y = y + gelu @ f64(node.up).reshape(3, 10) + f64(node.up_bias).reshape(10)
  ref = np.tanh(y) @ f64(p["down_proj"]["kernel"])
  for run in (jlora.adapt(fn, p, ad), jax.jit(lambda x: jlora.adapt(fn, p, ad)(x))):
    assert rel_err(run(x), ref) < 1e-5
  with pytest.raises(AdapterError, match="'k_proj/kernel' adds a nonlinear function"):
    jlora.merge(p, ad)
  elementwise = lambda p, x: jnp.sum(p["k_proj"]["kernel"]) * x
  with pytest.raises(AdapterError, match="cannot be merged into the weight"):
    jlora.adapt(elementwise, p, ad)(x)


def test_ia3_and_bottleneck_in_a_scanned_llama_equal_unrolled(rng):
  """One adapter tree with IA³ on k/v/down_proj and Houlsby-style bottlenecks on o_proj:
  a scanned Llama (stacked nodes sliced by the scan) equals the same layers unrolled."""
  cfg = preset("tiny")
  ids = jnp.asarray(rng.integers(0, 128, (2, 5)), jnp.int32)
  model, scanned = Llama(cfg), Llama(cfg.replace(scan_layers=True))
  params = unboxed_init(model, jax.random.key(0), ids)
  ad = ia3.init_ia3(params)                  # 2-D kernels: read as [in, out] without tracing
  bn = bottleneck.init_bottleneck(jax.random.key(1), params, width=4, targets=["o_proj"])
  flat = {**paths.flatten(ad), **paths.flatten(bn)}
  assert len(flat) == 8
  ad = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype) * 0.2,
                    paths.unflatten(flat))
  stack = lambda t: {"layers": jax.tree.map(lambda *v: jnp.stack(v), t["layers_0"], t["layers_1"])}
  sp = {**{k: v for k, v in params.items() if not k.startswith("layers_")}, **stack(params)}
  sad = stack(ad)
  node = sad["layers"]["self_attn"]["o_proj"]["kernel"]
  assert node.stack == 1 and sad["layers"]["mlp"]["down_proj"]["kernel"].stack == 1
  run = jax.jit(lambda m, p, a: jlora.apply(m, {"params": p}, a, ids), static_argnums=0)
  assert rel_err(run(scanned, sp, sad), run(model, params, ad)) < 1e-5


# ----------------------------------------------------------------------------- prompt, prefix

@pytest.fixture(scope="module")
def llama():
  cfg = preset("tiny")
  model = Llama(cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 128, (2, 6)), jnp.int32)
  return model, unboxed_init(model, jax.random.key(0), ids), ids


def test_prompt_of_token_embeddings_equals_those_tokens_prepended(llama):
  """A prompt made of the embeddings of tokens t equals running on [t; ids] (exact);
  the attention mask is extended by ones."""
  model, params, ids = llama
  toks = jnp.array([7, 9, 11])
  pr = prompt.Prompt(params["embed_tokens"]["embedding"][toks])
  full = jnp.concatenate([jnp.broadcast_to(toks, (2, 3)), ids], axis=1)
  mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
  both = jax.jit(lambda pr, ids, m: (
      prompt.apply(model, params, pr, ids, attention_mask=m),
      model.apply({"params": params}, full, attention_mask=prompt.extend_mask(pr, m))))
  got, want = both(pr, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  e, m = prompt.prepend(pr, jnp.zeros((2, 6, 64)), mask)
  assert e.shape == (2, 9, 64) and m.tolist()[1] == [1, 1, 1, 0, 0, 1, 1, 1, 1]
  with pytest.raises(AdapterError, match="no nn.Embed embedded the input ids"):
    prompt.apply(TableLM(), {"table": jnp.ones((128, 64))}, pr, ids)


class TableLM(nn.Module):
  """Looks its ids up without an nn.Embed (so prompt.apply cannot find the embedding)."""
  @nn.compact
  def __call__(self, ids):
    return self.param("table", nn.initializers.ones, (128, 64))[ids]


def test_prefix_of_computed_keys_equals_those_tokens_prepended(llama):
  """A prefix holding the keys and values the model computes for tokens t equals
  running on [t; ids] (for the ids' positions), with and without a mask; the MLP
  reparameterisation equals its float64 NumPy form."""
  model, params, ids = llama
  cfg = model.config
  toks = jnp.broadcast_to(jnp.array([7, 9, 11]), (2, 3))

  @jax.jit
  def both(ids, mask):
    _, filled = model.apply({"params": params}, toks, cache=KVCache.init(cfg, 2, 3))
    kv = jnp.stack([filled.k[:, 0], filled.v[:, 0]], axis=1)            # [L, 2, n, K, H]
    flat = jnp.transpose(kv, (2, 0, 1, 3, 4)).reshape(3, -1)            # PEFT's layout
    px = prefix.Prefix(flat, num_layers=2, num_kv_heads=2, head_size=16)
    full = jnp.concatenate([toks, ids], axis=1)
    want = model.apply({"params": params}, full, attention_mask=jnp.concatenate(
        [jnp.ones((2, 3), jnp.int32), mask], axis=1))[:, 3:]
    return prefix.apply(model, params, px, ids, attention_mask=mask), want, px

  for mask in (jnp.ones((2, 6), jnp.int32), jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])):
    got, want, px = both(ids, mask)
    real = np.asarray(mask, bool)
    assert rel_err(np.asarray(got)[real], np.asarray(want)[real]) < 1e-5
  mlp = prefix.init_prefix(jax.random.key(0), cfg, 3, projection=5)
  f64 = lambda v: np.asarray(v, np.float64)
  ref = np.tanh(f64(mlp.embedding) @ f64(mlp.w1) + f64(mlp.b1)) @ f64(mlp.w2) + f64(mlp.b2)
  assert rel_err(mlp.flat(), ref) < 1e-5 and rel_err(mlp.frozen().embedding, ref) < 1e-5
  with pytest.raises(AdapterError, match="made for 2 layers .* the model has 3 layers"):
    prefix.apply(Llama(cfg.replace(num_hidden_layers=3)), params, px, ids)


def test_trained_trees_save_and_restore(tmp_path, llama):
  model, params, ids = llama
  trees = {"prompt": prompt.init_prompt(jax.random.key(0), 2, params["embed_tokens"]["embedding"]),
           "prefix": prefix.init_prefix(jax.random.key(1), model.config, 2, projection=4),
           "ia3": ia3.init_ia3(params), "adapter": bottleneck.init_bottleneck(
               jax.random.key(2), params, width=2, placement="pfeiffer")}
  jlora.save(tmp_path / "t", trees)
  back = jlora.restore(tmp_path / "t")
  assert jax.tree.structure(back) == jax.tree.structure(trees)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trees)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- DPO

def test_dpo_and_ipo_losses_equal_float64_formulas(rng):
  pc, pr, rc, rr = (rng.normal(size=5) * 3 for _ in range(4))
  z = (pc - pr) - (rc - rr)
  logsig = lambda v: -np.logaddexp(0, -v)
  for kind, eps, want in [("sigmoid", 0.0, -logsig(0.3 * z)),
                          ("sigmoid", 0.2, -0.8 * logsig(0.3 * z) - 0.2 * logsig(-0.3 * z)),
                          ("ipo", 0.0, (z - 1 / 0.6) ** 2)]:
    loss, m = dpo.dpo_loss(*(jnp.asarray(v, jnp.float32) for v in (pc, pr, rc, rr)), beta=0.3,
                           kind=kind, label_smoothing=eps)
    assert abs(float(loss) - want.mean()) < 1e-5 * max(1, abs(want.mean()))
    margin = 0.3 * ((pc - rc) - (pr - rr))
    assert abs(float(m["reward_margin"]) - margin.mean()) < 1e-5
    assert float(m["accuracy"]) == pytest.approx(np.mean(margin > 0))
  logits = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  ids, mask = jnp.array([[1, 2, 3, 4], [5, 0, 1, 2]]), jnp.array([[0, 0, 1, 1], [0, 1, 1, 1]])
  lp = np.asarray(logits, np.float64)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  ref = [sum(lp[b, t - 1, int(ids[b, t])] for t in range(1, 4) if mask[b, t]) for b in (0, 1)]
  assert rel_err(dpo.sequence_logps(logits, ids, mask), ref) < 1e-6
  with pytest.raises(ConfigError, match="kind must be one of"):
    dpo.dpo_loss(*(jnp.zeros(1),) * 4, kind="kto")


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, ids):                           # [B, T] -> [B, T, 16]
    x = nn.Embed(16, 8, name="embed_tokens")(ids)
    x = jnp.cumsum(nn.Dense(8, name="q_proj")(x), axis=1)   # a causal mix of the prefix
    return nn.Dense(16, name="lm_head")(jnp.tanh(x))


def test_dpo_reference_with_the_adapter_off_equals_a_second_model_copy():
  """The adapter-off reference (one base) gives the loss and the gradient that an
  explicitly held second copy of the model gives, for DPO and IPO."""
  model = TinyLM()
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 16, (3, 6)), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  ad = jlora.init_adapter(jax.random.key(3), params, jlora.LoraConfig(rank=2, targets=["q_proj"]))
  ad = jax.tree.map(lambda v: v + 0.2, ad)
  mask = jnp.array([[0, 0, 0, 1, 1, 1]] * 3)
  batch = {"chosen": ids, "rejected": ids[::-1], "chosen_mask": mask, "rejected_mask": mask}
  logits_fn = lambda a, base, x: jlora.apply(model, {"params": base}, a, x)
  second = jax.tree.map(jnp.copy, params)
  copy = lambda base, x: model.apply({"params": second}, x)

  @jax.jit
  def both(ad, params, batch):
    out = {}
    for kind in dpo.KINDS:
      for name, ref in (("off", None), ("copy", copy)):
        fn = dpo.make_loss_fn(logits_fn, beta=0.5, kind=kind, reference_fn=ref)
        out[kind, name] = jax.value_and_grad(fn, has_aux=True)(ad, params, batch)
    return out

  out = both(ad, params, batch)
  for kind in dpo.KINDS:
    (l1, m1), g1 = out[kind, "off"]
    (l2, m2), g2 = out[kind, "copy"]
    assert abs(float(l1) - float(l2)) < 1e-6 and float(l1) > 0, kind
    assert float(m1["reward_margin"]) == pytest.approx(float(m2["reward_margin"]), abs=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jax.tree.leaves(g1)[0]).max()) > 0
