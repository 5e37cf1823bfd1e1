"""jlora.train: optimizer labels (LoRA+), adapter-only steps, accumulation, donation, lm_loss.

The model is a hand-written linear layer ``y = (x @ W + s·(x @ a) @ b + bias) · m``
whose LoRA term is computed from a jlora LoRA node, so these tests need only
jlora.lora; ``m`` is a per-output gain stored as the LoRA's ``magnitude`` to
exercise its optimizer label (it is not DoRA's formula).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import rel_err
from jlora import train
from jlora.lora import LoRA

IN, OUT, R = 24, 40, 3  # distinct sizes: any [IN, OUT] value in a jaxpr is a kernel gradient
ALPHA = 6.0


def make_base(rng):
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(IN, OUT)) / math.sqrt(IN), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(OUT,)), jnp.float32)}}


def make_adapter(rng, magnitude=False):
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)
  mag = jnp.asarray(1.0 + 0.1 * rng.normal(size=(OUT,)), jnp.float32) if magnitude else None
  return {"dense": {"kernel": LoRA(a=f(IN, R), b=f(R, OUT), magnitude=mag, alpha=ALPHA, rank=R)}}


def make_batch(rng, n):
  return {"x": jnp.asarray(rng.normal(size=(n, IN)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(n, OUT)), jnp.float32)}


def predict(adapter, base, x):
  lo, p = adapter["dense"]["kernel"], base["dense"]
  h = x @ p["kernel"] + lo.scale * (x @ lo.a) @ lo.b + p["bias"][None, :]
  return h if lo.magnitude is None else h * lo.magnitude[None, :]


def mse_loss(adapter, base, batch, rng):
  return jnp.mean((predict(adapter, base, batch["x"]) - batch["y"]) ** 2)


def np_grads(p, base, batch):
  """float64 gradients of mse_loss w.r.t. a, b, m."""
  w, bias = (np.asarray(base["dense"][k], np.float64) for k in ("kernel", "bias"))
  x, y = (np.asarray(batch[k], np.float64) for k in ("x", "y"))
  s = ALPHA / R
  xa = x @ p["a"]
  h = x @ w + s * xa @ p["b"] + bias
  g = 2.0 * (h * p["m"] - y) / y.size
  dh = g * p["m"]
  return {"a": s * x.T @ (dh @ p["b"].T), "b": s * xa.T @ dh, "m": (h * g).sum(0)}


def np_adamw(p, base, batches, lr, wd, ratio, b1=0.9, b2=0.999, eps=1e-8):
  """float64 AdamW with LoRA+ rates (b: ratio·lr), one step per batch."""
  p = {k: v.copy() for k, v in p.items()}
  mu = {k: np.zeros_like(v) for k, v in p.items()}
  nu = {k: np.zeros_like(v) for k, v in p.items()}
  for t, batch in enumerate(batches, start=1):
    g = np_grads(p, base, batch)
    for k in p:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      u = (mu[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps) + wd * p[k]
      p[k] = p[k] - (lr * ratio if k == "b" else lr) * u
  return p


def as_np(adapter):
  lo = adapter["dense"]["kernel"]
  return {"a": np.asarray(lo.a, np.float64), "b": np.asarray(lo.b, np.float64),
          "m": np.asarray(lo.magnitude, np.float64)}


def test_param_labels():
  lo = LoRA(a=jnp.ones((4, 2)), b=jnp.ones((2, 6)), magnitude=jnp.ones(6))
  labels = train.param_labels({"d": {"kernel": lo}, "prompt": jnp.ones(3)})
  assert (labels["d"]["kernel"].a, labels["d"]["kernel"].b) == ("lora_a", "lora_b")
  assert labels["d"]["kernel"].magnitude == "magnitude" and labels["prompt"] == "other"
  plain = train.param_labels({"d": LoRA(a=jnp.ones((4, 2)), b=jnp.ones((2, 6)))})
  assert plain["d"].magnitude is None


@pytest.mark.parametrize("jit", [True, False])
def test_loraplus_adamw_matches_numpy(rng, jit):
  """Two AdamW steps with LoRA+ (b at 8× the rate; a and magnitude at the base rate)."""
  base, ad = make_base(rng), make_adapter(rng, magnitude=True)
  batches = [make_batch(rng, 5) for _ in range(2)]
  lr, wd, ratio = 1e-2, 0.05, 8.0
  ref = np_adamw(as_np(ad), base, batches, lr, wd, ratio)
  opt = train.make_optimizer(lr, weight_decay=wd, loraplus_ratio=ratio)
  step = train.make_train_step(mse_loss, opt, jit=jit)
  state = train.init_train_state(ad, opt)
  start = as_np(ad)
  for batch in batches:
    ad, state, metrics = step(ad, state, base, batch, None)
  got = as_np(ad)
  for k in ("a", "b", "m"):
    assert rel_err(got[k] - start[k], ref[k] - start[k]) < 1e-4, k
  # the b update is ratio× what plain AdamW gives; a's is the same
  plain = np_adamw(start, base, batches, lr, wd, 1.0)
  assert rel_err(got["b"] - start["b"], ratio * (plain["b"] - start["b"])) < 0.3
  assert rel_err(got["b"] - start["b"], plain["b"] - start["b"]) > 0.5


def test_without_loraplus_is_optax_adamw(rng):
  base, ad, batch = make_base(rng), make_adapter(rng), make_batch(rng, 5)
  ours = train.make_optimizer(3e-3, weight_decay=0.1)
  theirs = optax.adamw(3e-3, weight_decay=0.1)
  g = jax.grad(mse_loss)(ad, base, batch, None)
  u1, _ = ours.update(g, ours.init(ad), ad)
  u2, _ = theirs.update(g, theirs.init(ad), ad)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=0)


def _run(opt, ad, base, batches):
  step = train.make_train_step(mse_loss, opt, donate=False)
  state = train.init_train_state(ad, opt)
  history = []
  for batch in batches:
    ad, state, _ = step(ad, state, base, batch)
    history.append(ad)
  return history


def test_grad_accum_equals_big_batch(rng):
  k, n = 3, 4
  base, ad = make_base(rng), make_adapter(rng, magnitude=True)
  micro = [make_batch(rng, n) for _ in range(2 * k)]
  big = [jax.tree.map(lambda *xs: jnp.concatenate(xs), *micro[i:i + k]) for i in (0, k)]
  kw = dict(weight_decay=0.01, loraplus_ratio=4.0, clip_norm=10.0)
  acc = _run(train.make_optimizer(1e-2, grad_accum=k, **kw), ad, base, micro)
  ref = _run(train.make_optimizer(1e-2, **kw), ad, base, big)
  leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  for i in range(k - 1):  # no change before the k-th micro-step
    np.testing.assert_array_equal(leaves(acc[i]), leaves(ad))
  assert rel_err(leaves(acc[k - 1]) - leaves(ad), leaves(ref[0]) - leaves(ad)) < 1e-5
  assert rel_err(leaves(acc[-1]) - leaves(ad), leaves(ref[1]) - leaves(ad)) < 1e-5
  # the check can fail: stepping on the last micro-batch alone lands elsewhere
  last_only = _run(train.make_optimizer(1e-2, **kw), ad, base, [micro[k - 1]])
  assert rel_err(leaves(last_only[0]) - leaves(ad), leaves(ref[0]) - leaves(ad)) > 1e-2


def quantized_loss(adapter, base, batch, rng):
  """The base kernel stored as int8 codes × a per-column scale (a stand-in for QArray)."""
  p = base["dense"]
  w = p["codes"].astype(jnp.float32) * p["scale"][None, :]
  plain = {"dense": {"kernel": w, "bias": p["bias"]}}
  err = predict(adapter, plain, batch["x"]) - batch["y"]
  return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


def test_loss_decreases_with_integer_base(rng):
  """Learn a rank-2 correction of an int8 base; the base stays as it was."""
  w = rng.normal(size=(IN, OUT)) / math.sqrt(IN)
  scale = np.abs(w).max(0) / 127
  base = {"dense": {"codes": jnp.asarray(np.round(w / scale), jnp.int8),
                    "scale": jnp.asarray(scale, jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(OUT,)), jnp.float32)}}
  before = jax.tree.map(np.array, base)
  w_true = np.asarray(base["dense"]["codes"], np.float64) * scale
  w_true = w_true + rng.normal(size=(IN, 2)) @ rng.normal(size=(2, OUT)) / IN
  ad = {"dense": {"kernel": LoRA(a=jnp.asarray(rng.uniform(-.2, .2, (IN, R)), jnp.float32),
                                 b=jnp.zeros((R, OUT), jnp.float32), alpha=ALPHA, rank=R)}}
  xs = rng.normal(size=(8, 16, IN))
  data = [{"x": jnp.asarray(x, jnp.float32),
           "y": jnp.asarray(x @ w_true + before["dense"]["bias"], jnp.float32)} for x in xs]
  opt = train.make_optimizer(3e-2, loraplus_ratio=2.0)
  step = train.make_train_step(quantized_loss, opt, has_aux=True)
  state = train.init_train_state(ad, opt)
  losses = []
  for i in range(150):
    ad, state, m = step(ad, state, base, data[i % len(data)], jax.random.key(i))
    losses.append(float(m["loss"]))
  assert set(m) == {"loss", "grad_norm", "aux", "skipped"} and float(m["grad_norm"]) > 0
  assert np.mean(losses[-8:]) < 0.05 * np.mean(losses[:8]), (losses[:8], losses[-8:])
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    assert not x.is_deleted()
    np.testing.assert_array_equal(np.asarray(x), y)


def test_donation(rng):
  base, ad, batch = make_base(rng), make_adapter(rng), make_batch(rng, 5)
  opt = train.make_optimizer(1e-3)
  state = train.init_train_state(ad, opt)
  step = train.make_train_step(mse_loss, opt)
  ad2, state2, _ = step(ad, state, base, batch)
  assert all(x.is_deleted() for x in jax.tree.leaves((ad, state)))
  assert not any(x.is_deleted() for x in jax.tree.leaves((ad2, state2, base, batch)))
  keep = train.make_train_step(mse_loss, opt, donate=False)
  keep(ad2, state2, base, batch)
  assert not any(x.is_deleted() for x in jax.tree.leaves((ad2, state2)))


def _produced_shapes(jaxpr):
  """Shapes of every value an equation computes, inner jaxprs (jit, scan, ...) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in eqn.outvars]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += _produced_shapes(inner)
  return shapes


