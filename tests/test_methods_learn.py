"""Every method of the family learns: held-out loss falls on a learnable task in seconds.

The task is the demo's (examples/finetune.py): after ``BOS x1..x8 SEP``, write
the symbols through a fixed substitution cipher. The base is a small random
Llama; each method (``jlora.methods.setup``) trains its own tree for a few
AdamW steps through ``make_train_step(trainable=...)`` (in one ``lax.scan``: one compile).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import methods, train
from jlora.models import Llama, LlamaConfig, unboxed_init

VOCAB, SYMBOLS, LENGTH = 24, 16, 6
CIPHER = 3 + np.random.default_rng(7).permutation(SYMBOLS)
STEPS = 60


def batch(seed, n):
  rng = np.random.default_rng(seed)
  x = rng.integers(3, 3 + SYMBOLS, size=(n, LENGTH))
  ids = np.concatenate([np.full((n, 1), 1), x, np.full((n, 1), 2), CIPHER[x - 3]], axis=1)
  mask = np.zeros(ids.shape, bool)
  mask[:, LENGTH + 2:] = True
  return {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def base():
  cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                    initializer_range=0.2)
  model = Llama(cfg)
  held = batch(1, 64)
  stream = jax.tree.map(lambda x: x.reshape((STEPS, 32) + x.shape[1:]), batch(2, STEPS * 32))
  return model, unboxed_init(model, jax.random.key(0), held["ids"][:1]), held, stream


@pytest.mark.parametrize("name", methods.METHODS)
def test_held_out_loss_falls(name, base):
  model, params, held, stream = base
  m = methods.setup(name, jax.random.key(1), model, params, held["ids"][:1],
                    num_virtual_tokens=4, adapter_width=4)

  def loss_fn(trainable, frozen, b, rng):
    logits = m.logits(trainable, frozen, b["ids"])
    return train.lm_loss(logits[:, :-1], b["ids"][:, 1:], b["mask"][:, 1:])

  opt = train.make_optimizer(m.learning_rate)
  step = train.make_train_step(loss_fn, opt, trainable=m.select, jit=False)

  @jax.jit
  def fit(trainable, state, base):          # held-out loss, STEPS steps, held-out loss: one compile
    def body(carry, b):
      return step(*carry, base, b)[:2], None
    before = loss_fn(trainable, base, held, None)
    trained = jax.lax.scan(body, (trainable, state), stream)[0][0]
    return before, loss_fn(trained, base, held, None)

  state = train.init_train_state(m.trainable, opt, trainable=m.select)
  before, after = map(float, fit(m.trainable, state, m.base))
  assert after < before - 0.25, (name, before, after)
  assert 0 < m.count() <= sum(x.size for x in jax.tree.leaves(params)) + 2000
