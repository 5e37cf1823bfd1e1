"""jlora train step on a Llama shape, one fine-tuning method per run: tokens/s and peak memory.

The same workload as the PEFT anchor (benchmarks/peft_baseline.py): random
weights, batch B × T tokens, AdamW, LoRA r=16, alpha=32 on q/k/v/o/gate/up/down,
no gradient checkpointing, bf16. One variant per process so that the peak
memory is that variant's alone:

  python benchmarks/train_step.py lora            # bf16 base
  python benchmarks/train_step.py qlora           # NF4 + double quant base
  python benchmarks/train_step.py full            # every weight (the PyTorch full-FT anchor's row)
  python benchmarks/train_step.py bitfit          # biases only (zero biases added on every projection)
  python benchmarks/train_step.py ia3             # or adapter, prompt, prefix (jlora.methods)
  python benchmarks/train_step.py lora --preset tiny --batch 2 --seq 64   # CPU smoke run
  python benchmarks/train_step.py qlora --preset llama-3-70b --batch 1 --remat full
  python benchmarks/train_step.py lora --preset llama-3-8b --batch 8 --mesh 1,4,1   # 4 devices
  python benchmarks/train_step.py lora --preset llama-3-8b --batch 4 --pipeline 2,4,gpipe
  python benchmarks/train_step.py full --aot      # compile only, abstract inputs: XLA's memory estimate
  python benchmarks/train_step.py lora --aot      # and the lowered step's op counts (hlo_ops, hlo_top)

Full fine-tuning keeps AdamW's moments in the weights' dtype (bf16), as the
PyTorch anchor's ``torch.optim.AdamW`` does, and donates the weights to the
step. BitFit needs biases: the reference Llama gets ``qkv_bias``, ``o_bias`` and
``mlp_bias`` (zero-initialised, so the model computes what the bias-free one
does until trained); the other rows run the bias-free model.

The QLoRA base is made by ``jlora.models.quantized_init`` (one layer at a time,
quantized as it is made), so no full-precision copy of the model ever exists.

Prints one JSON line per variant, prefixed with RESULT: ``step_s`` is the
median of steps each synchronised (``block_until_ready``), ``pipelined_*``
the mean of steps run back to back with one sync at the end, which is how the
PEFT anchor script times itself. With ``--hardware`` the line also holds the
cost model's prediction (``benchmarks/cost_model.py``) for the same step.
"""
import argparse
import collections
import json
import math
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp

import jlora
from jlora import methods, train
from jlora.models.config import preset
from jlora import sharding as S
from jlora.models.llama import (Llama, abstract_params, head_logits, quantized_init,
                                unboxed_init)
from jlora.quant import QArray

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["lora", "qlora", "full", "bitfit", "ia3", "adapter", "prompt", "prefix"]
VIRTUAL_TOKENS, ADAPTER_WIDTH = 20, 64