def test_no_base_gradient_is_formed(rng):
  """A kernel gradient would be an [IN, OUT] (or [OUT, IN]) value; the step computes none."""
  base, ad, batch = make_base(rng), make_adapter(rng), make_batch(rng, 5)
  opt = train.make_optimizer(1e-3)
  step = train.make_train_step(mse_loss, opt)
  jaxpr = jax.make_jaxpr(step)(ad, train.init_train_state(ad, opt), base, batch, None)
  kernel_like = {(IN, OUT), (OUT, IN)}
  assert not kernel_like & set(_produced_shapes(jaxpr.jaxpr))
  # the detector does see a base gradient when one is asked for
  both = jax.make_jaxpr(jax.grad(mse_loss, argnums=(0, 1)))(ad, base, batch, None)
  assert kernel_like & set(_produced_shapes(both.jaxpr))


def np_lm_loss(logits, targets, mask):
  z = np.asarray(logits, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.ones(ce.shape) if mask is None else np.asarray(mask, np.float64)
  return (ce * w).sum() / max(w.sum(), 1.0)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lm_loss_matches_numpy(rng, jit, dtype):
  logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 4, dtype)
  targets = jnp.asarray(rng.integers(0, 11, size=(3, 5)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 5)) < 0.6).at[0, 0].set(True)
  fn = jax.jit(train.lm_loss) if jit else train.lm_loss
  for m in (None, mask, mask.astype(jnp.float32)):
    got = fn(logits, targets, m)
    assert got.dtype == jnp.float32 and got.shape == ()
    assert rel_err(got, np_lm_loss(np.asarray(logits, np.float32), targets, m)) < 1e-6
  assert float(fn(logits, targets, jnp.zeros((3, 5), bool))) == 0.0


