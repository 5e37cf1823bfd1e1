"""Pipeline parallelism on 8 simulated CPU devices: the schedules, and the reference Llama's
pipelined LoRA + QLoRA step (GPipe and 1F1B, 2 and 4 stages, alone and with data/FSDP)
against the unpipelined step; pipelined KV-cache generation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import rel_err
from jlora import ConfigError
from jlora import lora as L
from jlora import sharding as S

FAST = {"xla_backend_optimization_level": 0,      # CPU compile time; numerics unchanged
        "xla_llvm_disable_expensive_passes": True}


# ---- the schedules -----------------------------------------------------------

@pytest.mark.parametrize("schedule", S.SCHEDULES)
@pytest.mark.parametrize("stages,micro", [(2, 1), (2, 4), (4, 4), (4, 12), (8, 3)])
def test_schedule_table_bubble_matches_formula(schedule, stages, micro):
  table = S.schedule_table(schedule, stages, micro)
  fwd, bwd = table["forward"], table["backward"]
  for t in (fwd, bwd):           # every stage runs every microbatch once each way
    for s in range(stages):
      assert sorted(t[:, s][t[:, s] >= 0].tolist()) == list(range(micro))
  # a microbatch reaches stage s + 1 the tick after stage s (forward), and the reverse
  for m in range(micro):
    f_ticks = [int(np.where(fwd[:, s] == m)[0][0]) for s in range(stages)]
    b_ticks = [int(np.where(bwd[:, s] == m)[0][0]) for s in range(stages)]
    assert np.all(np.diff(f_ticks) == 1) and np.all(np.diff(b_ticks) == -1)
    if schedule == "1f1b":     # (gpipe's backward ticks follow all forward ticks)
      assert b_ticks[-1] == f_ticks[-1]      # the last stage turns a microbatch around at once
  # the time of a tick in lockstep: a forward if any stage runs one, a backward likewise
  f_busy = (fwd >= 0).any(axis=1).sum()
  b_busy = (bwd >= 0).any(axis=1).sum()
  assert f_busy == b_busy == micro + stages - 1
  bubble = 1 - micro / f_busy
  assert bubble == pytest.approx(S.bubble_fraction(schedule, stages, micro))
  assert bubble == pytest.approx((stages - 1) / (micro + stages - 1))
  pipe = S.Pipeline(microbatches=micro, schedule=schedule)
  assert f"{100 * bubble:.1f}%" in pipe.describe(stages)
  if schedule == "1f1b":       # at most 2S - 1 microbatches between a stage's F and its B
    for s in range(stages):
      for t in range(len(fwd)):
        started = set(fwd[:t + 1, s][fwd[:t + 1, s] >= 0].tolist())
        done = set(bwd[:t, s][bwd[:t, s] >= 0].tolist())
        assert len(started - done) <= 2 * stages - 1


def test_pipeline_config_errors():
  with pytest.raises(ConfigError, match="microbatches must be a positive int"):
    S.Pipeline(microbatches=0)
  with pytest.raises(ConfigError, match="schedule must be one of"):
    S.Pipeline(microbatches=2, schedule="zero-bubble")
  pipe = S.Pipeline(microbatches=4)
  with pytest.raises(ConfigError, match="6 layers do not split into 4 stages"):
    pipe.check(4, 6, 8)
  with pytest.raises(ConfigError, match="batch of 6 rows does not split into 4 microbatches"):
    pipe.check(2, 4, 6)
  with pytest.raises(ConfigError, match="no 'stage' axis"):
    pipe.stages(S.make_mesh(data=8))
  mesh = S.make_mesh(stage=2, data=4)
  assert dict(mesh.shape) == {"stage": 2, "data": 4, "fsdp": 1, "tensor": 1}
  assert S.logical_spec(("layers", "embed", "mlp"), (4, 8, 8), mesh) == P("stage", "fsdp", "tensor")
  assert S.logical_spec(("layers",), (4,), S.make_mesh(data=8)) == P(None)
  assert S.batch_sharding(mesh, S.pipeline_rules()).spec == P(("stage", "data", "fsdp"), None)


def test_toy_stack_both_schedules_match_reference(rng):
  """A plain-function stack of 8 layers on stage 4 × data 2: values, gradients and the
  microbatch slots each stage ran (counted inside the compiled loop) are the schedule's."""
  mesh = S.make_mesh(stage=4, data=2)
  n_layers, batch, dim, micro = 8, 8, 6, 4
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)   # noqa: E731
  w, ad, x = arr(n_layers, dim, dim) / 3, arr(n_layers, dim, dim) / 10, arr(batch, dim)
  target = arr(batch, dim) / 10
  scale = jnp.float32(1.3)

  def layer(x, w):
    return jnp.tanh(x @ w), None

  def stack(w, ad, x):
    return jax.lax.scan(layer, x, w + ad)[0]

  def stage_fn(chunk, tr, x, rows):
    return stack(chunk, tr, x)

  def head(hp, ht, y, t):
    return jnp.mean((y * ht - t) ** 2)

  def reference(ad, scale, x):
    return head(None, scale, stack(w, ad, x), target)

  want = jax.value_and_grad(reference, argnums=(0, 1, 2))(ad, scale, x)
  placed = jax.device_put(w, NamedSharding(mesh, P("stage")))
  gp = S.Pipeline(microbatches=micro)

  # (gpipe's gradient is jax.grad of this loop: the Llama tests below check it)
  y, _, counts = jax.jit(lambda ad, x: S.gpipe(
      lambda c, x, r, lr, k: (stage_fn(c[0], c[1], x, r), lr), (placed, ad), x, mesh=mesh,
      pipeline=gp, return_counts=True))(ad, x)
  assert counts.tolist() == [micro] * 4                  # each stage: M busy ticks of M + S - 1
  assert float(head(None, scale, y, target)) == pytest.approx(float(want[0]), rel=1e-6)
  assert y.sharding.spec[0] == "stage"                   # the output rows split over the stages

  fb = S.Pipeline(microbatches=micro, schedule="1f1b")
  loss, d_ad, d_scale, d_x, counts = jax.jit(lambda ad, scale, x: S.one_f_one_b(
      stage_fn, head, placed, ad, None, scale, x, head_rows=target, mesh=mesh, pipeline=fb,
      return_counts=True))(ad, scale, x)
  assert counts.tolist() == [[micro, micro]] * 4
  assert float(loss) == pytest.approx(float(want[0]), rel=1e-6)
  for g, r in zip((d_ad, d_scale, d_x), want[1]):
    assert rel_err(g, r) < 1e-5
  assert d_ad.sharding.spec[0] == "stage"


