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
from jlora.errors import ConfigError
from jlora.methods import select
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