def test_lm_loss_errors():
  logits = jnp.zeros((2, 5, 7))
  with pytest.raises(ValueError, match=r"targets \[2, 4\].*\[2, 5\]"):
    train.lm_loss(logits, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"mask \[5\]"):
    train.lm_loss(logits, jnp.zeros((2, 5), jnp.int32), jnp.ones(5))
  with pytest.raises(TypeError, match="integer"):
    train.lm_loss(logits, jnp.zeros((2, 5)))


def test_argument_errors():
  for kw in (dict(learning_rate=0.0), dict(weight_decay=-1.0), dict(loraplus_ratio=0.0),
             dict(grad_accum=0), dict(grad_accum=2.0), dict(clip_norm=-1.0)):
    with pytest.raises(ValueError, match=next(iter(kw))):
      train.make_optimizer(**kw)
  bad = {"dense": {"kernel": jnp.zeros((4, 4), jnp.int8)}}
  with pytest.raises(TypeError, match="'dense/kernel'"):
    train.init_train_state(bad, train.make_optimizer())


def test_schedule_with_loraplus():
  """A schedule is accepted, and LoRA+ multiplies it for b."""
  lo = LoRA(a=jnp.ones((4, 2)), b=jnp.ones((2, 6)))
  opt = train.make_optimizer(optax.linear_schedule(1e-2, 0.0, 10), loraplus_ratio=3.0)
  grads = {"d": LoRA(a=jnp.full((4, 2), 0.5), b=jnp.full((2, 6), -2.0))}
  u, _ = opt.update(grads, opt.init({"d": lo}), {"d": lo})
  np.testing.assert_allclose(u["d"].a, -1e-2, rtol=1e-5)  # first Adam step is lr·sign(g)
  np.testing.assert_allclose(u["d"].b, 3e-2, rtol=1e-5)


