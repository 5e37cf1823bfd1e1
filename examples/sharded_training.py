"""Sharded LoRA / QLoRA training on a device mesh: FSDP x tensor parallelism, one program.

1. Lays a ("data", "fsdp", "tensor") mesh over the devices (on a machine with
   one CPU, JAX is asked for 8 simulated CPU devices, so this runs anywhere).
2. Builds the demo's small Llama, reads each base weight's sharding from its
   logical axis names (``jlora.sharding.param_shardings``: ``embed`` over
   fsdp, ``heads``/``mlp``/``vocab`` over tensor), and derives the adapter's
   and the optimizer state's shardings from it. With ``--qlora`` the base is
   NF4-quantized and its codes sharded by blocks.
3. Compiles one training step with all shardings pinned
   (``jlora.sharding.shard_train_step``) and trains the adapter on the demo's
   cipher task over a random base (the loss falls below chance, ln 16 = 2.77,
   as the adapter learns the cipher). ``tests/test_sharding.py`` checks such
   steps against one device on 8x1, 4x2, 2x4 and 1x8 meshes.

  python examples/sharded_training.py                  # about 15 s on a laptop CPU
  python examples/sharded_training.py --qlora --fsdp 4 --tensor 2
"""
from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in \
    os.environ.get("XLA_FLAGS", ""):            # simulated devices, if JAX is not started yet
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune as demo  # noqa: E402  (the demo's tiny language and model)

import jlora  # noqa: E402
from jlora import sharding, train  # noqa: E402
from jlora.models import Llama, LlamaConfig, abstract_params  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--fsdp", type=int, default=2, help="FSDP axis size (default 2)")
  p.add_argument("--tensor", type=int, default=2, help="tensor-parallel axis size (default 2)")
  p.add_argument("--qlora", action="store_true", help="NF4-quantize the base first")
  p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
  p.add_argument("--steps", type=int, default=150, help="training steps")
  p.add_argument("--batch-size", type=int, default=32, help="global batch (split over data/fsdp)")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  mesh = sharding.make_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor)
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}")

  config = LlamaConfig(vocab_size=demo.VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32)
  model = Llama(config)
  boxed = abstract_params(config)                     # logical axis names, no memory spent
  base_sh = sharding.param_shardings(boxed, mesh)
  # random weights, placed shard by shard (a real base: from_hf(dir, shardings=mesh))
  rng = np.random.default_rng(0)
  params = sharding.place(jax.tree.map(      # norm scales 1, weights N(0, 0.05²)
      lambda s: (np.ones(s.shape) if len(s.shape) == 1 else 0.05 * rng.standard_normal(s.shape))
      .astype(s.dtype), nn.unbox(boxed)), base_sh)
  kernel = params["layers_0"]["mlp"]["up_proj"]["kernel"]
  print(f"base up_proj kernel {list(kernel.shape)}: spec {kernel.sharding.spec}, "
        f"{list(kernel.addressable_shards[0].data.shape)} per device")

  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=jlora.ALL_LINEAR)
  adapter = jlora.init_adapter(jax.random.key(1), params, cfg, model=model)
  ad_sh = sharding.adapter_shardings(adapter, base_sh)
  lo = ad_sh["layers_0"]["mlp"]["up_proj"]["kernel"]
  print(f"adapter up_proj: a {lo.a.spec}, b {lo.b.spec}")
  base = params
  if args.qlora:
    base = jlora.quantize(params, "nf4", double_quant=True)
    base_sh = sharding.quantized_shardings(base, base_sh)
    base = sharding.place(base, base_sh)
    print(f"NF4 base: {jlora.nbytes(base):,} bytes (float32: {jlora.nbytes(params):,}); "
          f"up_proj codes spec {base_sh['layers_0']['mlp']['up_proj']['kernel'].codes.spec}")

  def loss_fn(adapter, base, batch, rng):
    return demo.answer_loss(jlora.apply(model, {"params": base}, adapter, batch["ids"]), batch)

  optimizer = train.make_optimizer(5e-3)
  opt_state = train.init_train_state(adapter, optimizer)
  st_sh = sharding.state_shardings(opt_state, ad_sh)
  step = sharding.shard_train_step(train.make_train_step(loss_fn, optimizer, jit=False), mesh,
                                   base_shardings=base_sh, adapter_shardings=ad_sh,
                                   state_shardings=st_sh)
  adapter = sharding.place(adapter, ad_sh)
  opt_state = sharding.place(opt_state, st_sh)
  for i in range(args.steps):
    batch = sharding.shard_batch(demo.make_batch(rng, "cipher", args.batch_size), mesh)
    adapter, opt_state, metrics = step(adapter, opt_state, base, batch)
    if i == 0:
      first = float(metrics["loss"])
      print(f"step 1: loss {first:.3f}")
  print(f"after {args.steps} steps: loss {float(metrics['loss']):.3f}; adapter b of up_proj "
        f"sharded {adapter['layers_0']['mlp']['up_proj']['kernel'].b.sharding.spec}")
  print(f"done in {time.time() - start:.1f} s")
  return {"first": first, "loss": float(metrics["loss"])}


if __name__ == "__main__":
  main()
