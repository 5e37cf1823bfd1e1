"""Trainable parameters and memory of every fine-tuning method, without running a step.

For each method of ``jlora.methods.METHODS`` on a model shape, everything is
built abstractly (``jax.eval_shape``: no weights are allocated) and reports:

- ``trainable``: the number of trained parameters;
- ``trainable_mib`` / ``optimizer_mib`` / ``base_mib``: the bytes of the
  trained tree, of AdamW's state for it, and of the frozen base as the step
  holds it (NF4 + double quantization for QLoRA): exact, from the shapes;
- with ``--compile``: XLA's memory analysis of the compiled train step on
  this machine's backend (``peak_estimate_mib`` = arguments + outputs -
  donated + temporaries). On CPU this is the CPU compiler's buffer
  assignment, which keeps far more temporaries than a GPU's (bf16 math is
  done in float32, little buffer reuse): compare methods with it, not devices.

  python benchmarks/methods_memory.py demo --compile          # the README demo, CPU estimate
  python benchmarks/methods_memory.py tinyllama-1.1b          # the GPU benchmark's shape, bf16
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp

import jlora
from jlora import methods, train
from jlora.models import Llama, LlamaConfig, preset, unboxed_init


def demo_config() -> LlamaConfig:
  """The model of examples/finetune.py."""
  return LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=18)


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(name: str, cfg: LlamaConfig, batch: int, seq: int, compile_step: bool) -> dict:
  model = Llama(cfg)
  example = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda k: unboxed_init(model, k, example), jax.random.key(0))
  if cfg.hidden_size > 256:   # the GPU benchmark's settings (benchmarks/train_step.py)
    opts = dict(num_virtual_tokens=20, adapter_width=64, lora=jlora.LoraConfig(
        rank=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"]))
  else:                       # examples/finetune.py's defaults
    opts = dict(lora=jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"]))
  got = {}

  def build(params):
    m = methods.setup(name, jax.random.key(1), model, params, example, **opts)
    got["m"] = m
    return m.trainable, m.base
  trainable, base = jax.eval_shape(build, params)
  m = got["m"]
  part = trainable if m.select is None else methods.split(trainable, m.select)[0]
  frozen = base if m.select is None else methods.split(trainable, m.select)[1]
  opt = train.make_optimizer(1e-4)
  state = jax.eval_shape(lambda t: train.init_train_state(t, opt, trainable=m.select), trainable)
  mib = lambda n: round(n / 2**20, 2)
  out = dict(method=name, trainable=int(sum(math.prod(x.shape) for x in jax.tree.leaves(part))),
             trainable_mib=mib(_bytes(part)), optimizer_mib=mib(_bytes(state)),
             base_mib=mib(_bytes(frozen)))
  if compile_step:
    def loss_fn(t, b, ids, rng):
      return train.lm_loss(m.logits(t, b, ids)[:, :-1], ids[:, 1:])
    step = train.make_train_step(loss_fn, opt, trainable=m.select)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    mem = step.lower(trainable, state, base, ids).compile().memory_analysis()
    out.update(temp_mib=mib(mem.temp_size_in_bytes),
               peak_estimate_mib=mib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
               compile_s=round(time.perf_counter() - t0, 1))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("shape", help="'demo' (examples/finetune.py's model) or a preset name")
  ap.add_argument("--batch", type=int, default=None, help="default: 32 (demo), 4 (presets)")
  ap.add_argument("--seq", type=int, default=None, help="default: 18 (demo), 1024 (presets)")
  ap.add_argument("--compile", action="store_true", help="also compile each step (AOT)")
  ap.add_argument("--methods", default=",".join(methods.METHODS))
  args = ap.parse_args(argv)
  if args.shape == "demo":
    cfg, batch, seq = demo_config(), args.batch or 32, args.seq or 18
  else:
    cfg = preset(args.shape).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    batch, seq = args.batch or 4, args.seq or 1024
  rows = []
  for name in args.methods.split(","):
    row = dict(shape=args.shape, batch=batch, seq=seq, backend=jax.default_backend(),
               **measure(name, cfg, batch, seq, args.compile))
    print("RESULT", json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
