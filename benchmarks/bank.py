"""Many adapters, one base: decode and training throughput of mixed batches.

On the TinyLlama shape (bf16 base, LoRA r=16 on q/k/v/o/gate/up/down):

- decode: a batch of 64 rows, KV-cache generation of --new tokens after a short
  prompt, with 1, 8, 32 and 64 distinct adapters in the batch (a bank of 64),
  against the same batch on one merged model (no adapter at all);
- training: one AdamW step on a mixed batch whose rows use 8 adapters (the
  grouped ragged_dot path), against the single-adapter step on the same batch;
- the time to add / replace an adapter in a bank (a host call, arrays on device).

  python benchmarks/bank.py                     # on the GPU
  python benchmarks/bank.py --preset tiny --rows 8 --new 4 --seq 32    # CPU smoke run

Prints one ``RESULT {json}`` line per measurement and a summary table.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora import bank as B
from jlora import train
from jlora.models import Llama, generate, preset, unboxed_init

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(fn, reps=3):
  jax.block_until_ready(fn())           # compile + warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tinyllama-1.1b")
  ap.add_argument("--rows", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--train-batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=512)
  args = ap.parse_args(argv)

  cfg = preset(args.preset).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    max_position_embeddings=max(4096, args.prompt + args.new))
  model = Llama(cfg)
  ids = jax.random.randint(jax.random.key(1), (args.rows, args.prompt), 0, cfg.vocab_size)
  params = jax.jit(lambda k: unboxed_init(model, k, ids[:1, :8]))(jax.random.key(0))
  lcfg = jlora.LoraConfig(rank=16, alpha=32, targets=TARGETS)
  fresh = jlora.init_adapter(jax.random.key(2), params, lcfg, model=model, args=(ids[:1, :8],))
  make = jax.jit(lambda k: jax.tree.map(
      lambda v: 0.01 * jax.random.normal(jax.random.fold_in(k, v.size), v.shape, v.dtype), fresh))
  adapters = {f"ad{i}": make(jax.random.key(100 + i)) for i in range(args.rows)}
  bank = jlora.AdapterBank.stack(adapters, capacity=args.rows, dtype=jnp.bfloat16)  # serving
  results = []

  def report(**r):
    r.update(device=jax.local_devices()[0].device_kind, preset=args.preset, jax=jax.__version__)
    results.append(r)
    print("RESULT", json.dumps(r), flush=True)

  merged = jlora.merge(params, adapters["ad0"])
  t_merged = timed(lambda: generate(model, merged, ids, args.new))
  tokens = args.rows * args.new
  report(what="decode", adapters="merged (none)", s=round(t_merged, 3),
         tokens_per_s=round(tokens / t_merged))
  for n in (1, 8, 32, 64):
    if n > args.rows:
      continue
    aid = jnp.arange(args.rows, dtype=jnp.int32) % n
    t = timed(lambda: generate(model, params, ids, args.new, adapter=bank, adapter_ids=aid))
    report(what="decode", adapters=n, s=round(t, 3), tokens_per_s=round(tokens / t),
           vs_merged=round(t_merged / t, 3))

  # training: a mixed batch of 8 adapters (grouped) vs one adapter on the same batch
  tb = jax.random.randint(jax.random.key(3), (args.train_batch, args.seq), 0, cfg.vocab_size)
  tx = optax.adamw(1e-4)
  small = jlora.AdapterBank.stack({k: adapters[k] for k in list(adapters)[:8]})   # f32: trained
  aid8 = jnp.arange(args.train_batch, dtype=jnp.int32) % 8

  def bank_loss(f, base, batch, rng):
    logits = jlora.apply(model, {"params": base}, B.with_factors(small, f), batch,
                         adapter_ids=aid8)
    per_tok = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), batch[:, 1:])
    return B.slot_mean(per_tok, aid8, small.capacity)

  def one_loss(ad, base, batch, rng):
    logits = jlora.apply(model, {"params": base}, ad, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])

  for name, loss, tree, opt in (("1 adapter", one_loss, adapters["ad0"], tx),
                                ("8 adapters (mixed batch)", bank_loss, B.factors(small),
                                 B.per_slot(tx, 8))):
    step = train.make_train_step(loss, opt, donate=False)
    state = opt.init(tree)
    t = timed(lambda: step(tree, state, params, tb)[2]["loss"], reps=5)
    report(what="train step", adapters=name, s=round(t, 4),
           tokens_per_s=round(args.train_batch * args.seq / t))

  jax.block_until_ready(bank.replace("ad3", adapters["ad5"]))        # compile the updates once
  jax.block_until_ready(bank.remove("ad7").add("new", adapters["ad1"]))
  t0 = time.perf_counter()
  swapped = jax.block_until_ready(bank.replace("ad3", adapters["ad5"]))
  t_swap = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(bank.remove("ad7").add("new", adapters["ad1"]))
  t_add = time.perf_counter() - t0
  report(what="swap", replace_ms=round(1e3 * t_swap, 1), remove_and_add_ms=round(1e3 * t_add, 1))
  del swapped
  print("\nwhat          adapters                    s      tokens/s  ratio")
  for r in results:
    if "tokens_per_s" in r:
      ratio = r.get("vs_merged", "")
      print(f"{r['what']:13s} {str(r['adapters']):26s} {r['s']:<8} {r['tokens_per_s']:<9} {ratio}")


if __name__ == "__main__":
  main()