def test_llama_adapter_learns_on_held_out_data():
  """End to end: jlora.apply on the reference Llama; only the adapter trains.

  Task: output the previous token (an attention pattern the random base lacks).
  Held-out sequences are drawn from another seed; their loss must fall 10×.
  """
  from jlora.models import Llama, preset, unboxed_init
  import jlora
  vocab = 16
  model = Llama(preset("tiny", vocab_size=vocab, tie_word_embeddings=True, initializer_range=0.1))
  batch = lambda seed, n: jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (n, 12)),
                                      jnp.int32)
  base = unboxed_init(model, jax.random.key(0), batch(0, 1))
  before = jax.tree.map(np.array, base)
  adapter = jlora.init_adapter(jax.random.key(1), base, jlora.LoraConfig(rank=4, alpha=8),
                               model=model, args=(batch(0, 1),))

  def loss_fn(adapter, base, ids, rng):
    logits = jlora.apply(model, {"params": base}, adapter, ids)
    return train.lm_loss(logits[:, 1:], ids[:, :-1])

  held = batch(999, 64)
  held_loss = jax.jit(loss_fn)
  start = float(held_loss(adapter, base, held, None))
  opt = train.make_optimizer(1e-2)
  step = train.make_train_step(loss_fn, opt)
  state = train.init_train_state(adapter, opt)
  for i in range(80):
    adapter, state, _ = step(adapter, state, base, batch(i + 1, 16), None)
  end = float(held_loss(adapter, base, held, None))
  assert start > 2.0 and end < 0.1 * start, (start, end)
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(x), y)
