# Copied from the project's shared anchors (../shared/anchors/qwix_llama.py) so it travels to
# the GPU machine; one addition, marked: --frozen (the frozen-base step of RESULTS.md).
"""Peer benchmark: Google's qwix LoRA / QLoRA train step on jlora's reference Llama.

The workload is benchmarks/train_step.py's, step for step: jlora.models.llama.Llama
with a preset (default tinyllama-1.1b), dtype/param_dtype bf16, unrolled layers
(--scan 0) by default, base params made as train_step.py makes them (jit of
unboxed_init on the scanned model, then split into layers_{i}), random token ids
(key 1), LoRA r=16 alpha=32 on q/k/v/o/gate/up/down, AdamW lr 1e-4 without
weight decay (= jlora.train.make_optimizer(1e-4)), next-token cross-entropy
(jlora.train.lm_loss), no remat. Only the adapter is differentiated; the frozen
base is an argument of the jitted step (not a constant); adapter and optimizer
state are donated. Timing as train_step.py: a compile call, warmup-1 more calls,
median of --steps synced steps, then the mean of --steps pipelined steps.

What qwix does here: ``qwix.apply_lora_to_model(model, qwix.LoraProvider(...))``
returns a subclass of Llama whose ``__call__`` runs with ``jax.lax.dot_general``,
``jnp.einsum``, ``nn.Module.param`` and ``promote_dtype`` patched (bytecode
interception). Each intercepted dot_general whose module path fully matches the
rule's regex and whose rhs is a param of that module gets params
``{name}_lora_a`` [in, r] (he_uniform) and ``{name}_lora_b`` [r, out] (zeros)
created beside the kernel in the Linen ``params`` collection, in the kernel's
dtype (bf16; for QLoRA the scale's dtype), and adds ``(x@a)@b * alpha/rank``.
QLoRA: the same rule with ``weight_qtype="nf4", tile_size=64`` (qwix's PTQ path:
kernel -> WithAux(QArray(uint4 codes, bf16 absmax scale per 64 inputs x 1
output))), made from the bf16 params with ``qwix.quantize_params``; the matmul
dequantizes the kernel to bf16 first (nf4 cannot be dequantized on the output).

  PYTHONPATH=$PWD python3 ../shared/anchors/qwix_llama.py lora
  PYTHONPATH=$PWD python3 ../shared/anchors/qwix_llama.py qlora
  PYTHONPATH=$PWD python3 ../shared/anchors/qwix_llama.py lora --preset tiny --batch 2 --seq 64 --steps 2
  ... --lora-dtype f32   # f32 master LoRA params cast to bf16 for compute, as jlora's adapters

Prints one line ``RESULT {json}``.
"""
import argparse
import json
import math
import os
import statistics
import time
import zlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import qwix
from flax import traverse_util
from qwix._src.providers.ptq import WithAux   # the quantized-kernel leaf (not re-exported)

import jlora
from jlora import train
from jlora.models.config import preset
from jlora.models.llama import Llama, unboxed_init

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# qwix matches re.fullmatch(module_path, "/".join(module.path)), e.g. "layers_3/mlp/up_proj"
MODULE_PATH = r"(.*/)?(%s)" % "|".join(TARGETS)
RANK, ALPHA = 16, 32.0
QTYPE = "nf4"     # qwix's qtypes include "nf4" (stored as uint4) and jnp.int4; no double quant
LORA_SUFFIXES = ("_lora_a", "_lora_b")


def flops_per_token(c, seq: int) -> float:
  """As benchmarks/train_step.py: base matmuls fwd + bwd-to-activations plus causal attention."""
  hd = c.head_size
  kv = c.num_key_value_heads or c.num_attention_heads
  per_layer = (c.hidden_size * hd * (c.num_attention_heads * 2 + kv * 2)
               + 3 * c.hidden_size * c.intermediate_size)
  n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size
  attn = c.num_hidden_layers * 2 * 2 * seq * c.num_attention_heads * hd / 2
  return 4 * n + 3 * attn


