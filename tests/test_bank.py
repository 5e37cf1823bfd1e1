"""Many adapters, one base: AdapterBank, mixed batches (every op kind, NF4 base,
gather and grouped), multi-tenant training, KV-cache generation, PEFT's
``adapter_names`` as the oracle, and no recompilation when the bank or the
assignment changes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import bank as B
from jlora.models import Llama, generate, preset, unboxed_init
from conftest import rel_err
from test_transform import ConvNet, GemmaStyle, linen, randomized

TOL = 2e-5
TARGETS = ([["q_proj", "v_proj", "down_proj", "embed_tokens"], ["q_proj", "up_proj"],
            ["k_proj", "o_proj", "gate_proj"]])


@pytest.fixture(scope="module")
def llama():
  rng = np.random.default_rng(0)
  model = Llama(preset("tiny"))
  ids = jnp.asarray(rng.integers(0, 128, size=(5, 6)), jnp.int32)
  params = unboxed_init(model, jax.random.key(0), ids)
  ads = {}
  for i, name in enumerate(["a", "b", "c"]):
    cfg = jlora.LoraConfig(rank=2 + i, alpha=3.0 + i, targets=TARGETS[i], use_rslora=i == 2)
    fresh = jlora.init_adapter(jax.random.key(i), params, cfg, model=model, args=(ids,))
    ads[name] = randomized(fresh, np.random.default_rng(10 + i), scale=0.3)
  return model, params, ids, ads


def alone(model, params, adapter, x, **kw):
  p = params if adapter is None else jlora.merge(params, adapter)
  return model.apply({"params": p}, x, **kw)


def test_stack_add_replace_remove_and_names(llama):
  _, params, _, ads = llama
  bank = jlora.AdapterBank.stack({"a": ads["a"], "b": ads["b"]}, capacity=4, rank=4)
  assert bank.slot_names == ["a", "b", None, None] and bank.rank == 4
  assert bank.ids(["b", None, "a"]).tolist() == [1, -1, 0]
  bank = bank.add("c", ads["c"])
  assert bank.slot_names == ["a", "b", "c", None]
  back = bank.adapter("a")
  for p, lo in jlora.adapter.loras(ads["a"]).items():
    got = jlora.adapter.loras(back)[p]
    np.testing.assert_allclose(jlora.lora.delta(got), jlora.lora.delta(lo), rtol=1e-6, atol=1e-7)
  bank = bank.remove("b")
  assert bank.slot_names == ["a", None, "c", None]
  with pytest.raises(jlora.AdapterError, match="no adapter named 'b'"):
    bank.slot("b")
  with pytest.raises(jlora.AdapterError, match="already has an adapter named 'a'"):
    bank.add("a", ads["a"])
  with pytest.raises(jlora.AdapterError, match="rank 5 > the bank's 4"):
    bank.add("big", jlora.init_adapter(jax.random.key(0), params,
                                       jlora.LoraConfig(rank=5, targets=["q_proj"])))
  full = jlora.AdapterBank.stack(ads)
  with pytest.raises(jlora.AdapterError, match="full"):
    full.add("d", ads["a"])


@pytest.mark.parametrize("method", ["slots", "gather", "grouped"])
def test_every_row_equals_its_adapter_alone(llama, method):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads, capacity=4)
  rows = ["a", None, "c", "b", "a"]
  run = jax.jit(lambda bank, aid: jlora.adapt(lambda p, x: model.apply({"params": p}, x), params,
                                              bank.bind(aid, method=method))(ids))
  out = run(bank, bank.ids(rows))
  for r, name in enumerate(rows):
    want = alone(model, params, None if name is None else ads[name], ids[r:r + 1])
    assert rel_err(out[r], want[0]) < TOL, (r, name)
  # another assignment, another bank content: no recompilation
  run(bank, bank.ids(["c", "c", None, "a", "b"]))
  run(bank.replace("b", ads["a"]).remove("c"), bank.ids(rows))
  assert run._cache_size() == 1


def test_packed_sequences_name_a_slot_per_token(llama):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads)
  tok = np.full(ids.shape, -1, np.int32)
  tok[:, :3] = bank.ids(["a"] * 5)[:, None]
  tok[:, 3:] = bank.ids(["b"] * 5)[:, None]
  # a per-token id only changes the rows of its tokens: check the projection of a Dense
  p = params["layers_0"]["mlp"]["up_proj"]["kernel"]
  x = jnp.asarray(np.random.default_rng(1).normal(size=ids.shape + (p.shape[0],)), jnp.float32)
  fn = lambda q, x: x @ q["w"]
  one = {"w": bank.nodes["layers_0/mlp/up_proj/kernel"]}
  small = jlora.AdapterBank(nodes={"w": one["w"]}, names=bank.names, rank=bank.rank)
  got = jlora.adapt(fn, {"w": p}, small.bind(jnp.asarray(tok)))(x)
  want_b = x @ jlora.merge({"w": p}, {"w": jlora.adapter.loras(ads["b"])[
      "layers_0/mlp/up_proj/kernel"]})["w"]
  assert rel_err(got[:, 3:], want_b[:, 3:]) < TOL and rel_err(got[:, :3], (x @ p)[:, :3]) < TOL


@pytest.mark.parametrize("name", ["gemma_style_einsum", "conv"])
def test_einsum_and_conv_layers_in_a_mixed_batch(name, rng):
  from test_transform import ZOO, as_fn
  make, args, cfg = ZOO[name]
  model, params = make(rng)
  ads = {k: randomized(jlora.init_adapter(jax.random.key(i), params, cfg, model=model, args=args),
                       rng) for i, k in enumerate(["x", "y"])}
  x = jnp.concatenate([args[0], args[0] * 0.5, -args[0]])
  n = args[0].shape[0]
  rows = ["y", None, "x"]
  bank = jlora.AdapterBank.stack(ads)
  aid = jnp.repeat(bank.ids(rows), n)
  out = jlora.apply(model, {"params": params}, bank, x, adapter_ids=aid)
  for r, k in enumerate(rows):
    want = as_fn(model)(params if k is None else jlora.merge(params, ads[k]), x[r * n:(r + 1) * n])
    assert rel_err(out[r * n:(r + 1) * n], want) < TOL


def test_a_mixed_batch_on_an_nf4_base(llama):
  model, params, ids, ads = llama
  q = jlora.quantize(params, "nf4", block_size=32, min_size=0)
  bank = jlora.AdapterBank.stack(ads)
  rows = ["b", "a", None, "c", "c"]
  aid = bank.ids(rows)
  got = jax.jit(lambda q, bank: jlora.apply(model, {"params": q}, bank, ids,
                                            adapter_ids=aid))(q, bank)
  want = jlora.apply(model, {"params": jlora.dequantize(q)}, bank, ids, adapter_ids=bank.ids(rows))
  assert rel_err(got, want) < TOL


def test_multi_tenant_training_equals_separate_steps(llama):
  """One step over a mixed batch of three adapters (AdamW, per-slot learning
  rates) equals three separate steps, each on its own adapter and rows."""
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads)
  rows = ["a", "b", "c", "a", "b"]
  aid = bank.ids(rows)
  targets = jnp.roll(ids, -1, axis=1)
  rates = jnp.asarray([1.0, 0.5, 2.0])
  tx = optax.adamw(1e-2, weight_decay=0.01)
  opt = B.per_slot(tx, bank.capacity, learning_rates=rates)

  def bank_loss(f):
    logits = jlora.apply(model, {"params": params}, B.with_factors(bank, f), ids, adapter_ids=aid)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, targets)     # [5, 6]
    return B.slot_mean(per_row, aid, bank.capacity)

  f = B.factors(bank)
  state = opt.init(f)
  for _ in range(2):
    g = jax.jit(jax.grad(bank_loss))(f)
    up, state = opt.update(g, state, f)
    f = optax.apply_updates(f, up)
  for k, name in enumerate(["a", "b", "c"]):
    mine = np.asarray([r == name for r in rows])
    sub_ids, sub_t = ids[mine], targets[mine]
    ad, lr = ads[name], rates[k]
    one = optax.adamw(1e-2 * lr, weight_decay=0.01)    # a slot's rate scales its whole update
    st = one.init(ad)
    loss = lambda ad: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        jlora.apply(model, {"params": params}, ad, sub_ids), sub_t))
    for _ in range(2):
      g1 = jax.jit(jax.grad(loss))(ad)
      up1, st = one.update(g1, st, ad)
      ad = optax.apply_updates(ad, up1)
    trained = B.with_factors(bank, f).adapter(name)
    for p, lo in jlora.adapter.loras(ad).items():
      got = jlora.adapter.loras(trained)[p]
      assert rel_err(jlora.lora.delta(got), jlora.lora.delta(lo)) < 1e-4, (name, p)


def test_absent_slots_are_not_stepped(llama):
  _, params, _, ads = llama
  bank = jlora.AdapterBank.stack(ads)
  f = B.factors(bank)
  opt = B.per_slot(optax.adam(0.1), bank.capacity)
  state = opt.init(f)
  g = jax.tree.map(jnp.ones_like, f)
  up, state2 = opt.update(g, state, f, slot_active=jnp.asarray([True, False, True]))
  for leaf in jax.tree.leaves(up):
    assert not np.any(np.asarray(leaf[1])) and np.any(np.asarray(leaf[0]))


def test_generation_with_a_mixed_batch_and_sampling(llama):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads)
  rows = ["c", None, "a", "b", "a"]
  out = generate(model, params, ids[:, :4], 5, adapter=bank, adapter_ids=bank.ids(rows))
  for r, name in enumerate(rows):
    p = params if name is None else jlora.merge(params, ads[name])
    np.testing.assert_array_equal(out[r], generate(model, p, ids[r:r + 1, :4], 5)[0])
  key = jax.random.key(3)
  s1 = generate(model, params, ids[:, :4], 5, adapter=bank, adapter_ids=bank.ids(rows),
                temperature=0.9, top_k=20, top_p=0.9, key=key)
  s2 = generate(model, params, ids[:, :4], 5, adapter=bank, adapter_ids=bank.ids(rows),
                temperature=0.9, top_k=20, top_p=0.9, key=key)
  np.testing.assert_array_equal(s1, s2)
  stop = int(out[0, 5])
  stopped = generate(model, params, ids[:1, :4], 5, adapter=bank, adapter_ids=bank.ids(["c"]),
                     eos_token_id=[stop, 127])
  assert np.all(np.asarray(stopped[0, 5:]) == stop)


def test_combine_named_slots_and_task_arithmetic(llama):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads, capacity=5, rank=8)
  bank = bank.combine(["a", "b"], [1.0, -1.0], "a-b")
  got = jlora.adapter.loras(bank.adapter("a-b"))
  la, lb = jlora.adapter.loras(ads["a"]), jlora.adapter.loras(ads["b"])
  assert set(got) == set(la) | set(lb)
  for p, lo in got.items():                      # ΔW = ΔW_a - ΔW_b, exactly ("cat")
    want = (jlora.lora.delta(la[p]) if p in la else 0) - (jlora.lora.delta(lb[p]) if p in lb else 0)
    assert rel_err(jlora.lora.delta(lo), want) < 1e-6, p


def test_bank_errors_name_the_problem(llama):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads)
  with pytest.raises(jlora.AdapterError, match="needs adapter_ids"):
    jlora.apply(model, {"params": params}, bank, ids)
  with pytest.raises(jlora.AdapterError, match="do not match|must be the leading axes"):
    jlora.apply(model, {"params": params}, bank, ids, adapter_ids=jnp.zeros((3,), jnp.int32))
  dora = jlora.init_adapter(jax.random.key(0), params,
                            jlora.LoraConfig(rank=2, use_dora=True, targets=["q_proj"]))
  with pytest.raises(jlora.AdapterError, match="DoRA"):
    jlora.AdapterBank.stack({"d": dora})


def test_peft_mixed_batch_is_the_oracle(tmp_path):
  """Several PEFT adapters in one PEFT model, run with adapter_names (with
  "__base__"), give jlora's bank logits on the same rows (float32)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from test_peft import _randomize, _torch_model, params_from_torch
  base = _torch_model(0)
  cfgs = {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
          "b": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj", "up_proj"],
                    use_rslora=True)}
  dirs = {}
  for i, (name, kw) in enumerate(cfgs.items()):
    pm = peft.get_peft_model(_torch_model(0), peft.LoraConfig(init_lora_weights=False, **kw))
    _randomize(pm, i + 1)
    dirs[name] = tmp_path / name
    pm.save_pretrained(dirs[name])
  pm = peft.PeftModel.from_pretrained(base, dirs["a"], adapter_name="a")
  pm.load_adapter(dirs["b"], adapter_name="b")
  pm.eval()
  ids = np.random.default_rng(0).integers(0, 128, size=(4, 7))
  names = ["b", "__base__", "a", "b"]
  with torch.no_grad():
    want = pm(torch.tensor(ids), adapter_names=names).logits.numpy()
  _torch_model(0).save_pretrained(tmp_path / "base")
  model, params = jlora.interop.from_hf(tmp_path / "base")
  bank = B.from_peft({n: str(d) for n, d in dirs.items()}, params, model=model,
                     args=(jnp.asarray(ids),))
  got = jlora.apply(model, {"params": params}, bank, jnp.asarray(ids),
                    adapter_ids=bank.ids([None if n == "__base__" else n for n in names]))
  assert rel_err(got, want) < 1e-5


def test_a_bank_saves_and_restores_as_one_checkpoint(llama, tmp_path):
  model, params, ids, ads = llama
  bank = jlora.AdapterBank.stack(ads, capacity=4).remove("b")
  jlora.save(tmp_path / "bank", bank)
  back = jlora.restore(tmp_path / "bank")
  assert isinstance(back, jlora.AdapterBank) and back.slot_names == bank.slot_names
  aid = bank.ids(["a", None, "c", "a", "c"])
  np.testing.assert_array_equal(
      jlora.apply(model, {"params": params}, back, ids, adapter_ids=aid),
      jlora.apply(model, {"params": params}, bank, ids, adapter_ids=aid))
