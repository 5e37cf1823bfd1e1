"""Serve many LoRA adapters on one base: one mixed batch, one call.

1. Pre-trains the demo's small Llama on copying (as examples/finetune.py).
2. Trains three adapters of different ranks, each on its own task: a
   substitution cipher, mirroring every symbol, and shifting every symbol.
   The "shift" adapter is written as a Hugging Face PEFT directory
   (``jlora.peft.save``) and read back from it, as a served adapter would be.
3. Stacks them in one ``jlora.AdapterBank`` (room for more) and answers a
   mixed batch whose rows each name an adapter, or none (the base: copying),
   with KV-cache generation, greedy and then sampled; prints every row's
   adapter, prompt, output and whether it is what that adapter was taught.

  python examples/serve_many.py
  python examples/serve_many.py --steps 60 --pretrain-steps 60     # quicker, less accurate
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as demo  # noqa: E402  (the demo's tiny language, model and pre-training)

import jlora  # noqa: E402
from jlora import train  # noqa: E402
from jlora.models import Llama, LlamaConfig, generate  # noqa: E402

TASKS = {
    "cipher": lambda x: demo.CIPHER[x - demo.FIRST],
    "mirror": lambda x: demo.FIRST + demo.SYMBOLS - 1 - (x - demo.FIRST),
    "shift": lambda x: demo.FIRST + (x - demo.FIRST + 1) % demo.SYMBOLS,
}
RANKS = {"cipher": 4, "mirror": 3, "shift": 2}


def batch(rng, task: str | None, n: int) -> dict:
  x = rng.integers(demo.FIRST, demo.FIRST + demo.SYMBOLS, size=(n, demo.LENGTH))
  y = x if task is None else TASKS[task](x)
  ids = np.concatenate([np.full((n, 1), demo.BOS), x, np.full((n, 1), demo.SEP), y], axis=1)
  mask = np.zeros(ids.shape, bool)
  mask[:, demo.LENGTH + 2:] = True
  return {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask)}


def train_adapter(model, base, task, args, key):
  cfg = jlora.LoraConfig(rank=RANKS[task], alpha=2 * RANKS[task], targets=jlora.ALL_LINEAR)
  ids = batch(np.random.default_rng(0), task, 2)["ids"]
  adapter = jlora.init_adapter(key, base, cfg, model=model, args=(ids,))

  def loss_fn(adapter, base, b, rng):
    return demo.answer_loss(jlora.apply(model, {"params": base}, adapter, b["ids"]), b)
  opt = train.make_optimizer(5e-3)
  step = train.make_train_step(loss_fn, opt)
  state = train.init_train_state(adapter, opt)
  rng = np.random.default_rng(hash(task) % 2**32)
  for _ in demo.progress(args.steps, f"adapter {task!r}"):
    adapter, state, _ = step(adapter, state, base, batch(rng, task, args.batch_size))
  return adapter, cfg


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pretrain-steps", type=int, default=400)
  p.add_argument("--steps", type=int, default=300, help="training steps per adapter")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--rows", type=int, default=8, help="rows of the mixed batch")
  args = p.parse_args(argv)

  config = LlamaConfig(vocab_size=demo.VOCAB, hidden_size=64, intermediate_size=192,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2 * demo.LENGTH + 2)
  model = Llama(config)
  rng = np.random.default_rng(0)
  params = jlora.models.unboxed_init(model, jax.random.key(0), batch(rng, None, 1)["ids"])
  pre_args = argparse.Namespace(pretrain_steps=args.pretrain_steps, batch_size=args.batch_size)
  base, _ = demo.pretrain(model, params, pre_args, rng)

  adapters = {}
  for i, task in enumerate(TASKS):
    adapter, cfg = train_adapter(model, base, task, args, jax.random.key(10 + i))
    if task == "shift":   # served from a PEFT directory, as one downloaded would be
      folder = os.path.join(tempfile.mkdtemp(), "shift-peft")
      jlora.peft.save(folder, adapter, cfg, base_model_name_or_path="jlora-demo")
      adapter, _ = jlora.peft.load(folder, base, model=model, args=(batch(rng, None, 1)["ids"],))
      print(f"adapter 'shift' read back from the PEFT directory {folder}")
    adapters[task] = adapter
  bank = jlora.AdapterBank.stack(adapters, capacity=8)
  print(f"bank: {bank.capacity} slots, rank padded to {bank.rank}: {bank.slot_names}\n")

  names = [[None, "cipher", "mirror", "shift"][i % 4] for i in range(args.rows)]
  tasks = [batch(np.random.default_rng(100 + i), names[i], 1) for i in range(args.rows)]
  prompts = jnp.concatenate([t["ids"][:, :demo.LENGTH + 2] for t in tasks])
  want = np.concatenate([np.asarray(t["ids"][:, demo.LENGTH + 2:]) for t in tasks])
  ids = bank.ids(names)
  out = generate(model, base, prompts, demo.LENGTH, adapter=bank, adapter_ids=ids)
  sampled = generate(model, base, prompts, demo.LENGTH, adapter=bank, adapter_ids=ids,
                     temperature=0.7, top_k=8, key=jax.random.key(0))
  got, smp = np.asarray(out[:, demo.LENGTH + 2:]), np.asarray(sampled[:, demo.LENGTH + 2:])
  print(f"{'row':>3}  {'adapter':8} {'prompt':24} {'greedy':24} {'right':5}  {'sampled (T=0.7)':24}")
  for i, name in enumerate(names):
    show = lambda a: " ".join(f"{v:2d}" for v in a)
    print(f"{i:3d}  {name or '(base)':8} {show(prompts[i, 1:demo.LENGTH + 1]):24} "
          f"{show(got[i]):24} {str(bool((got[i] == want[i]).all())):5}  {show(smp[i]):24}")
  print(f"\nrows right: {int((got == want).all(axis=1).sum())} of {args.rows}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