def is_lora(path) -> bool:
  return str(path[-1]).endswith(LORA_SUFFIXES)


def split_lora(tree):
  """(lora, rest) of a params tree, by leaf name (qwix names them {param}_lora_a/_b)."""
  flat = traverse_util.flatten_dict(tree)
  lora = {p: v for p, v in flat.items() if is_lora(p)}
  rest = {p: v for p, v in flat.items() if not is_lora(p)}
  return traverse_util.unflatten_dict(lora), traverse_util.unflatten_dict(rest)


def merge(base, lora):
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(lora))
  return traverse_util.unflatten_dict(flat)


def device_bytes(tree) -> int:
  """Bytes the leaves take on the device (uint4 codes count as stored, not as 1 byte each)."""
  total = 0
  for x in jax.tree.leaves(tree):
    try:
      total += x.on_device_size_in_bytes()
    except Exception:  # noqa: BLE001  (not a committed array)
      total += x.nbytes
  return total


def peak_gib() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  return round(stats.get("peak_bytes_in_use", 0) / 2**30, 2)


def quantize_base(params, abstract_q, scanned: bool):
  """qwix's own PTQ (``qwix.quantize_params``) of the base, one kernel at a time.

  The targeted kernels become WithAux(QArray). ``params`` is emptied as it goes,
  so the peak is the bf16 model plus one kernel's temporaries. Under nn.scan the
  abstract QArray is stacked [L, in, out] while its ``how`` is the per-layer
  [in, out] one (quantize_params on the stack would tile the layer axis), so each
  layer is quantized by a vmap of the same call, as nn.scan itself would stack it.
  """
  flat, abs_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(abstract_q)
  params.clear()
  fns, out = {}, {}
  for p in list(flat):
    v, a = flat.pop(p), abs_flat[p]
    if not isinstance(a, WithAux):
      out[p] = v
      continue
    shape = v.shape[1:] if scanned else v.shape
    key = (shape, str(v.dtype), repr(a.how))
    if key not in fns:
      abs_one = {"w": WithAux(jax.ShapeDtypeStruct(shape, v.dtype), a.how)}
      f = lambda w, abs_one=abs_one: qwix.quantize_params({"w": w}, abs_one)["w"]
      fns[key] = jax.jit(jax.vmap(f) if scanned else f)
    out[p] = fns[key](v)
    del v
  return traverse_util.unflatten_dict(out)