# ---- the reference Llama: pipelined LoRA + QLoRA step == unpipelined step ------------
#
# As in test_sharding: attention projections float32 with LoRA, MLP projections NF4 with
# double quantization and LoRA (QLoRA), so one compiled step per mesh checks both. SGD,
# so that the adapter's change is the gradient itself (Adam's first step is ~sign(g)).

class _Llama:
  def __init__(self):
    import jlora
    from jlora import train as T
    from jlora.models import Llama, abstract_params, preset
    self.cfg = preset("tiny", scan_layers=True, num_hidden_layers=4)
    self.model = Llama(self.cfg)
    rng = np.random.default_rng(21)
    self.ids = np.asarray(rng.integers(0, self.cfg.vocab_size, (8, 12)), np.int32)
    self.boxed = abstract_params(self.cfg)
    params = jax.tree.map(lambda x: _draw(rng, x.shape), nn.unbox(self.boxed))
    self.base = jlora.quantize(params, "nf4", block_size=64, double_quant=True,
                               targets=r"layers/mlp/.*")
    from jlora import paths
    layers = {p: L.LayerInfo("dense", (0,), (1,), 1) for p in paths.flatten(params)
              if p.startswith("layers/") and p.endswith("_proj/kernel")}
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=r".*/(q_proj|v_proj|up_proj|down_proj)")
    ad = jlora.adapter.init_adapter(jax.random.key(1), params, lcfg, layers=layers)
    self.adapter = jax.tree.map(
        lambda lo: lo.replace(b=jnp.asarray(0.05 * rng.standard_normal(lo.b.shape), jnp.float32)),
        ad, is_leaf=lambda x: isinstance(x, L.LoRA))
    self.opt = optax.sgd(0.5)
    self.state = self.opt.init(self.adapter)

    def loss_fn(ad, base, batch, rng):
      logits = jlora.apply(self.model, {"params": base}, ad, batch)
      return T.lm_loss(logits[:, :-1], batch[:, 1:])
    step = T.make_train_step(loss_fn, self.opt, jit=False)
    self.want = jax.jit(step, compiler_options=FAST)(self.adapter, self.state, self.base,
                                                     jnp.asarray(self.ids))


def _draw(rng, shape):
  if len(shape) == 1:
    return jnp.asarray(1 + 0.2 * rng.standard_normal(shape), jnp.float32)
  return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)