def method_setup(variant, model, params, example, lcfg=None):
  """``(trainable, base, select, forward)`` of a variant: the train step's first argument,
  its frozen argument, the trainable selection and ``forward(trainable, base, ids, **kw) ->
  logits`` (``kw``: the model's, e.g. ``return_hidden``; not for prompt and prefix)."""
  key = jax.random.key(2)
  ex = (example,)
  adapted = lambda t, base, ids, **kw: jlora.apply(model, {"params": base}, t, ids, **kw)
  if variant in ("lora", "qlora"):
    lcfg = lcfg or jlora.LoraConfig(rank=16, alpha=32, targets=TARGETS)
    return jlora.init_adapter(key, params, lcfg, model=model, args=ex), params, None, adapted
  if variant in ("full", "bitfit"):
    return (params, None, None if variant == "full" else methods.BIASES,
            lambda t, base, ids, **kw: model.apply({"params": t}, ids, **kw))
  if variant == "ia3":
    return methods.init_ia3(params, model=model, args=ex), params, None, adapted
  if variant == "adapter":
    return (methods.init_bottleneck(key, params, width=ADAPTER_WIDTH, model=model, args=ex),
            params, None, adapted)
  if variant == "prompt":
    pr = methods.init_prompt(key, VIRTUAL_TOKENS, params["embed_tokens"]["embedding"],
                             init="random")
    return pr, params, None, lambda t, base, ids: methods.prompt.apply(
        model, base, t, ids)[:, VIRTUAL_TOKENS:]
  px = methods.init_prefix(key, model.config, VIRTUAL_TOKENS)
  return px, params, None, lambda t, base, ids: methods.prefix.apply(model, base, t, ids)


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
  ap.add_argument("variant", choices=VARIANTS)
  ap.add_argument("--preset", default="tinyllama-1.1b")
  ap.add_argument("--batch", type=int, default=int(os.environ.get("B", 4)))
  ap.add_argument("--seq", type=int, default=int(os.environ.get("T", 1024)))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--scan", type=int, default=0, help="1: one nn.scan over the layers")
  ap.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation")
  ap.add_argument("--remat", default=None, help="LlamaConfig.remat policy (e.g. full)")
  ap.add_argument("--mesh", default=None,
                  help="DATA,FSDP,TENSOR: a jlora.sharding step over that device mesh "
                       "(the batch is the global batch)")
  ap.add_argument("--loss", default="full", choices=["full", "chunked"],
                  help="full: logits then lm_loss; chunked: the head and cross-entropy chunk "
                       "by chunk (jlora.train.chunked_lm_loss), never the full f32 logits")
  ap.add_argument("--frozen", action="store_true",
                  help="the frozen-base step: one rank-1 adapter on layer 0's q_proj only")
  ap.add_argument("--fuse", type=int, default=1,
                  help="1: LoRA matmuls sharing an input compute x·[a1|a2|...] once")
  ap.add_argument("--pipeline", default=None,
                  help="STAGES,MICROBATCHES[,gpipe|1f1b]: the layers pipelined over a 'stage' "
                       "mesh axis (with --mesh for the other axes; implies --scan 1)")
  ap.add_argument("--hardware", default=None,
                  help="print the cost model's prediction for this device (h200, h100, v5p)")
  ap.add_argument("--calibrate", type=float, default=None,
                  help="with --hardware: a measured one-device step time (s) at the same "
                       "per-device batch, to fit the cost model's compute efficiency")
  ap.add_argument("--profile", default=None,
                  help="write a jax.profiler trace (perfetto json) of 3 more steps to this folder")
  ap.add_argument("--aot", action="store_true",
                  help="only lower and compile the step for abstract inputs (no memory spent on "
                       "weights) and print XLA's memory analysis of it")
  args = ap.parse_args(argv)
  pipe, stages = None, 1
  if args.pipeline:
    if args.loss != "full":
      ap.error("--pipeline computes the full next-token loss (--loss full)")
    parts = args.pipeline.split(",")
    stages = int(parts[0])
    pipe = S.Pipeline(microbatches=int(parts[1]), schedule=parts[2] if len(parts) > 2 else "gpipe")
    args.scan = 1
    args.mesh = args.mesh or "1,1,1"

  cfg = preset(args.preset).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    scan_layers=bool(args.scan), attention_impl=args.attention,
                                    remat=args.remat)
  if args.variant == "bitfit":
    cfg = cfg.replace(qkv_bias=True, o_bias=True, mlp_bias=True)
  model = Llama(cfg)
  if args.aot:
    return aot(args, cfg, model)
  if args.mesh and args.variant not in ("lora", "qlora"):
    raise SystemExit("--mesh runs the lora and qlora variants only")
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  t_init = time.perf_counter()
  if args.variant == "qlora":
    params = quantized_init(cfg, jax.random.key(0), scheme="nf4", block_size=64,
                            double_quant=True, targets=r".*_proj/kernel")
  else:  # initialised scanned (compiles fast), then split into layers_{i} if unrolled
    scanned = Llama(cfg.replace(scan_layers=True))
    params = jax.jit(lambda k: unboxed_init(scanned, k, ids[:1, :8]))(jax.random.key(0))
    if not cfg.scan_layers:
      stack = params.pop("layers")
      params.update({f"layers_{i}": jax.tree.map(lambda a: a[i], stack)
                     for i in range(cfg.num_hidden_layers)})
      del stack
  jax.block_until_ready(params)
  t_init = time.perf_counter() - t_init
  weight_bytes = jlora.nbytes(params)
  quantized = [q for q in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
               if isinstance(q, QArray)]
  q_bytes_per_param = (sum(jlora.nbytes(q) for q in quantized)
                       / sum(math.prod(q.shape) for q in quantized)) if quantized else None

  from jlora.transform import interpret
  interpret.FUSE_SIBLINGS = bool(args.fuse)
  lcfg = None
  if args.frozen:
    first = r"layers/self_attn/q_proj" if cfg.scan_layers else r"layers_0/self_attn/q_proj"
    lcfg = jlora.LoraConfig(rank=1, alpha=2, targets=first)
  adapter, params, select, forward = method_setup(args.variant, model, params, ids[:1, :8], lcfg)
  n_trainable = (jlora.count_params(adapter) if select is None
                 else jlora.count_params(methods.split(adapter, select)[0]))
  if args.loss == "chunked" and args.variant in ("prompt", "prefix"):
    raise SystemExit("--loss chunked runs every variant but prompt and prefix")

  def loss_fn(ad, base, batch, rng):
    if args.loss == "chunked":
      hidden = forward(ad, base, batch, return_hidden=True)
      head = lambda h: head_logits(cfg, ad if base is None else base, h)
      return train.chunked_lm_loss(head, hidden[:, :-1], batch[:, 1:], chunk=256)
    logits = forward(ad, base, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])

  opt = train.make_optimizer(1e-4)
  state = train.init_train_state(adapter, opt, trainable=select)
  if args.mesh:
    sizes = dict(zip(("data", "fsdp", "tensor"), map(int, args.mesh.split(","))))
    rules = S.DEFAULT_RULES
    if pipe is not None:       # the stack pipelined; embedding and head data-parallel
      from jlora.models import pipeline as model_pipeline
      mesh = S.make_mesh(stage=stages, **sizes)
      rules = S.pipeline_rules()
      loss_fn = model_pipeline.lm_loss_fn(model, mesh, pipe)
      print(pipe.describe(stages), flush=True)
    else:
      mesh = S.make_mesh(**sizes)
    float_sh = S.param_shardings(abstract_params(cfg), mesh, rules)
    base_sh = S.quantized_shardings(params, float_sh)
    ad_sh = S.adapter_shardings(adapter, float_sh)
    st_sh = S.state_shardings(state, ad_sh)
    step = S.shard_train_step(train.make_train_step(loss_fn, opt, jit=False), mesh,
                              base_shardings=base_sh, adapter_shardings=ad_sh,
                              state_shardings=st_sh, rules=rules)
    params, adapter, state = S.place(params, base_sh), S.place(adapter, ad_sh), S.place(state, st_sh)
    ids = S.shard_batch(ids, mesh, rules)
  else:
    step = train.make_train_step(loss_fn, opt, trainable=select)
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
  # As the PEFT anchor times itself: steps back to back, one sync at the end
  # (the host queues step i+1 while the device runs step i).
  t0 = time.perf_counter()
  for _ in range(args.steps):
    adapter, state, m = step(adapter, state, params, ids)
  jax.block_until_ready(m)
  dt_pipe = (time.perf_counter() - t0) / args.steps
  if args.profile:
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      for _ in range(3):
        adapter, state, m = step(adapter, state, params, ids)
      jax.block_until_ready(m)
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  tokens = args.batch * args.seq
  fpt = flops_per_token(cfg, args.seq)
  result = dict(
      variant=f"jlora_{args.variant}" + ("_frozen" if args.frozen else "")
      + ("_scan" if args.scan else "") + ("_chunked" if args.loss == "chunked" else "")
      + ("" if args.fuse else "_nofuse"), device=dev.device_kind, step_s=round(dt, 4),
      tokens_per_s=round(tokens / dt), pipelined_step_s=round(dt_pipe, 4),
      pipelined_tokens_per_s=round(tokens / dt_pipe), peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
      weight_gib=round(weight_bytes / 2**30, 3),
      bytes_per_quantized_param=q_bytes_per_param and round(q_bytes_per_param, 4),
      init_s=round(t_init, 1), preset=args.preset, batch=args.batch, seq=args.seq,
      remat=args.remat, mesh=args.mesh, devices=jax.device_count(), trainable=n_trainable,
      loss=round(float(m["loss"]), 3), compile_s=round(t_compile, 1),
      tflops=round(fpt * tokens / dt / 1e12, 1), bound_tokens_per_s_at_797=round(797e12 / fpt),
      jax=jax.__version__)
  if pipe is not None:
    result.update(pipeline=args.pipeline, bubble=round(pipe.bubble_fraction(stages), 4))
  if args.hardware:
    result.update(_prediction(args, stages, pipe))
  print("RESULT", json.dumps(result), flush=True)
  return result