def dequantized(base):
  """The base with every WithAux(QArray) kernel dequantized (bf16): the plain model's view."""
  return jax.tree.map(lambda x: qwix.dequantize(x.array) if isinstance(x, WithAux) else x,
                      base, is_leaf=lambda x: isinstance(x, WithAux))


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("variant", choices=["lora", "qlora"])
  ap.add_argument("--preset", default="tinyllama-1.1b")
  ap.add_argument("--batch", type=int, default=int(os.environ.get("B", 4)))
  ap.add_argument("--seq", type=int, default=int(os.environ.get("T", 1024)))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--scan", type=int, default=0, help="1: one nn.scan over the layers")
  ap.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation")
  ap.add_argument("--remat", default=None, help="LlamaConfig.remat policy (e.g. full)")
  ap.add_argument("--lora-dtype", default="native", choices=["native", "f32"],
                  help="native: qwix's own choice (the kernel's dtype, bf16); f32: keep f32 "
                       "LoRA params + Adam state and cast them to bf16 in the loss, as jlora's "
                       "default adapters (LoraConfig.dtype=float32)")
  ap.add_argument("--weight-decay", type=float, default=0.0,
                  help="optax.adamw weight decay (0 = jlora.train.make_optimizer's default)")
  ap.add_argument("--block", type=int, default=64,
                  help="QLoRA block (qwix tile_size along the kernel's input axis)")
  ap.add_argument("--skip-check", action="store_true", help="skip the start-up sanity checks")
  ap.add_argument("--frozen", action="store_true",   # (jlora addition, see the header)
                  help="the frozen-base step: one rank-1 adapter on layer 0's q_proj only")
  args = ap.parse_args(argv)

  cfg = preset(args.preset).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                    scan_layers=bool(args.scan), attention_impl=args.attention,
                                    remat=args.remat)
  model = Llama(cfg)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  init_ids = ids[:1, :8]

  # --- base params: exactly as train_step.py's bf16 path --------------------------------
  t_init = time.perf_counter()
  scanned = Llama(cfg.replace(scan_layers=True))
  params = jax.jit(lambda k: unboxed_init(scanned, k, init_ids))(jax.random.key(0))
  if not cfg.scan_layers:
    stack = params.pop("layers")
    params.update({f"layers_{i}": jax.tree.map(lambda a: a[i], stack)
                   for i in range(cfg.num_hidden_layers)})
    del stack

  # --- qwix: provider, intercepted model, LoRA params ------------------------------------
  rule = dict(module_path=MODULE_PATH, rank=RANK, alpha=ALPHA)
  if args.frozen:
    first = "layers/self_attn/q_proj" if cfg.scan_layers else "layers_0/self_attn/q_proj"
    rule = dict(module_path=first, rank=1, alpha=2.0)
  block = None
  if args.variant == "qlora":
    # qwix needs the block to divide every quantized kernel's input size (no padding)
    in_dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_size)
    block = math.gcd(args.block, *in_dims)
    if block != args.block:
      print(f"NOTE: block {args.block} does not divide the input sizes {in_dims}; "
            f"using {block}", flush=True)
    rule.update(weight_qtype=QTYPE, tile_size=block)
  provider = qwix.LoraProvider(**rule)
  qmodel = qwix.apply_lora_to_model(model, provider)
  abstract = nn.unbox(jax.eval_shape(qmodel.init, jax.random.key(2), init_ids)["params"])
  unused = provider.get_unused_rules()
  if unused:
    raise SystemExit(f"qwix rule matched no module: {unused}")
  abs_lora, abs_base = split_lora(abstract)
  # qwix's LoRA params come from qwix's own init; only the LoRA leaves are kept, so XLA
  # drops the rest of the init (no second copy of the base is made).
  lora = jax.jit(lambda k: split_lora(nn.unbox(qmodel.init(k, init_ids)["params"]))[0])(
      jax.random.key(2))
  lora_native_dtype = jax.tree.leaves(lora)[0].dtype

  # jlora's adapter on the same params (for the trainable count and the cross-check)
  lcfg = jlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
  if args.frozen:
    lcfg = jlora.LoraConfig(rank=1, alpha=2.0, targets=rule["module_path"])
  j_adapter = jlora.init_adapter(jax.random.key(2), params, lcfg, model=model, args=(init_ids,))
  jlora_trainable = jlora.count_params(j_adapter)

  qerr = {}
  if args.variant == "qlora":
    # quantization error of one kernel, qwix's NF4 vs jlora's NF4 (+ double quant) at this block
    top = "layers" if cfg.scan_layers else "layers_0"
    w = params[top]["mlp"]["up_proj"]["kernel"]
    w = w[0] if cfg.scan_layers else w
    abs_w = WithAux(jax.ShapeDtypeStruct(w.shape, w.dtype),
                    abs_base[top]["mlp"]["up_proj"]["kernel"].how)
    wq = quantize_base({"k": w}, {"k": abs_w}, False)["k"]
    rel = lambda d: float(jnp.mean(jnp.abs(d.astype(jnp.float32) - w.astype(jnp.float32)))
                          / jnp.mean(jnp.abs(w.astype(jnp.float32))))
    qerr = dict(qwix_nf4_rel_err=rel(qwix.dequantize(wq.array)),
                jlora_nf4_rel_err=rel(jlora.quant.quantize_array(w, "nf4", block).dequantize()))
    print(f"CHECK nf4 mean rel. error of layer 0 up_proj: qwix {qerr['qwix_nf4_rel_err']:.4f}  "
          f"jlora {qerr['jlora_nf4_rel_err']:.4f}", flush=True)
    del w, wq
    base = quantize_base(params, abs_base, cfg.scan_layers)   # empties params
    del params
  else:
    base = params
  jax.block_until_ready((base, lora))
  t_init = time.perf_counter() - t_init
  init_peak = peak_gib()
  # every path/shape of the base matches what the qwix model expects
  shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), t)
  assert shapes(base) == shapes(abs_base), "base tree differs from the qwix model's"
  assert shapes(lora) == shapes(abs_lora), "LoRA tree differs from the qwix model's"
  quantized = [x for x in jax.tree.leaves(base, is_leaf=lambda x: isinstance(x, WithAux))
               if isinstance(x, WithAux)]
  n_quantized = len(quantized)
  # as train_step.py's bytes_per_quantized_param, from the bytes the device really holds
  # (ml_dtypes' uint4 reports itemsize 1 in .nbytes whether or not the backend packs it)
  q_bytes_per_param = (sum(device_bytes(q) for q in quantized)
                       / sum(math.prod(q.shape) for q in quantized)) if quantized else None
  del quantized
  trainable = int(sum(x.size for x in jax.tree.leaves(lora)))

  # --- start-up sanity checks (same ids as the timed step) --------------------------------
  print(f"CHECK trainable: qwix {trainable}  jlora {jlora_trainable}  "
        f"{'EQUAL' if trainable == jlora_trainable else 'DIFFERENT'}", flush=True)
  check = {}
  if not args.skip_check:
    # each in its own jit, as the step will be (one jit for all would let XLA fuse the
    # four forwards differently and add bf16 rounding noise to the differences)
    plain_fn = jax.jit(lambda base: model.apply({"params": dequantized(base)}, ids))
    qwix_fn = jax.jit(lambda base, lo: qmodel.apply({"params": merge(base, lo)}, ids))
    jlora_fn = jax.jit(lambda base, ad: jlora.apply(model, {"params": dequantized(base)}, ad, ids))
    maxdiff = lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))

    # a nonzero B (the same a, b given to both libraries) so that the LoRA path is exercised
    lora_rand = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(3), zlib.crc32(
            jax.tree_util.keystr(p).encode()) % 2**31), x.shape)).astype(x.dtype)
        if str(p[-1].key).endswith("_lora_b") else x, lora)
    flat_r = traverse_util.flatten_dict(lora_rand)

    def to_jlora(path, lo):
      keys = tuple(k.key for k in path)                 # (..., "q_proj", "kernel")
      a = flat_r[keys[:-1] + (keys[-1] + "_lora_a",)]
      b = flat_r[keys[:-1] + (keys[-1] + "_lora_b",)]
      assert a.shape == lo.a.shape and b.shape == lo.b.shape, (keys, a.shape, lo.a.shape)
      return lo.replace(a=a.astype(lo.a.dtype), b=b.astype(lo.b.dtype))

    j_rand = jax.tree_util.tree_map_with_path(to_jlora, j_adapter,
                                              is_leaf=lambda x: isinstance(x, jlora.LoRA))
    ref = plain_fn(base)
    d0 = maxdiff(qwix_fn(base, lora), ref)
    q1 = qwix_fn(base, lora_rand)
    d1, dj = maxdiff(q1, ref), maxdiff(q1, jlora_fn(base, j_rand))
    mag = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
    check = dict(logits_maxdiff_b0_vs_plain=d0, logits_maxdiff_randb_vs_plain=d1,
                 logits_maxdiff_randb_qwix_vs_jlora=dj, logits_maxabs=mag)
    print(f"CHECK B=0: max|qwix - plain{' (dequantized base)' if args.variant == 'qlora' else ''}|"
          f" = {d0:.3g}   (logits max|.| {mag:.3g})", flush=True)
    print(f"CHECK random B: max|qwix - plain| = {d1:.3g} (LoRA active), "
          f"max|qwix - jlora (same a, b)| = {dj:.3g}", flush=True)
    del ref, q1, lora_rand, j_rand, flat_r, plain_fn, qwix_fn, jlora_fn
  check_peak = peak_gib()
  del j_adapter

  # --- the train step ---------------------------------------------------------------------
  if args.lora_dtype == "f32":
    lora = jax.tree.map(lambda x: x.astype(jnp.float32), lora)

  def loss_fn(lo, base, batch):
    lo = jax.tree.map(lambda x: x.astype(lora_native_dtype), lo)  # no-op for "native"
    logits = qmodel.apply({"params": merge(base, lo)}, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])

  opt = optax.adamw(1e-4, weight_decay=args.weight_decay)
  grad_fn = jax.value_and_grad(loss_fn)

  def step_fn(lo, opt_state, base, batch):
    loss, grads = grad_fn(lo, base, batch)
    updates, opt_state = opt.update(grads, opt_state, lo)
    lo = optax.apply_updates(lo, updates)
    return lo, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

  step = jax.jit(step_fn, donate_argnums=(0, 1))
  state = opt.init(lora)

  t_compile = time.perf_counter()
  lora, state, m = step(lora, state, base, ids)
  jax.block_until_ready(m)
  t_compile = time.perf_counter() - t_compile
  times = []
  for i in range(args.warmup - 1 + args.steps):
    t0 = time.perf_counter()
    lora, state, m = step(lora, state, base, ids)
    jax.block_until_ready(m)
    if i >= args.warmup - 1:
      times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    lora, state, m = step(lora, state, base, ids)
  jax.block_until_ready(m)
  dt_pipe = (time.perf_counter() - t0) / args.steps

  dev = jax.local_devices()[0]
  # did the qwix-intercepted model still get jlora's cuDNN flash attention? (lowering only)
  attention_cudnn = None
  if jax.default_backend() == "gpu":
    attention_cudnn = "cudnn$fmha" in jax.jit(step_fn).lower(lora, state, base, ids).as_text()
  tokens = args.batch * args.seq
  fpt = flops_per_token(cfg, args.seq)
  result = dict(
      variant=f"qwix_{args.variant}" + ("_frozen" if args.frozen else "") + (
          "_scan" if args.scan else ""), device=dev.device_kind, step_s=round(dt, 4),
      tokens_per_s=round(tokens / dt), pipelined_step_s=round(dt_pipe, 4),
      pipelined_tokens_per_s=round(tokens / dt_pipe), peak_gib=peak_gib(),
      init_peak_gib=init_peak, check_peak_gib=check_peak,
      weight_gib=round(device_bytes(base) / 2**30, 3),
      qtype=(f"{QTYPE} (qwix: uint4 codes, bf16 absmax scale per {block} inputs x 1 output, "
             "no double quant)") if args.variant == "qlora" else None,
      block_size=block, quantized_kernels=n_quantized,
      bytes_per_quantized_param=q_bytes_per_param and round(q_bytes_per_param, 4),
      lora_dtype=str(jax.tree.leaves(lora)[0].dtype), init_s=round(t_init, 1),
      preset=args.preset, batch=args.batch, seq=args.seq, scan=args.scan, remat=args.remat,
      attention=args.attention, attention_cudnn=attention_cudnn,
      trainable=trainable, jlora_trainable=jlora_trainable, loss=round(float(m["loss"]), 3),
      compile_s=round(t_compile, 1), tflops=round(fpt * tokens / dt / 1e12, 1),
      **{k: float(f"{v:.4g}") for k, v in {**check, **qerr}.items()},
      jax=jax.__version__, flax=flax.__version__, qwix=qwix.__version__)
  print("RESULT", json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
