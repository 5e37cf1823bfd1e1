"""Preference tuning (DPO) of the demo model on preference pairs it generates itself.

1. Builds and pre-trains the demo's small Llama (examples/finetune.py) on the
   copy task (``BOS x1..x8 SEP x1..x8``).
2. Samples two completions per prompt from the model at a high temperature
   and ranks them with a rule, the way a reward model or a human rater would:
   the completion with more symbols of the demo's cipher task
   (``f(x1)..f(x8)``) is "chosen", the other "rejected" (ties are dropped).
   These are the preference pairs: the model's own samples, never a
   demonstration of the task.
3. Trains a LoRA adapter with the DPO loss (``--loss ipo`` for IPO). The
   reference policy is the same base with the adapter switched off
   (``jlora.methods.dpo.make_loss_fn``): one base in memory, not two.
4. Prints the implicit reward margin and accuracy on held-out pairs before
   and after, and how many cipher symbols the model's samples hold, and
   draws the curves to ``<out>/dpo_curves.png``.

  python examples/dpo.py
  python examples/dpo.py --loss ipo --beta 0.5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import train
from jlora.methods import dpo
from jlora.models import Llama, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as demo  # noqa: E402  (the demo's task, model and pre-training)

PROMPT = demo.LENGTH + 2       # BOS x1..x8 SEP


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pretrain-steps", type=int, default=150, help="copy-task pre-training steps")
  p.add_argument("--steps", type=int, default=200, help="DPO steps")
  p.add_argument("--pairs", type=int, default=4096, help="training prompts (pairs before ties)")
  p.add_argument("--eval-pairs", type=int, default=1024, help="held-out prompts")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.5,
                 help="sampling temperature of the preference pairs")
  p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
  p.add_argument("--loss", choices=dpo.KINDS, default="sigmoid", help="sigmoid (DPO) or ipo")
  p.add_argument("--lr", type=float, default=5e-3)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--targets", default=jlora.ALL_LINEAR,
                 help="comma-separated module names to adapt, or 'all-linear' (the default)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="out", help="output directory (default ./out)")
  return p.parse_args(argv)


def sampler(model):
  """``sample(params, adapter, prompts [n, PROMPT], key) -> ids [n, PROMPT + LENGTH]``."""
  @jax.jit
  def sample(params, adapter, prompts, key, temperature):
    n = prompts.shape[0]
    ids = jnp.concatenate([prompts, jnp.zeros((n, demo.LENGTH), prompts.dtype)], axis=1)

    def body(t, carry):
      ids, key = carry
      key, k = jax.random.split(key)
      logits = jlora.apply(model, {"params": params}, adapter, ids)   # causal: later slots unused
      logit = jax.lax.dynamic_index_in_dim(logits, PROMPT - 1 + t, axis=1, keepdims=False)
      tok = jax.random.categorical(k, logit / temperature).astype(ids.dtype)
      return jax.lax.dynamic_update_index_in_dim(ids, tok[:, None], PROMPT + t, axis=1), key
    return jax.lax.fori_loop(0, demo.LENGTH, body, (ids, key))[0]
  return sample


def reward(ids: np.ndarray) -> np.ndarray:
  """The rule that ranks completions: how many symbols are the cipher's, ``f(x_i)``."""
  return (ids[:, PROMPT:] == demo.CIPHER[ids[:, 1:1 + demo.LENGTH] - demo.FIRST]).sum(axis=1)


