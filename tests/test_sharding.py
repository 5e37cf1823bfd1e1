"""jlora.sharding on 8 simulated CPU devices: meshes, rules, derived shardings, sharded steps,
generation and checkpoints (the reference Llama, LoRA + QLoRA), and two processes via jax.distributed."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import rel_err
from jlora import lora as L
from jlora import sharding as S

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]   # fsdp × tensor


# ---- meshes and rules -------------------------------------------------------

@pytest.mark.parametrize("sizes,shape", [
    (dict(), (8, 1, 1)), (dict(fsdp=2, tensor=4), (1, 2, 4)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)), (dict(data=1, fsdp=1, tensor=-1), (1, 1, 8))])
def test_make_mesh_shapes(sizes, shape):
  mesh = S.make_mesh(**sizes)
  assert mesh.axis_names == S.MESH_AXES
  assert tuple(mesh.shape[a] for a in S.MESH_AXES) == shape
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("sizes,msg", [
    (dict(data=-1, tensor=-1), "only one axis"), (dict(data=3), "need 3 devices"),
    (dict(data=-1, tensor=3), "do not split"), (dict(fsdp=0), "fsdp=0")])
def test_make_mesh_errors(sizes, msg):
  with pytest.raises(ValueError, match=msg):
    S.make_mesh(**sizes)


def test_make_mesh_subset_of_devices():
  mesh = S.make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
  assert mesh.devices.size == 4


def test_fit_spec_replicates_indivisible_dims():
  mesh = S.make_mesh(fsdp=2, tensor=4)
  assert S.fit_spec(P("fsdp", "tensor"), (6, 10), mesh) == P("fsdp", None)
  assert S.fit_spec(P(("fsdp", "tensor")), (16, 3), mesh) == P(("fsdp", "tensor"), None)
  assert S.fit_spec(P(("fsdp", "tensor")), (4,), mesh) == P(None)
  assert S.fit_spec(P("pipeline"), (8,), mesh) == P(None)
  with pytest.raises(ValueError, match="2 entries for an array of shape"):
    S.fit_spec(P("fsdp", None), (8,), mesh)


@pytest.mark.parametrize("names,shape,want", [
    (("embed", "mlp"), (64, 256), P("fsdp", "tensor")),
    (("mlp", "embed"), (256, 64), P("tensor", "fsdp")),
    (("vocab", "embed"), (128, 64), P("tensor", "fsdp")),
    (("embed", "heads", "head_dim"), (64, 4, 16), P("fsdp", "tensor", None)),
    (("layers", "embed", "kv_heads", "head_dim"), (3, 64, 2, 16), P(None, "fsdp", None, None)),
    (("batch", "length", "embed"), (8, 5, 64), P(("data", "fsdp"), None, None)),
    (("embed",), (64,), P("fsdp")),
])
def test_default_rules(names, shape, want):
  mesh = S.make_mesh(fsdp=2, tensor=4)    # kv_heads 2 % 4 != 0: replicated
  assert S.logical_spec(names, shape, mesh) == want


def test_param_shardings_reads_boxes():
  mesh = S.make_mesh(fsdp=2, tensor=4)
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"up": {"kernel": nn.LogicallyPartitioned(sds(64, 256), names=("embed", "mlp")),
                 "bias": sds(256)},
          "raw": {"kernel": nn.Partitioned(sds(16, 8), names=(None, "tensor"))}}
  sh = S.param_shardings(tree, mesh)
  assert sh["up"]["kernel"].spec == P("fsdp", "tensor")
  assert sh["up"]["bias"].spec == P()
  assert sh["raw"]["kernel"].spec == P(None, "tensor")
  rules = (("embed", "tensor"), ("mlp", "fsdp"))
  assert S.param_shardings(tree, mesh, rules)["up"]["kernel"].spec == P("tensor", "fsdp")


def test_param_shardings_of_a_flax_module():
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      h = nn.Dense(32, kernel_init=init, use_bias=False, name="up")(x)
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
      return nn.Dense(16, kernel_init=init, use_bias=False, name="down")(h)
  abstract = jax.eval_shape(Mlp().init, jax.random.key(0), jnp.ones((2, 16)))
  sh = S.param_shardings(abstract["params"], S.make_mesh(fsdp=4, tensor=2))
  assert sh["up"]["kernel"].spec == P("fsdp", "tensor")
  assert sh["down"]["kernel"].spec == P("tensor", "fsdp")


# ---- adapter shardings ------------------------------------------------------

def _lora(rng, kernel_shape, in_axes, out_axes, stack=0, rank=4, dora=False):
  lead, kern = kernel_shape[:stack], kernel_shape[stack:]
  ins = tuple(kern[i] for i in in_axes)
  outs = tuple(kern[i] for i in out_axes)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  mag = arr(*lead, *outs) if dora else None
  return L.LoRA(a=arr(*lead, *ins, rank), b=arr(*lead, rank, *outs), magnitude=mag,
                alpha=8.0, rank=rank, in_axes=in_axes, out_axes=out_axes)


@pytest.mark.parametrize("shape,spec,in_axes,out_axes,stack,want_a,want_b,want_m", [
    ((64, 32), P("fsdp", "tensor"), (0,), (1,), 0,
     P("fsdp", None), P(None, "tensor"), P("tensor")),
    ((64, 4, 16), P("fsdp", "tensor"), (0,), (1, 2), 0,      # DenseGeneral, short spec
     P("fsdp", None), P(None, "tensor", None), P("tensor", None)),
    ((4, 16, 64), P("tensor", None, "fsdp"), (0, 1), (2,), 0,  # o_proj einsum
     P("tensor", None, None), P(None, "fsdp"), P("fsdp")),
    ((3, 64, 32), P("data", "fsdp", "tensor"), (0,), (1,), 1,  # scanned stack
     P("data", "fsdp", None), P("data", None, "tensor"), P("data", "tensor")),
    ((3, 32, 64), P(None, "tensor", "fsdp"), (1,), (0,), 1,    # transposed use
     P(None, "fsdp", None), P(None, None, "tensor"), P(None, "tensor")),
])
def test_lora_shardings_follow_kernel(rng, shape, spec, in_axes, out_axes, stack,
                                      want_a, want_b, want_m):
  mesh = S.make_mesh(data=1, fsdp=2, tensor=4)
  lo = _lora(rng, shape, in_axes, out_axes, stack, dora=True)
  assert lo.kernel_shape == shape
  sh = S.lora_shardings(lo, NamedSharding(mesh, spec))
  assert (sh.a.spec, sh.b.spec, sh.magnitude.spec) == (want_a, want_b, want_m)
  # the same through a PartitionSpec and mesh=, and without DoRA
  sh2 = S.lora_shardings(lo.replace(magnitude=None), spec, mesh)
  assert (sh2.a.spec, sh2.b.spec, sh2.magnitude) == (want_a, want_b, None)


def test_lora_shardings_errors(rng):
  mesh = S.make_mesh(fsdp=2, tensor=4)
  lo = _lora(rng, (16, 8), (0,), (1,))
  with pytest.raises(ValueError, match="'x/kernel' is \\[16, 8\\] but its sharding"):
    S.lora_shardings(lo, NamedSharding(mesh, P("fsdp", None, "tensor")), path="x/kernel")
  with pytest.raises(TypeError, match="PartitionSpec with mesh="):
    S.lora_shardings(lo, P("fsdp"))
  with pytest.raises(ValueError, match="'other/kernel' has no sharding"):
    S.adapter_shardings({"other": {"kernel": lo}}, {"x": {"kernel": P()}}, mesh)


def test_sharded_lora_forward_matches_unsharded(rng):
  """Adapter placed by adapter_shardings: x @ (W + s·a@b) equals the float64 result."""
  mesh = S.make_mesh(fsdp=2, tensor=4)
  w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
  lo = _lora(rng, (64, 32), (0,), (1,))
  x = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  base_sh = {"d": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}}
  ad_sh = S.adapter_shardings({"d": {"kernel": lo}}, base_sh)
  params = jax.device_put({"d": {"kernel": w}}, base_sh)
  ad = jax.device_put({"d": {"kernel": lo}}, ad_sh)
  assert ad["d"]["kernel"].a.sharding.spec == P("fsdp", None)
  assert ad["d"]["kernel"].b.sharding.spec == P(None, "tensor")

  def fwd(p, ad, x):
    lo = ad["d"]["kernel"]
    return x @ p["d"]["kernel"] + lo.scale * (x @ lo.a) @ lo.b

  xs = jax.device_put(x, S.batch_sharding(mesh))
  for f in (fwd, jax.jit(fwd, out_shardings=NamedSharding(mesh, P(("data", "fsdp"), "tensor")))):
    y = f(params, ad, xs)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    a64, b64 = np.asarray(lo.a, np.float64), np.asarray(lo.b, np.float64)
    assert rel_err(y, x64 @ (w64 + lo.scale * a64 @ b64)) < 1e-5


def test_shard_batch_and_constrain():
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  x = S.shard_batch({"ids": np.arange(8 * 6, dtype=np.int32).reshape(8, 6)}, mesh)["ids"]
  assert x.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(x), np.arange(48).reshape(8, 6))

  @jax.jit
  def f(x):
    return S.constrain(x * 2.0, ("batch", "vocab"), mesh)
  y = f(jnp.ones((8, 6)))      # vocab 6 % 2 == 0: split over tensor
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), 2)
  assert float(y.sum()) == 96.0


# ---- optimizer state and the sharded step ---------------------------------

def test_state_shardings_follow_adapter(rng):
  from jlora import train as T
  mesh = S.make_mesh(fsdp=2, tensor=4)
  ad = {"up": {"kernel": _lora(rng, (64, 32), (0,), (1,), dora=True)}}
  ad_sh = S.adapter_shardings(ad, {"up": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}})
  opt = T.make_optimizer(1e-3, loraplus_ratio=4.0, grad_accum=2, clip_norm=1.0)
  state = opt.init(ad)
  sh = S.state_shardings(jax.eval_shape(lambda: state), ad_sh)
  want = {"a": P("fsdp", None), "b": P(None, "tensor"), "magnitude": P("tensor")}
  flat = jax.tree_util.tree_flatten_with_path(
      sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  seen = 0
  for kp, s in flat:
    last = str(kp[-1]).lstrip(".")
    assert s.spec == want.get(last, P()), (jax.tree_util.keystr(kp), s.spec)
    seen += last in want
  assert seen >= 9       # mu, nu and accumulated gradients of a, b, magnitude
  placed = jax.device_put(state, sh)   # every spec fits its leaf
  assert len(jax.tree.leaves(placed)) == len(flat)


def test_shard_train_step_matches_unsharded(rng):
  """A hand-made Dense+LoRA regression: sharded step == unsharded step (float32 rounding)."""
  from jlora import train as T
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  base = {"d": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}}
  ad = {"d": {"kernel": _lora(rng, (64, 32), (0,), (1,))}}
  batch = {"x": jnp.asarray(rng.standard_normal((8, 64)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)}

  def loss_fn(ad, base, batch, rng):
    lo = ad["d"]["kernel"]
    y = batch["x"] @ base["d"]["kernel"] + lo.scale * (batch["x"] @ lo.a) @ lo.b
    y = nn.with_logical_constraint(y, ("batch", "mlp"))   # active only under the rules
    return jnp.mean((y - batch["y"]) ** 2)

  opt = T.make_optimizer(1e-2)
  state = opt.init(ad)
  want_ad, _, want_m = T.make_train_step(loss_fn, opt, donate=False)(ad, state, base, batch)
  base_sh = {"d": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}}
  ad_sh = S.adapter_shardings(ad, base_sh)
  st_sh = S.state_shardings(state, ad_sh)
  step = S.shard_train_step(T.make_train_step(loss_fn, opt, jit=False), mesh,
                            base_shardings=base_sh, adapter_shardings=ad_sh,
                            state_shardings=st_sh)
  ad1, st1, m = step(jax.device_put(ad, ad_sh), jax.device_put(state, st_sh),
                     jax.device_put(base, base_sh), batch)
  assert abs(float(m["loss"]) - float(want_m["loss"])) <= 1e-5 * abs(float(want_m["loss"]))
  for got, want in zip(jax.tree.leaves(ad1), jax.tree.leaves(want_ad)):
    assert rel_err(got, want) < 1e-5
  assert ad1["d"]["kernel"].a.sharding.spec == P("fsdp", None)
  assert ad1["d"]["kernel"].b.sharding.spec == P(None, "tensor")
  assert st1[0].mu["d"]["kernel"].b.sharding.spec == P(None, "tensor")
  hlo = step.lower(ad1, st1, base, batch).as_text()
  assert "sharding_constraint" in hlo     # the model's logical constraint took effect


# ---- generation ---------------------------------------------------------------

def test_greedy_decode_and_shard_generate_match_numpy_loop(rng):
  """A toy causal LM (prefix sums of embeddings, LoRA head): decode == NumPy loop."""
  vocab, dim = 16, 8
  base = {"emb": jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32),
          "head": {"kernel": jnp.asarray(rng.standard_normal((dim, vocab)), jnp.float32)}}
  ad = {"head": {"kernel": _lora(rng, (dim, vocab), (0,), (1,), rank=2)}}

  def logits_fn(base, ad, ids):
    h = jnp.cumsum(base["emb"][ids], axis=1)          # causal: t sees <= t
    lo = ad["head"]["kernel"]
    return h @ base["head"]["kernel"] + lo.scale * (h @ lo.a) @ lo.b

  prompt = rng.integers(0, vocab, (8, 3)).astype(np.int32)
  w = (np.asarray(base["head"]["kernel"], np.float64) + ad["head"]["kernel"].scale
       * np.asarray(ad["head"]["kernel"].a, np.float64) @ np.asarray(ad["head"]["kernel"].b))
  ids = prompt.astype(np.int64)
  for _ in range(4):
    h = np.cumsum(np.asarray(base["emb"], np.float64)[ids], axis=1)
    ids = np.concatenate([ids, np.argmax(h[:, -1] @ w, -1)[:, None]], axis=1)

  got = S.greedy_decode(logits_fn, base, ad, jnp.asarray(prompt), 4)
  np.testing.assert_array_equal(np.asarray(got), ids)
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  base_sh = {"emb": NamedSharding(mesh, P("tensor", "fsdp")),
             "head": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}}
  gen = S.shard_generate(logits_fn, mesh, base_shardings=base_sh,
                         adapter_shardings=S.adapter_shardings(ad, base_sh), max_new_tokens=4)
  out = gen(base, ad, S.shard_batch(prompt, mesh))
  np.testing.assert_array_equal(np.asarray(out), ids)
  assert out.sharding.spec == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="integer ids"):
    S.greedy_decode(logits_fn, base, ad, jnp.ones((2, 3)), 4)


# ---- multi-host: two processes on this machine (jax.distributed, gloo) ------

_PROBLEM = '''
import jax, jax.numpy as jnp, numpy as np
from jlora import lora as L

def problem():
  r = np.random.default_rng(7)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  base = {"up": {"kernel": f(32, 64)}, "down": {"kernel": f(64, 32)}}
  ad = {"up": {"kernel": L.LoRA(a=f(32, 4), b=f(4, 64), alpha=8.0, rank=4)},
        "down": {"kernel": L.LoRA(a=f(64, 4), b=f(4, 32), alpha=8.0, rank=4)}}
  batch = {"x": f(8, 32), "y": f(8, 32)}
  def loss_fn(ad, base, batch, rng):
    def dense(name, x):
      lo = ad[name]["kernel"]
      return x @ base[name]["kernel"] + lo.scale * (x @ lo.a) @ lo.b
    return jnp.mean((dense("down", jax.nn.gelu(dense("up", batch["x"]))) - batch["y"]) ** 2)
  return base, ad, batch, loss_fn
'''

_WORKER = '''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from jlora import sharding as S, train as T
exec(PROBLEM)
base, ad, batch, loss_fn = problem()
mesh = S.make_mesh(data=1, fsdp=2, tensor=4)       # fsdp across the two processes
base_sh = {"up": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
           "down": {"kernel": NamedSharding(mesh, P("tensor", "fsdp"))}}
ad_sh = S.adapter_shardings(ad, base_sh)
opt = T.make_optimizer(1e-2)
state = opt.init(ad)
st_sh = S.state_shardings(state, ad_sh)
step = S.shard_train_step(T.make_train_step(loss_fn, opt, jit=False), mesh,
                          base_shardings=base_sh, adapter_shardings=ad_sh, state_shardings=st_sh)
rows = slice(4 * pid, 4 * pid + 4)                 # each process feeds its own rows
local = jax.tree.map(lambda x: np.asarray(x)[rows], batch)
ad1, _, m = step(S.place(ad, ad_sh), S.place(state, st_sh), S.place(base, base_sh),
                 S.shard_batch(local, mesh))
assert ad1["up"]["kernel"].a.sharding.spec == P("fsdp", None)
assert not ad1["up"]["kernel"].a.is_fully_addressable
leaves = multihost_utils.process_allgather(jax.tree.leaves(ad1), tiled=True)
if pid == 0:
  np.savez(out, loss=np.asarray(m["loss"]), *leaves)
print("process", pid, "of", jax.process_count(), "devices", len(jax.devices()), "ok")
'''


def test_two_process_train_step_matches_single_process(tmp_path):
  """jax.distributed on one machine: 2 processes × 4 CPU devices, fsdp=2 across them."""
  import socket
  import subprocess
  import sys
  from jlora import train as T
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(f"PROBLEM = {_PROBLEM!r}\n" + _WORKER)
  out = tmp_path / "result.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:      # a failed peer leaves the other waiting: end both
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    assert "of 2 devices 8 ok" in log, log[-3000:]

  scope = {}
  exec(_PROBLEM, scope)
  base, ad, batch, loss_fn = scope["problem"]()
  opt = T.make_optimizer(1e-2)
  want_ad, _, want_m = T.make_train_step(loss_fn, opt, donate=False)(
      ad, opt.init(ad), base, batch)
  got = np.load(out)
  assert abs(float(got["loss"]) - float(want_m["loss"])) <= 1e-5 * float(want_m["loss"])
  want = jax.tree.leaves(want_ad)
  assert len(got.files) == len(want) + 1
  for i, w in enumerate(want):
    assert rel_err(got[f"arr_{i}"], w) < 1e-5


# ---- acceptance: the reference Llama, LoRA + QLoRA, on four mesh shapes ------
#
# One base serves both: the attention projections stay float32 (LoRA on them),
# the MLP projections are NF4 with double quantization (QLoRA on them), so one
# compiled step per mesh checks both paths. XLA's backend optimisation is
# turned down for these compiles (numerics are unchanged; CPU compile time
# is what the test budget pays for).

FAST = {"xla_backend_optimization_level": 0}


class _Llama:
  """Everything the acceptance tests share, built once per module."""

  def __init__(self):
    import jlora
    from jlora import train as T
    from jlora.models import Llama, abstract_params, preset
    self.cfg = preset("tiny", scan_layers=True)
    self.model = Llama(self.cfg)
    rng = np.random.default_rng(11)
    self.ids = np.asarray(rng.integers(0, self.cfg.vocab_size, (8, 16)), np.int32)
    self.boxed = abstract_params(self.cfg)
    params = jax.tree.map(lambda x: _draw(rng, x.shape), nn.unbox(self.boxed))
    self.base = jlora.quantize(params, "nf4", block_size=64, double_quant=True,
                               targets=r"layers/mlp/.*")
    layers = {p: L.LayerInfo("dense", (0,), (1,), 1) for p in _flat_paths(params)
              if p.startswith("layers/") and p.endswith("_proj/kernel")}
    lcfg = jlora.LoraConfig(rank=4, alpha=8, targets=r".*/(q_proj|v_proj|up_proj|down_proj)")
    ad = jlora.adapter.init_adapter(jax.random.key(1), params, lcfg, layers=layers)
    # B = 0 at init would zero A's gradient: start from a random non-zero B.
    self.adapter = jax.tree.map(
        lambda lo: lo.replace(b=jnp.asarray(0.05 * rng.standard_normal(lo.b.shape), jnp.float32)),
        ad, is_leaf=lambda x: isinstance(x, L.LoRA))
    self.opt = T.make_optimizer(1e-2)
    self.state = self.opt.init(self.adapter)

    def loss_fn(ad, base, batch, rng):
      logits = jlora.apply(self.model, {"params": base}, ad, batch)
      return T.lm_loss(logits[:, :-1], batch[:, 1:])
    self.raw_step = T.make_train_step(loss_fn, self.opt, jit=False)
    self.want = jax.jit(self.raw_step, compiler_options=FAST)(
        self.adapter, self.state, self.base, jnp.asarray(self.ids))

  def shardings(self, mesh):
    psh = S.param_shardings(self.boxed, mesh)
    ash = S.adapter_shardings(self.adapter, psh)
    return S.quantized_shardings(self.base, psh), ash, S.state_shardings(self.state, ash)


def _draw(rng, shape):
  """Random weights: norm scales around 1, matrices with unit-variance outputs."""
  if len(shape) == 1:
    return jnp.asarray(1 + 0.2 * rng.standard_normal(shape), jnp.float32)
  return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)


def _flat_paths(tree):
  from jlora import paths
  return list(paths.flatten(tree))


@pytest.fixture(scope="module")
def llama():
  return _Llama()


def _assert_placed(tree, shardings):
  """Every array of ``tree`` is laid out exactly as ``shardings`` declares."""
  arrays, shards = jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(arrays) == len(shards)
  for x, s in zip(arrays, shards):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)
    assert x.addressable_shards[0].data.shape == s.shard_shape(x.shape)


@pytest.mark.parametrize("fsdp,tensor", MESHES)
def test_llama_lora_and_qlora_step_sharded_matches_unsharded(llama, fsdp, tensor):
  mesh = S.make_mesh(fsdp=fsdp, tensor=tensor)
  base_sh, ad_sh, st_sh = llama.shardings(mesh)
  # the declared layout: FSDP over "embed", tensor over heads/mlp/vocab
  q = base_sh["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor")
  # down_proj [L, mlp, embed]: blocks split over the output axis (fsdp), then the input (tensor)
  codes = base_sh["layers"]["mlp"]["down_proj"]["kernel"].codes
  assert codes.spec == P(None, ("fsdp", "tensor"), None)
  assert ad_sh["layers"]["mlp"]["down_proj"]["kernel"].a.spec == P(None, "tensor", None)
  assert ad_sh["layers"]["mlp"]["down_proj"]["kernel"].b.spec == P(None, None, "fsdp")

  base = jax.device_put(llama.base, base_sh)
  _assert_placed(base, base_sh)
  down = base["layers"]["mlp"]["down_proj"]["kernel"]
  assert down.codes.addressable_shards[0].data.shape[1] == down.codes.shape[1] // 8
  step = S.shard_train_step(llama.raw_step, mesh, base_shardings=base_sh,
                            adapter_shardings=ad_sh, state_shardings=st_sh,
                            compiler_options=FAST)
  host = lambda tree: jax.tree.map(np.asarray, tree)   # fresh buffers: the step donates them
  ad_in = jax.device_put(host(llama.adapter), ad_sh)
  ad, st, m = step(ad_in, jax.device_put(host(llama.state), st_sh), base,
                   S.shard_batch(llama.ids, mesh))
  assert all(x.is_deleted() for x in jax.tree.leaves(ad_in))    # donated
  assert not any(x.is_deleted() for x in jax.tree.leaves(base))  # the base never is
  want_ad, want_st, want_m = llama.want
  for k in ("loss", "grad_norm"):
    assert abs(float(m[k]) - float(want_m[k])) <= 1e-5 * abs(float(want_m[k])), k
  for got, want in zip(jax.tree.leaves(ad), jax.tree.leaves(want_ad)):
    assert rel_err(got, want) < 1e-5
  for got, want in zip(jax.tree.leaves(st), jax.tree.leaves(want_st)):
    assert rel_err(got, want) < 1e-5 if np.ndim(want) else int(got) == int(want)
  _assert_placed(ad, ad_sh)
  _assert_placed(st, st_sh)


def test_ia3_step_sharded_matches_unsharded(llama):
  """Other adapter kinds on a mesh: adapter_shardings replicates IA³ vectors; one step
  on a 2×4 mesh equals the unsharded step."""
  import jlora
  from jlora import train as T
  from jlora.methods.ia3 import init_ia3
  rng = np.random.default_rng(3)
  ad = init_ia3(llama.base, targets=["k_proj", "v_proj", "down_proj"], model=llama.model,
                args=(llama.ids[:1, :4],))
  ad = jax.tree.map(lambda v: jnp.asarray(1 + 0.1 * rng.standard_normal(v.shape), v.dtype), ad)
  opt = T.make_optimizer(1e-2)

  def loss_fn(ad, base, batch, rng):
    return T.lm_loss(jlora.apply(llama.model, {"params": base}, ad, batch)[:, :-1], batch[:, 1:])
  raw = T.make_train_step(loss_fn, opt, jit=False)
  want_ad, _, want_m = jax.jit(raw, compiler_options=FAST)(ad, opt.init(ad), llama.base,
                                                           jnp.asarray(llama.ids))
  mesh = S.make_mesh(fsdp=2, tensor=4)
  psh = S.param_shardings(llama.boxed, mesh)
  ad_sh = S.adapter_shardings(ad, psh)
  assert {x.spec for x in jax.tree.leaves(ad_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
          } == {P()}
  st = opt.init(ad)
  st_sh = S.state_shardings(st, ad_sh)
  base_sh = S.quantized_shardings(llama.base, psh)
  step = S.shard_train_step(raw, mesh, base_shardings=base_sh, adapter_shardings=ad_sh,
                            state_shardings=st_sh, compiler_options=FAST)
  host = lambda tree: jax.tree.map(np.asarray, tree)   # fresh buffers: the step donates them
  got_ad, _, m = step(jax.device_put(host(ad), ad_sh), jax.device_put(host(st), st_sh),
                      jax.device_put(llama.base, base_sh), S.shard_batch(llama.ids, mesh))
  assert abs(float(m["loss"]) - float(want_m["loss"])) <= 1e-5 * abs(float(want_m["loss"]))
  for got, want in zip(jax.tree.leaves(got_ad), jax.tree.leaves(want_ad)):
    assert rel_err(got, want) < 1e-5
  assert max(float(jnp.abs(g - v).max()) for g, v in
             zip(jax.tree.leaves(got_ad), jax.tree.leaves(ad))) > 0   # it did train


def test_save_then_restore_onto_other_mesh_shapes(llama, tmp_path):
  """jlora.save from a 4×2 mesh, jlora.restore(shardings=) onto 2×4, 2×2×2, 1×8: same bytes."""
  import jlora
  base_sh, ad_sh, _ = llama.shardings(S.make_mesh(fsdp=4, tensor=2))
  adapter = jax.device_put(llama.want[0], ad_sh)      # the trained adapter
  base = jax.device_put(llama.base, base_sh)          # float and NF4 weights
  jlora.save(tmp_path / "adapter", adapter)
  jlora.save(tmp_path / "base", base)
  for mesh in (S.make_mesh(fsdp=2, tensor=4), S.make_mesh(data=2, fsdp=2, tensor=2),
               S.make_mesh(tensor=8)):
    base_sh2, ad_sh2, _ = llama.shardings(mesh)
    for name, saved, sh in (("adapter", adapter, ad_sh2), ("base", base, base_sh2)):
      got = jlora.restore(tmp_path / name, shardings=sh)
      assert jax.tree.structure(got) == jax.tree.structure(saved)
      _assert_placed(got, sh)
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_generation_matches_cached_generate(llama):
  """shard_generate over data×fsdp×tensor == the model's own KV-cache greedy decode."""
  import jlora
  from jlora.models import generate
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  base_sh, ad_sh, _ = llama.shardings(mesh)
  adapter, prompt = llama.want[0], llama.ids[:, :5]
  logits_fn = lambda base, ad, ids: jlora.apply(llama.model, {"params": base}, ad, ids)
  gen = S.shard_generate(logits_fn, mesh, base_shardings=base_sh, adapter_shardings=ad_sh,
                         max_new_tokens=6, compiler_options=FAST)
  out = gen(jax.device_put(llama.base, base_sh), jax.device_put(adapter, ad_sh),
            S.shard_batch(prompt, mesh))
  assert out.sharding.spec == P(("data", "fsdp"), None)
  apply_fn = lambda pa, ids, **kw: jlora.apply(llama.model, {"params": pa[0]}, pa[1], ids, **kw)
  want = generate(llama.model, (llama.base, adapter), jnp.asarray(prompt), 6, apply_fn=apply_fn)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  assert len(set(np.asarray(out)[:, 5:].ravel().tolist())) > 3    # not a constant output


