"""Fine-tune a LoRA adapter on a small Llama, on CPU, in about a minute.

1. Builds a small Llama-style model from a config and pre-trains all of its
   weights on a base task of a tiny synthetic language: copy a sequence of
   symbols (``BOS x1..x8 SEP x1..x8``).
2. Fine-tunes only a LoRA adapter (about 1% of the parameters) on a second
   task: copy the sequence through a fixed substitution cipher
   (``BOS x1..x8 SEP f(x1)..f(x8)``). With ``--qlora`` the base is first
   quantized to NF4 with double quantization and trained through.
   ``--method`` picks another member of the fine-tuning family instead, on
   the same model and data (``jlora.methods.setup``): ``full`` (every
   weight), ``bitfit`` (biases only), ``prompt`` (a soft prompt),
   ``prefix`` (per-layer key/value prefixes), ``adapter`` (Houlsby
   bottleneck adapters), ``ia3`` (IA³ scales).
3. Prints the held-out loss and accuracy before and after, writes the loss
   curves to ``<out>/loss_curves.png``, saves the trained tree with
   ``jlora.save`` to ``<out>/adapter``, and (for the mergeable LoRA, QLoRA
   and IA³) checks that the merged model gives the same logits as base + adapter.

Fine-tuning checkpoints its whole state (adapter, optimizer, step, PRNG key,
data position, loss curve) to ``<out>/run`` every ``--checkpoint-every``
steps, asynchronously; after an interruption, ``--resume`` continues from the
last complete checkpoint and ends with the same adapter and loss curve as an
uninterrupted run.

The data are generated from fixed seeds (training and held-out examples come
from different seeds), so every run prints the same numbers on a given machine.

  python examples/finetune.py                 # LoRA, rank 2 on q_proj and v_proj
  python examples/finetune.py --qlora         # the same through an NF4 base
  python examples/finetune.py --rank 4 --targets q_proj,k_proj,v_proj,o_proj
  python examples/finetune.py --resume        # continue an interrupted run in ./out
  python examples/finetune.py --method prefix # or full, bitfit, prompt, adapter, ia3
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax

import jlora
from jlora import methods, train
from jlora.models import Llama, LlamaConfig

PAD, BOS, SEP, FIRST = 0, 1, 2, 3  # special tokens; symbols are FIRST..FIRST+SYMBOLS-1
SYMBOLS, LENGTH, VOCAB = 16, 8, 32
CIPHER = FIRST + np.random.default_rng(7).permutation(SYMBOLS)  # symbol i -> CIPHER[i]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rank", type=int, default=2, help="LoRA rank (default 2)")
  p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 × rank)")
  p.add_argument("--targets", default="q_proj,v_proj",
                 help="comma-separated module names to adapt, or 'all-linear'")
  p.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
  p.add_argument("--pretrain-steps", type=int, default=400, help="pre-training steps")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=None,
                 help="fine-tuning learning rate (default: the method's, e.g. 5e-3 for LoRA)")
  p.add_argument("--method", choices=methods.METHODS, default="lora",
                 help="what to train (default lora; see jlora.methods.recipes)")
  p.add_argument("--qlora", action="store_true",
                 help="quantize the base to NF4 (double quantization) and train through it "
                      "(the same as --method qlora)")
  p.add_argument("--virtual-tokens", type=int, default=8, help="prompt/prefix length")
  p.add_argument("--eval-size", type=int, default=512, help="held-out examples")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="out", help="output directory (default ./out)")
  p.add_argument("--checkpoint-every", type=int, default=50,
                 help="fine-tuning steps between checkpoints in <out>/run (default 50)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the last checkpoint in <out>/run")
  args = p.parse_args(argv)
  if args.qlora:
    args.method = "qlora"
  return args


def make_batch(rng: np.random.Generator, task: str, n: int) -> dict:
  """``n`` examples of ``task`` ("copy" or "cipher"): ids [n, 2·LENGTH+2], mask on the answer."""
  x = rng.integers(FIRST, FIRST + SYMBOLS, size=(n, LENGTH))
  y = x if task == "copy" else CIPHER[x - FIRST]
  ids = np.concatenate([np.full((n, 1), BOS), x, np.full((n, 1), SEP), y], axis=1)
  mask = np.zeros(ids.shape, bool)
  mask[:, LENGTH + 2:] = True
  return {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask)}


def answer_loss(logits: jax.Array, batch: dict) -> jax.Array:
  """Next-token cross-entropy on the answer tokens only."""
  return train.lm_loss(logits[:, :-1], batch["ids"][:, 1:], batch["mask"][:, 1:])


def metrics(logits: jax.Array, batch: dict) -> dict:
  """Loss, token accuracy, and sequence accuracy (every answer token right: what greedy
  decoding would produce, since the first wrong token is where greedy would differ)."""
  right = jnp.argmax(logits[:, :-1], -1) == batch["ids"][:, 1:]
  mask = batch["mask"][:, 1:]
  return {"loss": answer_loss(logits, batch),
          "token acc": (right & mask).sum() / mask.sum(),
          "sequence acc": jnp.all(right | ~mask, axis=1).mean()}


def progress(n: int, desc: str, start: int = 0):
  try:
    from tqdm import tqdm
    return tqdm(range(start, n), desc=desc, dynamic_ncols=True, initial=start, total=n)
  except ImportError:  # tqdm is optional: pip install "jlora[examples]"
    return range(start, n)


def run(step, trainable, opt_state, base, task, steps, batch_size, rng, desc):
  """Runs ``steps`` training steps on fresh batches of ``task``; returns losses too."""
  losses = []
  bar = progress(steps, desc)
  for i in bar:
    trainable, opt_state, m = step(trainable, opt_state, base, make_batch(rng, task, batch_size))
    losses.append(m["loss"])
    if i % 25 == 0 and hasattr(bar, "set_postfix"):
      bar.set_postfix(loss=f"{float(m['loss']):.4f}")
  return trainable, [float(x) for x in losses]


def pretrain(model, params, args, rng):
  """Trains every weight on the copy task (``make_train_step`` trains any tree)."""
  def loss_fn(params, base, batch, key):
    return answer_loss(model.apply({"params": params}, batch["ids"]), batch)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, max(args.pretrain_steps, 51))
  opt = train.make_optimizer(schedule, weight_decay=0.01)
  step = train.make_train_step(loss_fn, opt)
  return run(step, params, train.init_train_state(params, opt), None, "copy",
             args.pretrain_steps, args.batch_size, rng, "pre-train (all weights)")


def finetune(method, args):
  """Trains only the method's trainable tree on the cipher task (the base may be
  quantized), with checkpoints in ``<out>/run``; batch ``i`` depends only on ``i``
  (and the seed), so a resumed run sees the same data as an uninterrupted one."""
  def loss_fn(trainable, base, batch, key):
    return answer_loss(method.logits(trainable, base, batch["ids"]), batch)
  lr = args.lr or method.learning_rate
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 20, max(args.steps, 21))
  opt = train.make_optimizer(schedule)
  step = train.make_state_step(loss_fn, opt, trainable=method.select)
  ckpt = train.TrainCheckpointer(os.path.join(args.out, "run"), every=args.checkpoint_every,
                                 keep=2, best="loss")
  state = ckpt.resume(train.init_state(method.trainable, opt, rng=jax.random.key(args.seed + 2),
                                       trainable=method.select))
  if int(state.step):
    print(f"resumed fine-tuning at step {int(state.step)} from {args.out}/run")
  bar = progress(args.steps, f"fine-tune ({method.name})", int(state.step))
  for i in bar:
    batch = make_batch(np.random.default_rng([args.seed, 1, int(state.data_position)]), "cipher",
                       args.batch_size)
    state, m = step(state, method.base, batch)
    ckpt.save(state, m, force=i + 1 == args.steps)       # and always the last step
    if i % 25 == 0 and hasattr(bar, "set_postfix"):
      bar.set_postfix(loss=f"{float(m['loss']):.4f}")
  losses = ckpt.history.get("loss", [])
  ckpt.close()
  if int(state.skipped):
    print(f"{int(state.skipped)} updates skipped for a NaN/Inf loss or gradient")
  return state.adapter, losses


def plot(path: str, pre: list, fine: list, what: str = "LoRA adapter only") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  for ax, losses, title in ((axes[0], pre, "pre-training: copy (all weights)"),
                            (axes[1], fine, f"fine-tuning: cipher ({what})")):
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def print_table(rows: list) -> None:
  print(f"\n{'held-out':34s}{'loss':>8s}{'token acc':>11s}{'sequence acc':>14s}")
  for name, m in rows:
    m = {k: float(v) for k, v in m.items()}
    print(f"{name:34s}{m['loss']:8.4f}{m['token acc']:11.1%}{m['sequence acc']:14.1%}")
  print()


def targets_of(spec: str):
  return jlora.ALL_LINEAR if spec == jlora.ALL_LINEAR else [t for t in spec.split(",") if t]


def main(argv=None) -> int:
  args = parse_args(argv)
  run_dir = os.path.join(args.out, "run")
  if not args.resume and os.path.isdir(run_dir) and os.listdir(run_dir):
    print(f"error: {run_dir} holds checkpoints of an earlier run; pass --resume to continue "
          "it, or choose another --out", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  rng = np.random.default_rng(args.seed)
  config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2 * LENGTH + 2)
  model = Llama(config)
  held = {task: make_batch(np.random.default_rng(10_000 + args.seed + i), task, args.eval_size)
          for i, task in enumerate(("copy", "cipher"))}
  example = held["copy"]["ids"][:1]
  params = jax.jit(lambda key: nn.unbox(model.init(key, example))["params"])(
      jax.random.key(args.seed))
  print(f"Llama: {jlora.count_params(params):,} parameters, {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}")

  base_dir = os.path.abspath(os.path.join(args.out, "pretrained"))
  if args.resume and os.path.isdir(base_dir):   # the base of the run being resumed
    saved = jlora.restore(base_dir)
    params, pre_losses = saved["params"], [float(x) for x in saved["losses"]]
  else:
    params, pre_losses = pretrain(model, params, args, rng)
    jlora.save(base_dir, {"params": params, "losses": np.asarray(pre_losses, np.float32)})
  lcfg = jlora.LoraConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank,
                          targets=targets_of(args.targets))
  method = methods.setup(args.method, jax.random.key(args.seed + 1), model, params, example,
                         lora=lcfg, num_virtual_tokens=args.virtual_tokens)
  if args.method == "qlora":
    # every kernel but the output head (min_size=0: small ones too), as transformers does
    n_q = sum(isinstance(x, jlora.QArray) for x in jax.tree.leaves(
        method.base, is_leaf=lambda x: isinstance(x, jlora.QArray)))
    print(f"QLoRA: {n_q} kernels quantized to NF4 + double quantization; the model takes "
          f"{jlora.nbytes(params):,} -> {jlora.nbytes(method.base):,} bytes")
  n_train, n_base = method.count(), jlora.count_params(params)
  what = (f"LoRA adapter: rank {args.rank} on {args.targets}" if args.method in ("lora", "qlora")
          else f"method {args.method}")
  print(f"{what}: {n_train:,} trainable parameters ({n_train / n_base:.2%} of the model)")

  @jax.jit
  def evaluate(trainable, base, batch):
    return metrics(method.logits(trainable, base, batch["ids"]), batch)

  @jax.jit
  def evaluate_base(params, batch):  # the pre-trained model alone
    return metrics(model.apply({"params": params}, batch["ids"]), batch)

  before = evaluate_base(params, held["cipher"])
  trained, fine_losses = finetune(method, args)
  rows = [("copy, base model", evaluate_base(params, held["copy"])),
          ("cipher, base model (before)", before),
          (f"cipher, {args.method} (after)", evaluate(trained, method.base, held["cipher"]))]
  print_table(rows)

  png = os.path.join(args.out, "loss_curves.png")
  plot(png, pre_losses, fine_losses, f"{args.method}: {n_train:,} trained parameters")
  adapter_dir = os.path.abspath(os.path.join(args.out, "adapter"))
  jlora.save(adapter_dir, trained)
  restored = jlora.restore(adapter_dir)
  same = all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(restored), jax.tree.leaves(trained)))
  print(f"wrote {png}; saved the trained tree to {adapter_dir} (restores identically: {same})")

  diff = 0.0
  if args.method in ("lora", "qlora", "ia3"):
    # merge the adapter into a plain float base (the dequantized one with --qlora)
    @jax.jit
    def merged_vs_unmerged(base, adapter, ids):
      dense = jlora.dequantize(base)
      merged = model.apply({"params": jlora.merge(dense, adapter)}, ids)
      return jnp.max(jnp.abs(merged - jlora.apply(model, {"params": base}, adapter, ids)))

    diff = float(merged_vs_unmerged(method.base, trained, held["cipher"]["ids"]))
    print(f"merged model vs base + adapter: max |logits difference| = {diff:.2e}")
  print(f"done in {time.time() - t0:.0f} s")
  if not same or not diff < 1e-3:
    print("error: the restored tree or the merged model disagrees", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