@pytest.fixture(scope="module")
def llama():
  return _Llama()


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("schedule,stages,others,micro", [
    ("gpipe", 2, {}, 4),                          # 2 stages alone (2 devices)
    ("1f1b", 4, {}, 4),                           # 4 stages alone (4 devices)
    ("1f1b", 2, {"data": 2}, 2),                  # with data parallelism (4 devices)
    ("gpipe", 4, {"fsdp": 2}, 4),                 # with FSDP (8 devices)
])
def test_llama_pipelined_step_matches_unpipelined(llama, schedule, stages, others, micro):
  from jlora import train as T
  from jlora.models import pipeline as MP
  n = stages * int(np.prod(list(others.values()) or [1]))
  mesh = S.make_mesh(stage=stages, **others, devices=jax.devices()[:n])
  pipe = S.Pipeline(microbatches=micro, schedule=schedule)
  rules = S.pipeline_rules()
  float_sh = S.param_shardings(llama.boxed, mesh, rules)
  base_sh = S.quantized_shardings(llama.base, float_sh)
  ad_sh = S.adapter_shardings(llama.adapter, float_sh)
  st_sh = S.state_shardings(llama.state, ad_sh)
  # the layer stack, its quantized codes and its adapter are split over the stages
  assert base_sh["layers"]["self_attn"]["q_proj"]["kernel"].spec[0] == "stage"
  assert base_sh["layers"]["mlp"]["up_proj"]["kernel"].codes.spec[0] == "stage"
  assert ad_sh["layers"]["mlp"]["down_proj"]["kernel"].a.spec[0] == "stage"
  assert "stage" not in jax.tree.leaves(base_sh["lm_head"]["kernel"].spec)

  step = S.shard_train_step(T.make_train_step(MP.lm_loss_fn(llama.model, mesh, pipe), llama.opt,
                                              jit=False), mesh, base_shardings=base_sh,
                            adapter_shardings=ad_sh, state_shardings=st_sh, rules=rules,
                            compiler_options=FAST)
  base = jax.device_put(llama.base, base_sh)
  ad, _, m = step(jax.device_put(_host(llama.adapter), ad_sh),
                  jax.device_put(_host(llama.state), st_sh), base,
                  S.shard_batch(llama.ids, mesh, rules))
  want_ad, _, want_m = llama.want
  assert float(m["loss"]) == pytest.approx(float(want_m["loss"]), rel=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(float(want_m["grad_norm"]), rel=1e-5)
  before = jax.tree.leaves(llama.adapter)
  for got, want, old in zip(jax.tree.leaves(ad), jax.tree.leaves(want_ad), before):
    assert rel_err(got, want) < 1e-6
    old = np.asarray(old, np.float64)
    assert rel_err(np.asarray(got, np.float64) - old, np.asarray(want, np.float64) - old) < 1e-5
  assert ad["layers"]["mlp"]["down_proj"]["kernel"].a.sharding.spec[0] == "stage"
  print(pipe.describe(stages))


def test_pipelined_generation_is_the_models_greedy_decoding(llama):
  """KV-cache greedy decoding through the pipeline (each stage keeps its own layers' cache,
  a left-padded row included): every new token is the argmax of the unpipelined model's
  next-token logits on the sequence so far."""
  import jlora
  from jlora.models import generate
  from jlora.models import pipeline as MP
  mesh = S.make_mesh(stage=2, data=2, devices=jax.devices()[:4])
  pipe = S.Pipeline(microbatches=2)
  adapter = llama.want[0]
  prompt = jnp.asarray(llama.ids[:4, :5])
  mask = jnp.ones_like(prompt).at[0, :2].set(0)

  def piped(pa, ids, **kw):
    return MP.apply(llama.model, {"params": pa[0]}, pa[1], ids, mesh=mesh, pipeline=pipe, **kw)

  new = 4
  out = generate(llama.model, (llama.base, adapter), prompt, new, attention_mask=mask,
                 apply_fn=piped)
  full_mask = jnp.concatenate([mask, jnp.ones((4, new), mask.dtype)], axis=1)
  positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
  logits = jax.jit(lambda base, ad, ids: jlora.apply(
      llama.model, {"params": base}, ad, ids, attention_mask=full_mask, positions=positions),
      compiler_options=FAST)(llama.base, adapter, out)
  want = np.argmax(np.asarray(logits[:, 4:-1]), axis=-1)
  np.testing.assert_array_equal(np.asarray(out[:, 5:]), want)
  assert len(set(np.asarray(out[:, 5:]).ravel().tolist())) > 2     # not a constant output
  dropped = jax.tree.map(lambda lo: lo.replace(dropout=0.1), adapter,
                         is_leaf=lambda x: isinstance(x, L.LoRA))
  with pytest.raises(ConfigError, match="LoRA dropout 0.1"):
    MP.apply(llama.model, {"params": llama.base}, dropped, prompt, mesh=mesh, pipeline=pipe)
  with pytest.raises(ConfigError, match="3 stages"):
    MP.stage_config(llama.cfg, 3)
  with pytest.raises(ConfigError, match="scan_layers=True"):
    MP.stage_config(llama.cfg.replace(scan_layers=False), 2)