# ---- QArray shardings ---------------------------------------------------------

def _collective_sizes(compiled_text):
  """Element counts of the (array-shaped) results of the collectives in compiled HLO text."""
  import re
  ops = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
  sizes = []
  for line in compiled_text.splitlines():
    m = re.search(r"= \w+\[([\d,]*)\]\S* " + ops, line)
    if m:
      sizes.append(int(np.prod([int(d) for d in m.group(1).split(",") if d])))
  return sizes


def test_qarray_shardings_rule(rng):
  import jlora
  from jlora.quant import quantize_array
  mesh = S.make_mesh(fsdp=2, tensor=4)
  w = jnp.asarray(rng.standard_normal((3, 128, 96)), jnp.float32)     # [L, in, out]
  named = lambda *s: NamedSharding(mesh, P(*s))
  # tensor parallel (outputs split): blocks follow the output columns, dequantize is local;
  # with double quantization only the small per-block scales (3 × 192 in all) may move.
  for double_quant, most_moved in ((False, 0), (True, 3 * 192)):
    q = quantize_array(w, "nf4", 64, double_quant)                   # 192 blocks per layer
    sh = S.qarray_shardings(q, named(None, None, "tensor"))
    assert (sh.codes.spec, sh.scales.spec) == (P(None, "tensor", None), P(None, "tensor"))
    if double_quant:
      assert (sh.nested_scales.spec, sh.offset.spec) == (P(None, None), P(None))
    placed = jax.device_put(q, sh)
    f = jax.jit(lambda q: q.dequantize(), out_shardings=named(None, None, "tensor"))
    hlo = f.lower(placed).compile().as_text()
    if not double_quant:
      assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
    assert max(_collective_sizes(hlo), default=0) <= most_moved
    np.testing.assert_array_equal(np.asarray(f(placed)), np.asarray(q.dequantize()))
  # FSDP on the inputs too: blocks split over (outputs, inputs); stacked axis kept
  sh = S.qarray_shardings(q, named("data", "fsdp", "tensor"))
  assert sh.codes.spec == P("data", ("tensor", "fsdp"), None)
  # 4 x 20 kernel = 80 values / 16 = 5 blocks: not divisible by 4 or 8, replicated
  small = quantize_array(jnp.asarray(rng.standard_normal((4, 20)), jnp.float32), "nf4", 16, False)
  sh = S.qarray_shardings(small, named("fsdp", "tensor"))
  assert (sh.codes.spec, sh.scales.spec, sh.nested_scales) == (P(None, None), P(None), None)
  # a whole quantized tree
  params = {"d": {"kernel": w[0], "bias": jnp.ones(96)}}
  qp = jlora.quantize(params, "nf4", targets=["d"])
  qsh = S.quantized_shardings(qp, {"d": {"kernel": named("fsdp", "tensor"), "bias": named()}})
  assert qsh["d"]["kernel"].codes.spec == P(("tensor", "fsdp"), None)
  _assert_placed(jax.device_put(qp, qsh), qsh)
  with pytest.raises(ValueError, match="'d/kernel' has no sharding"):
    S.quantized_shardings(qp, {"d": {"bias": named()}})


def test_70b_layout_splits_memory_evenly():
  """eval_shape only: Llama-3-70B (bf16 and NF4) on fsdp 2 × tensor 4 holds ~1/8 per device."""
  import math
  import jlora
  from jlora.models import abstract_params, preset
  cfg = preset("llama-3-70b", scan_layers=True, param_dtype=jnp.bfloat16)
  boxed = abstract_params(cfg)
  plain = nn.unbox(boxed)
  sh = S.param_shardings(boxed, S.make_mesh(fsdp=2, tensor=4))
  qplain = jax.eval_shape(lambda p: jlora.quantize(p, "nf4"), plain)
  qsh = S.quantized_shardings(qplain, sh)
  for tree, shard in ((plain, sh), (qplain, qsh)):
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shard, is_leaf=lambda x: isinstance(x, NamedSharding))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    per_device = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                     for x, s in zip(leaves, shards))
    assert per_device < total / 8 * 1.01, (total / 2**30, per_device / 2**30)
  assert total / 2**30 < 37      # NF4 70B: ~36.8 GiB in all, ~4.6 GiB per device