def _prediction(args, stages, pipe) -> dict:
  """The cost model's step time and peak memory for this run (benchmarks/cost_model.py)."""
  import dataclasses
  import cost_model
  data, fsdp, tensor = map(int, (args.mesh or "1,1,1").split(","))
  w = cost_model.Workload(model=args.preset, method=args.variant, batch=args.batch, seq=args.seq,
                          remat=args.remat, mesh=(stages, data, fsdp, tensor),
                          microbatches=pipe.microbatches if pipe else 1,
                          schedule=pipe.schedule if pipe else "gpipe")
  hw = cost_model.HARDWARE[args.hardware]
  p = cost_model.predict(w, hw)
  out = dict(predicted_step_s=round(p["step_s"], 4), predicted_peak_gib=round(p["peak_gib"], 2),
             predicted_comm_gb=round(p["comm_gb"], 3))
  if args.calibrate:
    one = dataclasses.replace(w, mesh=(1, 1, 1, 1), microbatches=1,
                              batch=max(1, args.batch // (stages * data * fsdp * tensor)))
    eff = cost_model.predict(one, hw, efficiency=1.0)["compute_s"] / args.calibrate
    out["predicted_step_s_calibrated"] = round(cost_model.predict(w, hw, eff)["step_s"], 4)
  return out
def aot(args, cfg, model):
  """Lowers and compiles the step for abstract inputs; prints XLA's memory analysis.

  No weights are allocated: the parameters, the trainable tree and the
  optimizer state are ``jax.ShapeDtypeStruct``s. ``peak_estimate_mib`` is
  arguments + outputs - aliased (donated) + temporaries, as the compiled
  program's buffer assignment has them on this backend.
  """
  ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  example = jnp.zeros((1, 8), jnp.int32)
  if args.variant == "qlora":
    params = jax.eval_shape(lambda k: quantized_init(cfg, k, scheme="nf4", block_size=64,
                                                     double_quant=True, targets=r".*_proj/kernel"),
                            jax.random.key(0))
  else:
    params = jax.eval_shape(lambda k: unboxed_init(model, k, example), jax.random.key(0))
  got = {}

  def build(params):
    tree, base, select, forward = method_setup(args.variant, model, params, example)
    got["select"], got["forward"] = select, forward
    return tree, base
  tree, base = jax.eval_shape(build, params)
  select, forward = got["select"], got["forward"]

  def loss_fn(ad, base, batch, rng):
    return train.lm_loss(forward(ad, base, batch)[:, :-1], batch[:, 1:])
  opt = train.make_optimizer(1e-4)
  state = jax.eval_shape(lambda t: train.init_train_state(t, opt, trainable=select), tree)
  step = train.make_train_step(loss_fn, opt, trainable=select)
  t0 = time.perf_counter()
  lowered = step.lower(tree, state, base, ids)
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  ops = collections.Counter(re.findall(r"= (stablehlo\.[a-z_]+)", lowered.as_text()))
  mem = compiled.memory_analysis()
  mib = lambda n: round(n / 2**20, 1)
  part = tree if select is None else methods.split(tree, select)[0]
  result = dict(
      variant=f"jlora_{args.variant}", aot=True, backend=jax.default_backend(),
      preset=args.preset, batch=args.batch, seq=args.seq, scan=bool(args.scan), remat=args.remat,
      trainable=int(sum(math.prod(x.shape) for x in jax.tree.leaves(part))),
      argument_mib=mib(mem.argument_size_in_bytes), output_mib=mib(mem.output_size_in_bytes),
      alias_mib=mib(mem.alias_size_in_bytes), temp_mib=mib(mem.temp_size_in_bytes),
      peak_estimate_mib=mib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                            - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
      compile_s=round(t_compile, 1), jax=jax.__version__,
      hlo_ops=sum(ops.values()), hlo_top={k.split(".")[1]: n for k, n in ops.most_common(8)})
  print("RESULT", json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
