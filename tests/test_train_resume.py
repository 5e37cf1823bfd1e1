"""Resumable training: the NaN/Inf guard, TrainCheckpointer, and runs killed and resumed."""
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _problem(rng):
  base = {"d": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)}}
  adapter = jlora.init_adapter(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["d"],
                                                                         init="gaussian"))

  def loss_fn(ad, base, batch, key):
    lo = ad["d"]["kernel"]
    y = batch["x"] @ base["d"]["kernel"] + lo.scale * (batch["x"] @ lo.a) @ lo.b
    return jnp.mean((y - batch["y"]) ** 2)
  batch = {"x": jnp.asarray(rng.standard_normal((5, 8)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32)}
  return base, adapter, loss_fn, batch


@pytest.mark.parametrize("jit", [True, False])
def test_nonfinite_updates_are_skipped_and_counted(rng, jit):
  base, adapter, loss_fn, batch = _problem(rng)
  opt = train.make_optimizer(1e-2)
  step = train.make_state_step(loss_fn, opt, jit=jit, donate=False)
  state = train.init_state(adapter, opt)
  state, m = step(state, base, batch)
  assert int(m["skipped"]) == 0
  bad = dict(batch, x=batch["x"].at[2, 3].set(jnp.nan))
  after, m = step(state, base, bad)
  assert int(m["skipped"]) == 1 and int(after.skipped) == 1 and int(after.step) == 2
  for x, y in zip(jax.tree.leaves((state.adapter, state.opt_state)),
                  jax.tree.leaves((after.adapter, after.opt_state))):
    assert np.array_equal(x, y)                       # the update was not applied
  plain = train.make_train_step(loss_fn, opt, jit=jit, donate=False)
  a2, s2, m = plain(state.adapter, state.opt_state, base, dict(batch, y=batch["y"] * np.inf))
  assert int(m["skipped"]) == 1 and np.array_equal(a2["d"]["kernel"].a, state.adapter["d"]["kernel"].a)
  anyway = train.make_train_step(loss_fn, opt, jit=jit, donate=False, nonfinite="apply")
  a3, _, m = anyway(state.adapter, state.opt_state, base, bad)
  assert "skipped" not in m and not np.isfinite(np.asarray(a3["d"]["kernel"].a)).all()


def test_nonfinite_raise_names_the_step_and_the_leaf(rng):
  base, adapter, loss_fn, batch = _problem(rng)
  opt = train.make_optimizer(1e-2)
  step = train.make_state_step(loss_fn, opt, nonfinite="raise")
  state = train.init_state(adapter, opt)
  for _ in range(3):
    state, m = step(state, base, batch)
  assert "finite" not in m
  # an Inf that reaches only b's gradient: b's path is named, and the state survives donation
  big = dict(batch, y=batch["y"].at[0, 0].set(jnp.inf))
  with pytest.raises(jlora.NonFiniteError, match=r"step 3: the loss is not finite") as err:
    step(state, base, big)
  assert err.value.step == 3 and err.value.path == "loss"
  kept = err.value.state
  assert int(kept.step) == 4 and np.isfinite(np.asarray(kept.adapter["d"]["kernel"].b)).all()

  def leaky(ad, base, batch, key):   # a finite loss whose gradient of b is NaN
    lo = ad["d"]["kernel"]
    return loss_fn(ad, base, batch, key) + jnp.sum(jnp.sqrt(jnp.abs(lo.b) * 0.0))
  plain = train.make_train_step(leaky, opt, nonfinite="raise")
  with pytest.raises(jlora.NonFiniteError, match=r"step 1: the gradient of 'd/kernel/b' is not "
                     "finite") as err:
    plain(kept.adapter, kept.opt_state, base, batch)
  assert err.value.path == "d/kernel/b" and isinstance(err.value, ValueError)


def test_checkpointer_keeps_last_k_and_best_and_restores_onto_a_mesh(rng, tmp_path):
  base, adapter, loss_fn, batch = _problem(rng)
  opt = train.make_optimizer(1e-2, loraplus_ratio=4)
  step = train.make_state_step(loss_fn, opt)
  run = tmp_path / "run [1]"
  with train.TrainCheckpointer(run, every=2, keep=2, best="loss", async_save=False) as ckpt:
    state = ckpt.resume(train.init_state(adapter, opt, rng=jax.random.key(3)))
    losses = []
    for i in range(10):
      scaled = dict(batch, y=batch["y"] * (1 + 3 * (i == 3)))   # step 4's loss is the largest
      state, m = step(state, base, scaled)
      ckpt.save(state, m)
      losses.append(float(m["loss"]))
    history = ckpt.history
  assert history["loss"] == losses and history["step"] == list(range(1, 11))
  best = 2 * (int(np.argmin(losses[1::2])) + 1)
  ckpt = train.TrainCheckpointer(run, every=2, keep=2, best="loss")
  assert ckpt.steps == sorted({best, 8, 10}) and ckpt.best_step == best
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  rows = NamedSharding(mesh, P("x"))
  template = train.init_state(jlora.init_adapter(jax.random.key(9), base, jlora.LoraConfig(
      rank=2, targets=["d"])), opt, rng=jax.random.key(0))
  everywhere = NamedSharding(mesh, P())
  got = ckpt.restore(template, shardings=lambda p: rows if p.endswith("kernel/a") else everywhere)
  assert got.adapter["d"]["kernel"].a.sharding == rows and int(got.step) == 10
  for x, y in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(state.opt_state)):
    assert np.array_equal(x, y)
  assert ckpt.history["loss"] == losses
  again, _ = step(got, base, batch)                      # and training continues on the mesh
  assert int(again.step) == 11
  with pytest.raises(jlora.CheckpointError, match="no complete checkpoint of step 3"):
    ckpt.restore(template, step=3)
  ckpt.close()