def make_pairs(sample, params, adapter, rng, n, key, temperature, chunk) -> dict:
  """Two samples per prompt; the one with the higher reward is chosen (ties dropped).

  Prompts are sampled ``chunk`` at a time (one shape: one compiled sampler)."""
  prompts = demo.make_batch(rng, "copy", -(-n // chunk) * chunk)["ids"][:, :PROMPT]

  def draw(k):
    return np.concatenate([np.asarray(sample(params, adapter, prompts[i:i + chunk],
                                             jax.random.fold_in(k, i), temperature))
                           for i in range(0, len(prompts), chunk)])
  k1, k2 = jax.random.split(key)
  a, b = draw(k1), draw(k2)
  ra, rb = reward(a), reward(b)
  keep = ra != rb
  chosen = np.where((ra > rb)[:, None], a, b)[keep]
  rejected = np.where((ra > rb)[:, None], b, a)[keep]
  mask = np.zeros(chosen.shape, np.int32)
  mask[:, PROMPT:] = 1
  return {"chosen": chosen, "rejected": rejected, "chosen_mask": mask, "rejected_mask": mask}


def batches(pairs: dict, size: int, rng):
  """Shuffled mini-batches of pairs, epoch after epoch."""
  n = len(pairs["chosen"])
  size = min(size, n)
  while True:
    order = rng.permutation(n)
    for start in range(0, n - size + 1, size):
      idx = order[start:start + size]
      yield {k: jnp.asarray(v[idx]) for k, v in pairs.items()}


def plot(path, history) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for ax, key, title in ((axes[0], "reward_margin", "implicit reward margin (chosen - rejected)"),
                         (axes[1], "accuracy", "reward accuracy (chosen > rejected)")):
    ax.plot(steps, [h["train"][key] for h in history], label="training batches", alpha=0.6)
    ax.plot(steps, [h["held"][key] for h in history], label="held-out pairs", marker="o")
    ax.set_xlabel("DPO step")
    ax.set_title(title)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  rng = np.random.default_rng(args.seed)
  config = LlamaConfig(vocab_size=demo.VOCAB, hidden_size=64, intermediate_size=192,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2 * demo.LENGTH + 2)
  model = Llama(config)
  example = demo.make_batch(rng, "copy", 1)["ids"]
  params = jax.jit(lambda key: nn.unbox(model.init(key, example))["params"])(
      jax.random.key(args.seed))
  if args.pretrain_steps:
    pre = argparse.Namespace(pretrain_steps=args.pretrain_steps, batch_size=32)
    params, _ = demo.pretrain(model, params, pre, rng)

  # a fresh adapter (b = 0) is exactly the base: sample the pairs through it, so that one
  # compiled sampler serves before and after
  lcfg = jlora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank,
                          targets=demo.targets_of(args.targets))
  adapter = jlora.init_adapter(jax.random.key(args.seed + 2), params, lcfg, model=model,
                               args=(example,))
  sample = sampler(model)
  key = jax.random.key(args.seed + 1)
  chunk = args.eval_pairs
  train_pairs = make_pairs(sample, params, adapter, np.random.default_rng(1), args.pairs,
                           jax.random.fold_in(key, 1), args.temperature, chunk)
  held_pairs = make_pairs(sample, params, adapter, np.random.default_rng(2), args.eval_pairs,
                          jax.random.fold_in(key, 2), args.temperature, chunk)
  print(f"preference pairs from the model's own samples: {len(train_pairs['chosen'])} for "
        f"training, {len(held_pairs['chosen'])} held out (ties dropped)")
  if not len(train_pairs["chosen"]) or not len(held_pairs["chosen"]):
    print("error: every sampled pair was a tie; sample more prompts (--pairs) or raise "
          "--temperature", file=sys.stderr)
    return 1

  logits_fn = lambda ad, base, ids: jlora.apply(model, {"params": base}, ad, ids)
  loss_fn = dpo.make_loss_fn(logits_fn, beta=args.beta, kind=args.loss)
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 10, max(args.steps, 11))
  opt = train.make_optimizer(schedule)
  step = train.make_train_step(loss_fn, opt, has_aux=True)
  state = train.init_train_state(adapter, opt)
  held = {k: jnp.asarray(v) for k, v in held_pairs.items()}
  evaluate = jax.jit(lambda ad, base: loss_fn(ad, base, held)[1])
  prompts = demo.make_batch(np.random.default_rng(3), "copy", args.eval_pairs)["ids"][:, :PROMPT]

  def cipher_rate(ad):      # cipher symbols per sampled completion, at temperature 1
    ids = np.asarray(sample(params, ad, prompts, jax.random.key(7), 1.0))
    return float(np.mean(reward(ids)))

  before = {k: float(v) for k, v in evaluate(adapter, params).items()}
  rate_before = cipher_rate(adapter)
  history = [{"step": 0, "held": before, "train": before}]
  data = batches(train_pairs, args.batch_size, rng)
  bar = demo.progress(args.steps, f"DPO ({args.loss})")
  for i in bar:
    adapter, state, m = step(adapter, state, params, next(data))
    if i % 10 == 9 or i == args.steps - 1:
      held_m = {k: float(v) for k, v in evaluate(adapter, params).items()}
      history.append({"step": i + 1, "held": held_m,
                      "train": {k: float(v) for k, v in m["aux"].items()}})
      if hasattr(bar, "set_postfix"):
        bar.set_postfix(margin=f"{held_m['reward_margin']:.3f}", acc=f"{held_m['accuracy']:.2f}")
  after = history[-1]["held"]
  rate_after = cipher_rate(adapter)
  print(f"\n{'held-out pairs':28s}{'reward margin':>15s}{'accuracy':>10s}")
  print(f"{'before (policy = reference)':28s}{before['reward_margin']:15.4f}{before['accuracy']:10.1%}")
  print(f"{'after DPO':28s}{after['reward_margin']:15.4f}{after['accuracy']:10.1%}")
  print(f"\ncipher symbols per sampled completion (of {demo.LENGTH}, temperature 1): "
        f"{rate_before:.2f} before, {rate_after:.2f} after")
  png = os.path.join(args.out, "dpo_curves.png")
  plot(png, history)
  print(f"wrote {png}; done in {time.time() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
