"""jlora LoRA / QLoRA train step on a Llama shape: tokens/s and peak memory.

The same workload as the PEFT anchor (benchmarks/peft_baseline.py): random
weights, batch B × T tokens, AdamW, LoRA r=16, alpha=32 on q/k/v/o/gate/up/down,
no gradient checkpointing, bf16. One variant per process so that the peak
memory is that variant's alone:

  python benchmarks/train_step.py lora            # bf16 base
  python benchmarks/train_step.py qlora           # NF4 + double quant base
  python benchmarks/train_step.py lora --preset tiny --batch 2 --seq 64   # CPU smoke run

Prints one JSON line per variant, prefixed with RESULT.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jlora
from jlora import train
from jlora.models.config import preset
from jlora.models.llama import Llama, unboxed_init

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(c, seq: int) -> float:
  """Base matmuls forward + backward-to-activations (4·N) plus causal attention."""
  hd = c.head_size
  kv = c.num_key_value_heads or c.num_attention_heads
  per_layer = (c.hidden_size * hd * (c.num_attention_heads * 2 + kv * 2)
               + 3 * c.hidden_size * c.intermediate_size)
  n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
  attn = c.num_hidden_layers * 2 * 2 * seq * c.num_attention_heads * hd / 2  # causal fwd
  return 4 * n + 3 * attn


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("variant", choices=["lora", "qlora"])
  ap.add_argument("--preset", default="tinyllama-1.1b")
  ap.add_argument("--batch", type=int, default=int(os.environ.get("B", 4)))
  ap.add_argument("--seq", type=int, default=int(os.environ.get("T", 1024)))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--scan", type=int, default=1)
  ap.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation")
  args = ap.parse_args(argv)

  cfg = preset(args.preset).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    scan_layers=bool(args.scan), attention_impl=args.attention)
  model = Llama(cfg)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  params = jax.jit(lambda k: unboxed_init(model, k, ids[:1, :8]))(jax.random.key(0))
  if args.variant == "qlora":
    params = jlora.quantize(params, scheme="nf4", block_size=64, double_quant=True,
                            targets=r".*_proj/kernel")
  jax.block_until_ready(params)
  weight_bytes = jlora.nbytes(params)

  lcfg = jlora.LoraConfig(rank=16, alpha=32, targets=TARGETS)
  adapter = jlora.init_adapter(jax.random.key(2), params, lcfg, model=model, args=(ids[:1, :8],))

  def loss_fn(ad, base, batch, rng):
    logits = jlora.apply(model, {"params": base}, ad, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])

  opt = train.make_optimizer(1e-4)
  step = train.make_train_step(loss_fn, opt)
  state = train.init_train_state(adapter, opt)
  t_compile = time.perf_counter()
  adapter, state, m = step(adapter, state, params, ids)
  jax.block_until_ready(m)
  t_compile = time.perf_counter() - t_compile
  times = []
  for i in range(args.warmup - 1 + args.steps):
    t0 = time.perf_counter()
    adapter, state, m = step(adapter, state, params, ids)
    jax.block_until_ready(m)
    if i >= args.warmup - 1:
      times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  tokens = args.batch * args.seq
  fpt = flops_per_token(cfg, args.seq)
  result = dict(
      variant=f"jlora_{args.variant}", device=dev.device_kind, step_s=round(dt, 4),
      tokens_per_s=round(tokens / dt), peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
      weight_gib=round(weight_bytes / 2**30, 3), trainable=jlora.count_params(adapter),
      loss=round(float(m["loss"]), 3), compile_s=round(t_compile, 1),
      tflops=round(fpt * tokens / dt / 1e12, 1), bound_tokens_per_s_at_797=round(797e12 / fpt),
      jax=jax.__version__)
  print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
  sys.exit(main())