_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import jlora
from jlora import train


def main(run, out, total):
  rng = np.random.default_rng(0)
  base = {"d": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}}
  adapter = {"d": {"kernel": jlora.LoRA(a=jnp.asarray(rng.standard_normal((16, 2)), jnp.float32),
                                        b=jnp.zeros((2, 8)), alpha=4.0, rank=2)}}

  def loss_fn(ad, base, batch, key):
    lo = ad["d"]["kernel"]
    x = batch["x"] * jax.random.bernoulli(key, 0.9, batch["x"].shape) / 0.9   # dropout: the key
    y = x @ base["d"]["kernel"] + lo.scale * (x @ lo.a) @ lo.b
    return jnp.mean((y - batch["y"]) ** 2)

  def batch_at(i):
    r = np.random.default_rng([1, int(i)])
    return {"x": jnp.asarray(r.standard_normal((8, 16)), jnp.float32),
            "y": jnp.asarray(r.standard_normal((8, 8)), jnp.float32)}

  opt = train.make_optimizer(3e-2, grad_accum=2, clip_norm=1.0)
  step = train.make_state_step(loss_fn, opt)
  ckpt = train.TrainCheckpointer(run, every=3, keep=2, best="loss")
  state = ckpt.resume(train.init_state(adapter, opt, rng=jax.random.key(7)))
  print("resumed", int(state.step), flush=True)
  while int(state.step) < int(total):
    state, metrics = step(state, base, batch_at(state.data_position))
    if ckpt.save(state, metrics):
      print("saving", int(state.step), flush=True)
    print("step", int(state.step), flush=True)
    time.sleep(0.005)
  history = ckpt.history
  ckpt.close()
  leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(state)]
  np.savez(out, *leaves)
  open(out + ".json", "w").write(json.dumps(history))
  print("done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
"""


def _complete_steps(run):
  return sorted(int(p) for p in os.listdir(run) if p.isdigit()) if os.path.isdir(run) else []


def test_killed_runs_resume_to_the_uninterrupted_result_bit_for_bit(tmp_path):
  """A training process killed at random points (during steps and during asynchronous
  saves), resumed each time: the final adapter, optimizer state, PRNG key, data position
  and loss curve equal an uninterrupted run's exactly."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla-cache"),   # compile once, not per child
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  total = 18

  def start(run, out):
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(run), str(out), str(total)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  namespace = {"__name__": "uninterrupted"}
  exec(compile(_CHILD, "train_child", "exec"), namespace)   # noqa: S102
  namespace["main"](tmp_path / "ref", str(tmp_path / "ref.npz"), total)
  chooser = random.Random(16)
  run, kills, resumed_at = tmp_path / "run", [], []
  while True:
    on_disk = _complete_steps(run)
    child = start(run, tmp_path / "out.npz")
    first = child.stdout.readline()
    assert first.startswith("resumed"), first + child.stderr.read()[-3000:]
    resumed_at.append(int(first.split()[1]))
    assert resumed_at[-1] == (on_disk[-1] if on_disk else 0)   # the last complete checkpoint
    if len(kills) >= 5:
      assert child.wait(timeout=300) == 0, child.stderr.read()[-3000:]
      break
    during_save = len(kills) % 2 == 0
    target = resumed_at[-1] + chooser.randint(1, 6)
    for line in child.stdout:
      if (during_save and line.startswith("saving")) or (
          not during_save and line == f"step {target}\n"):
        time.sleep(chooser.uniform(0, 0.01))
        break
    child.kill()
    child.wait()
    kills.append(("save" if during_save else "step", line.strip()))
  assert len(kills) >= 5 and resumed_at[-1] < total
  assert {k for k, _ in kills} == {"save", "step"}
  want, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "out.npz")
  assert len(want.files) == len(got.files) > 10
  for k in want.files:
    assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k
  h_want = json.loads((tmp_path / "ref.npz.json").read_text())
  h_got = json.loads((tmp_path / "out.npz.json").read_text())
  assert h_got["step"] == list(range(1, total + 1)) and h_got == h_want
