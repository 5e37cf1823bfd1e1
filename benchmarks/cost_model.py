"""A small cost model of a jlora LoRA / QLoRA train step on a device mesh.

Memory per device and step time for data, FSDP, tensor and pipeline meshes,
from FLOPs, HBM bytes and collective volumes:

* **Parameters, adapter, optimizer state**: exact. The base's shapes come from
  ``jax.eval_shape`` of the reference model (``jlora.models.abstract_params``,
  ``jlora.quantize`` for QLoRA), their per-device shards from the library's own
  rules (``param_shardings`` with ``pipeline_rules`` on a stage mesh,
  ``quantized_shardings``, ``lora_shardings``) on a
  ``jax.sharding.AbstractMesh``: any mesh size, no devices, no memory spent.
* **Activations**: saved elements per token and layer, ``5E + (3E + 2E_kv +
  4F) / tensor`` in bf16 (the residual stream is whole on every tensor device,
  the head and MLP parts are split), for the microbatches each schedule keeps;
  plus logits and transients. Checked against the measured 8B peak below.
* **Step time**: matmul FLOPs at the device's matmul rate, elementwise and
  weight traffic at its HBM bandwidth, collectives (ring all-reduce
  ``2(n-1)/n``, all-gather ``(n-1)/n``, point-to-point ``1``) at the bandwidth
  of the links the mesh axis spans (inside a host or across hosts) plus a
  latency per collective, nothing overlapped; the pipeline's layer work
  stretched by ``(M + S - 1) / M``, and 1F1B's recomputed stage forward added.
  The compute terms are divided by an efficiency fitted to one measured step
  (the 8B LoRA step on one H100, ``RESULTS.md`` §2; or ``--calibrate`` with a
  fresh one-device measurement).

  python benchmarks/cost_model.py predict --preset llama-3-8b --batch 4 --seq 1024 \\
      --mesh 1,1,1 --pipeline 2,4,gpipe --hardware h200
  python benchmarks/cost_model.py plan            # the docs/sharding.md planning table

Rates are arguments (``--flops``, ``--hbm``, ``--link``, ``--net``); the
defaults per hardware are in ``HARDWARE`` with their sources.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

import jlora
from jlora import sharding as S
from jlora.lora import LoRA
from jlora.models import LlamaConfig, abstract_params, preset

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AXES = ("stage", "data", "fsdp", "tensor")
GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Per-device rates. ``link``: bytes/s each way on the links inside a host (NVLink, or
  a TPU slice's ICI, which the whole slice shares); ``net``: across hosts."""
  name: str
  flops: float            # achievable dense bf16 matmul FLOP/s
  hbm: float              # achievable HBM bytes/s
  link: float
  net: float
  per_host: int           # devices that share ``link``
  memory: float           # HBM bytes
  latency: float = 20e-6  # seconds per collective


HARDWARE = {
    # 790 TFLOP/s: the large matmuls of the measured H100 step (RESULTS.md §3, ~780);
    # H200 has the same SMs. HBM: 4.8 TB/s (H200) / 3.35 TB/s (H100) peak, ~85% achievable.
    # NVLink 4: 900 GB/s per GPU both ways, 450 each way, ~80% achievable.
    # Across hosts: one 400 Gb/s NIC per GPU, 50 GB/s.
    "h200": Hardware("H200", 790e12, 4.0e12, 360e9, 45e9, 8, 141e9),
    "h100": Hardware("H100", 790e12, 2.85e12, 360e9, 45e9, 8, 80e9),
    # TPU v5p: 459 TFLOP/s bf16 peak (~85% on large matmuls), 2.76 TB/s HBM, 95 GB;
    # ICI 4800 Gb/s per chip over 6 links of a 3-D torus: ~100 GB/s each way per link,
    # a mesh axis on one torus dimension gets 2 links. The slice is one ICI domain.
    "v5p": Hardware("TPU v5p", 390e12, 2.35e12, 180e9, 180e9, 10 ** 6, 95e9, 10e-6),
}


def llama_405b(**kw) -> LlamaConfig:
  """meta-llama/Llama-3.1-405B's shape (not among the library's presets)."""
  return LlamaConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248,
                     num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                     rms_norm_eps=1e-5, rope_theta=500000.0, **kw)


def model_config(name: str) -> LlamaConfig:
  kw = dict(scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  if name in ("llama-3.1-405b", "llama-3-405b"):
    return llama_405b(**kw)
  return preset(name, **kw)


@dataclasses.dataclass(frozen=True)
class Workload:
  model: str = "llama-3-8b"
  method: str = "lora"             # "lora" (bf16 base) or "qlora" (NF4 + double quant)
  batch: int = 2                   # global sequences per step
  seq: int = 1024
  rank: int = 16
  remat: str | None = None         # None or "full"
  mesh: tuple = (1, 1, 1, 1)       # stage, data, fsdp, tensor
  microbatches: int = 1
  schedule: str = "gpipe"

  @property
  def sizes(self) -> dict:
    return dict(zip(AXES, self.mesh))


# --------------------------------------------------------------------------- memory (exact parts)

def _abstract_mesh(sizes: dict) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


@functools.lru_cache(maxsize=None)
def _abstract_base(model: str, method: str):
  cfg = model_config(model)
  boxed = abstract_params(cfg)
  plain = nn.unbox(boxed)
  if method == "qlora":
    base = jax.eval_shape(lambda p: jlora.quantize(p, "nf4", block_size=64, double_quant=True,
                                                   targets=r".*_proj/kernel"), plain)
  else:
    base = plain
  return cfg, boxed, plain, base


def _bytes(x, sharding=None) -> int:
  shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
  return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _leaves(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def state_bytes(w: Workload) -> dict:
  """Per-device bytes of the base, the adapter, and the trained state; and what the
  collectives move: FSDP-split weight bytes per layer stack, the adapter's."""
  cfg, boxed, plain, base = _abstract_base(w.model, w.method)
  sizes = w.sizes
  mesh = _abstract_mesh(sizes)
  rules = S.pipeline_rules() if sizes["stage"] > 1 else S.DEFAULT_RULES
  float_sh = S.param_shardings(boxed, mesh, rules)
  base_sh = S.quantized_shardings(base, float_sh) if w.method == "qlora" else float_sh
  xs, shs = jax.tree.leaves(base), _leaves(base_sh)
  base_dev = sum(_bytes(x, s) for x, s in zip(xs, shs))
  base_all = sum(_bytes(x) for x in xs)
  fsdp = sizes["fsdp"]
  # bytes a device gathers per pass when FSDP splits a weight: the other shards
  gathered = sum(_bytes(x, s) * (fsdp - 1) for x, s in zip(xs, shs)
                 if "fsdp" in jax.tree.leaves(tuple(s.spec)))
  # the adapter: r x (in + out) per targeted kernel, laid out like its kernel
  flat = jlora.paths.flatten(plain)
  flat_sh = jlora.paths.flatten(float_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
  ad_dev = ad_all = 0
  for path, k in flat.items():
    if path.startswith("layers/") and path.split("/")[-2] in TARGETS:
      n, i, o = k.shape
      lo = LoRA(a=jax.ShapeDtypeStruct((n, i, w.rank), jnp.float32),
                b=jax.ShapeDtypeStruct((n, w.rank, o), jnp.float32), rank=w.rank, alpha=32.0)
      lsh = S.lora_shardings(lo, flat_sh[path])
      ad_dev += _bytes(lo.a, lsh.a) + _bytes(lo.b, lsh.b)
      ad_all += _bytes(lo.a) + _bytes(lo.b)
  return dict(base=base_dev, base_total=base_all, fsdp_gathered=gathered, adapter=ad_dev,
              adapter_total=ad_all, adapter_params=ad_all // 4, cfg=cfg)


# --------------------------------------------------------------------------- the model

def _dims(cfg: LlamaConfig):
  e, f, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
  hd = cfg.head_size
  ekv = cfg.num_key_value_heads * hd
  eq = cfg.num_attention_heads * hd
  return e, f, v, L, hd, ekv, eq


def predict(w: Workload, hw: Hardware, efficiency: float | None = None) -> dict:
  """Memory per device (bytes) and step time (s) of ``w`` on ``hw``, with the parts."""
  sizes = w.sizes
  st, dp, fs, tp = sizes["stage"], sizes["data"], sizes["fsdp"], sizes["tensor"]
  mem = state_bytes(w)
  cfg = mem["cfg"]
  e, f, v, L, hd, ekv, eq = _dims(cfg)
  M = w.microbatches if st > 1 else 1
  seqs_rep = w.batch / (dp * fs)                  # sequences per model replica
  tok_rep = seqs_rep * w.seq
  tok_mb = tok_rep / M
  tok_head = tok_rep / st                          # head and loss: data-parallel over stages
  layers = L / st
  gpipe = st > 1 and w.schedule == "gpipe"
  onefb = st > 1 and w.schedule == "1f1b"
  ticks = (M + st - 1) if gpipe else (M + 2 * st - 2) if onefb else 1
  stretch = (M + st - 1) / M                       # the bubble

  # ---- FLOPs per device
  n_layer = e * eq + e * 2 * ekv + eq * e + 3 * e * f          # matmul weights of one layer
  attn_fwd = 2 * 2 * w.seq * eq / 2                            # causal q·k and p·v per token
  lora = 2 * w.rank * sum((e + eq, e + ekv, e + ekv, eq + e, e + f, e + f, f + e))
  fwd = 2 * n_layer + attn_fwd + lora
  bwd = 2 * n_layer + 2 * attn_fwd + 2 * lora                  # no base-weight gradient
  per_tok_layer = fwd + bwd + (fwd if w.remat == "full" else 0) + (fwd if onefb else 0)
  layer_flops = tok_rep * layers * per_tok_layer / tp
  head_flops = tok_head * 4 * e * v / tp
  t_matmul = (layer_flops * (stretch if st > 1 else 1) + head_flops) / hw.flops

  # ---- HBM traffic per device
  # elementwise passes per token and layer (norms, residuals, RoPE, SwiGLU, the LoRA
  # side terms' adds), forward + backward ~ 3x forward: elements, bf16
  # (norms, residual adds and the LoRA adds on o_proj/down_proj are on the whole [tokens, E]
  # on every tensor device; RoPE, SwiGLU and the other LoRA adds on split dims)
  elem = 3 * 2 * (16 * e + (5 * eq + 8 * ekv + 9 * f) / tp)
  t_elem = tok_rep * layers * elem * (stretch if st > 1 else 1) / hw.hbm
  passes = 2 + (w.remat == "full") + onefb
  weights = mem["base"] * passes
  if w.method == "qlora":   # read codes, write and read bf16 for every use
    weights += 2 * (2 * mem["base"] / 0.52) * passes
  t_weights = weights / hw.hbm * (ticks if st > 1 else 1)      # a stage reads them every tick

  # ---- collectives: (bytes per device, count, the mesh axes they run over)
  comms = {}
  def ring(n, kind):
    return 0 if n <= 1 else (2 * (n - 1) / n if kind == "ar" else (n - 1) / n)
  ad_dev = mem["adapter"]
  comms["data: adapter gradient all-reduce"] = (
      ring(dp * fs, "ar") * ad_dev, 14, ("data", "fsdp"))
  comms["fsdp: weight all-gathers"] = (
      mem["fsdp_gathered"] * passes * (ticks if st > 1 else 1),
      9 * layers * passes * (ticks if st > 1 else 1), ("fsdp",))
  act = tok_rep * e * 2                                          # one activation [tokens, E]
  comms["tensor: activation all-reduces"] = (
      ring(tp, "ar") * act * (layers * (4 + 2 * (w.remat == "full") + 2 * onefb) + 2)
      * (stretch if st > 1 else 1), int(4 * layers * ticks) + 2, ("tensor",))
  if st > 1:
    mb_act = tok_mb * e * 2
    comms["stage: activations to the next stage"] = (
        2 * ticks * mb_act, 2 * ticks, ("stage",))
    # in: an all-gather of the stack's input; out: gpipe's reduce-scatter of the output and
    # its gradient's all-gather, 1f1b's all-reduce of the input gradient
    comms["stage: batch in and out"] = (3 * ring(st, "ag") * act, 3, ("stage",))
  t_comm, volume = 0.0, 0.0
  detail = {}
  for name, (nbytes, count, axes) in comms.items():
    if nbytes <= 0:
      continue
    bw = _axis_bandwidth(sizes, axes, hw)
    t = nbytes / bw + count * hw.latency
    t_comm += t
    volume += nbytes
    detail[name] = dict(gb=round(nbytes / GB, 3), ms=round(1e3 * t, 2))

  compute = t_matmul + t_elem + t_weights
  eff = EFFICIENCY[hw.name] if efficiency is None else efficiency
  step = compute / eff + t_comm

  # ---- memory per device
  act_elems = 5 * e + (3 * e + 2 * ekv + 4 * f) / tp            # saved per token and layer
  act_b = act_elems * 2
  unit = tok_mb if st > 1 else tok_rep            # tokens one layer call processes

  def keep(tokens):     # residuals of ``tokens`` through the stage's layers
    if w.remat == "full":   # each layer's input, and one layer's residuals while it recomputes
      return tokens * layers * 2 * e + unit * act_b
    return tokens * layers * act_b
  if gpipe:             # every tick's residuals (bubble ticks too), the batch in and out
    saved = keep(tok_mb * ticks) + 2 * act
  elif onefb:           # the stage inputs in flight, one microbatch's residuals
    saved = min(M, 2 * st - 1) * tok_mb * 2 * e + keep(tok_mb) + 2 * act
  else:
    saved = keep(tok_rep)
  head_tok = tok_mb if onefb else tok_head
  logits = head_tok * v / tp * (2 + 4 + 4)                      # bf16 logits, f32 copy and grad
  layer_w = mem["base_total"] / L / (tp * (1 if w.method == "qlora" else fs))
  transient = (2 * layer_w / 0.52 if w.method == "qlora" else 0) + (layer_w * 2 if fs > 1 else 0)
  trained = mem["adapter"] * 4                                   # adapter, gradient, Adam mu, nu
  peak = mem["base"] + trained + saved + logits + transient
  return dict(
      step_s=step, tokens_per_s=w.batch * w.seq / step, compute_s=compute / eff,
      matmul_s=t_matmul / eff, elementwise_s=t_elem / eff, weights_s=t_weights / eff,
      comm_s=t_comm, comm_gb=volume / GB, comms=detail, efficiency=eff,
      bubble=(st - 1) / (M + st - 1) if st > 1 else 0.0,
      mem_gib=dict(base=mem["base"] / GIB, trained=trained / GIB, activations=saved / GIB,
                   logits=logits / GIB, transient=transient / GIB),
      peak_gib=peak / GIB, fits=peak < 0.9 * hw.memory,
      adapter_params=mem["adapter_params"])


def _axis_bandwidth(sizes: dict, axes, hw: Hardware) -> float:
  """The links a collective over ``axes`` uses: inside a host when the devices of every
  such group are within ``per_host`` consecutive devices (``make_mesh`` puts later axes
  innermost)."""
  inner = 1
  span = 1
  for name in reversed(AXES):
    inner *= sizes[name]
    if name in axes and sizes[name] > 1:
      span = inner
  return hw.link if span <= hw.per_host else hw.net


def _fit_efficiency(hw_name: str, measured: float, w: Workload) -> float:
  parts = predict(w, HARDWARE[hw_name], efficiency=1.0)
  return parts["compute_s"] / (measured - parts["comm_s"])


# The one measurement the compute terms are scaled by: RESULTS.md §2, jlora LoRA,
# Llama-3-8B shape, bf16, scanned layers, batch 2 x 1024, one H100: 0.168 s a step.
EFFICIENCY = {}
REFERENCE = (Workload(model="llama-3-8b", method="lora", batch=2, seq=1024), 0.168)


def _init_efficiency():
  w, measured = REFERENCE
  eff = _fit_efficiency("h100", measured, w)
  EFFICIENCY.update({hw.name: eff for hw in HARDWARE.values()})


# --------------------------------------------------------------------------- planning

def meshes(chips: int, cfg: LlamaConfig, hw: Hardware, batch: int):
  """Candidate (stage, data, fsdp, tensor) meshes of ``chips`` devices."""
  for tensor in (1, 2, 4, 8):
    if chips % tensor or cfg.num_key_value_heads % tensor or tensor > min(8, hw.per_host):
      continue
    rest = chips // tensor
    for stage in _divisors(rest):
      if cfg.num_hidden_layers % stage or stage > 16:
        continue
      for fsdp in _divisors(rest // stage):
        data = rest // stage // fsdp
        if batch % (data * fsdp):
          continue
        yield (stage, data, fsdp, tensor)


def _divisors(n: int):
  return [d for d in range(1, n + 1) if n % d == 0]


def best_mesh(model: str, method: str, chips: int, hw: Hardware, seq: int = 4096,
              per_chip: int = 2, remat: str | None = None):
  """The fastest mesh that fits (90% of HBM), with its prediction."""
  cfg = model_config(model)
  batch = per_chip * chips
  best = None
  for mesh in meshes(chips, cfg, hw, batch):
    st, dp, fs, _ = mesh
    reps = batch // (dp * fs)
    options = [(1, "gpipe")] if st == 1 else [
        (m, s) for s in ("gpipe", "1f1b") for m in sorted({reps, 2 * st, 4 * st})
        if m <= reps and reps % m == 0 and m >= st]
    for m, sched in options:
      for rm in ((remat,) if remat else (None, "full")):
        w = Workload(model=model, method=method, batch=batch, seq=seq, remat=rm, mesh=mesh,
                     microbatches=m, schedule=sched)
        p = predict(w, hw)
        if p["fits"] and (best is None or p["step_s"] < best[1]["step_s"]):
          best = (w, p)
  return best


def plan(hardware=("h100", "v5p"), chips=(8, 64, 256)) -> list[dict]:
  rows = []
  for hw_name in hardware:
    hw = HARDWARE[hw_name]
    for model in ("llama-3-8b", "llama-3-70b", "llama-3.1-405b"):
      for method in ("lora", "qlora"):
        for n in chips:
          got = best_mesh(model, method, n, hw)
          if got is None:
            rows.append(dict(hardware=hw.name, model=model, method=method, chips=n, mesh=None))
            continue
          w, p = got
          rows.append(dict(
              hardware=hw.name, model=model, method=method, chips=n,
              mesh="x".join(map(str, w.mesh)), microbatches=w.microbatches if w.mesh[0] > 1
              else None, schedule=w.schedule if w.mesh[0] > 1 else None, remat=w.remat,
              batch=w.batch, peak_gib=round(p["peak_gib"], 1),
              base_gib=round(p["mem_gib"]["base"], 1), comm_gb=round(p["comm_gb"], 2),
              step_s=round(p["step_s"], 3),
              tokens_per_s_per_chip=round(p["tokens_per_s"] / n)))
  return rows


def _cell(r):
  if r["mesh"] is None:
    return "does not fit", "", "", ""
  sched = f", {r['schedule']} M={r['microbatches']}" if r["schedule"] else ""
  remat = ", remat" if r["remat"] else ""
  return (f"{r['mesh']}{sched}{remat}", f"{r['peak_gib']} ({r['base_gib']})", f"{r['comm_gb']}",
          f"{r['step_s']} / {r['tokens_per_s_per_chip']:,}")


def markdown(rows) -> str:
  """One row per model, method and chip count; a column group per hardware."""
  hws = list(dict.fromkeys(r["hardware"] for r in rows))
  key = lambda r: (r["model"], r["method"], r["chips"])  # noqa: E731
  by = {(r["hardware"],) + key(r): r for r in rows}
  head = "| model | method | chips | " + " | ".join(
      f"{h}: mesh S×D×F×T | {h}: GiB/device (base) | {h}: collective GB/step | "
      f"{h}: step s / tokens/s/chip" for h in hws) + " |"
  out = [head, "|" + " --- |" * (3 + 4 * len(hws))]
  for k in dict.fromkeys(key(r) for r in rows):
    cells = [c for h in hws for c in _cell(by[(h,) + k])]
    out.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def _markdown(rows):
  head = ("| hardware | model | method | chips | mesh S×D×F×T | schedule | remat | "
          "GiB/device (base) | collective GB/step/device | step s | tokens/s/chip |")
  out = [head, "|" + " --- |" * 11]
  for r in rows:
    if r["mesh"] is None:
      out.append(f"| {r['hardware']} | {r['model']} | {r['method']} | {r['chips']} | "
                 "does not fit | | | | | | |")
      continue
    sched = f"{r['schedule']} M={r['microbatches']}" if r["schedule"] else "–"
    out.append(f"| {r['hardware']} | {r['model']} | {r['method']} | {r['chips']} | {r['mesh']} | "
               f"{sched} | {r['remat'] or '–'} | {r['peak_gib']} ({r['base_gib']}) | "
               f"{r['comm_gb']} | {r['step_s']} | {r['tokens_per_s_per_chip']:,} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("predict")
  p.add_argument("--preset", default="llama-3-8b")
  p.add_argument("--method", default="lora", choices=["lora", "qlora"])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--remat", default=None)
  p.add_argument("--mesh", default="1,1,1", help="DATA,FSDP,TENSOR")
  p.add_argument("--pipeline", default=None, help="STAGES,MICROBATCHES[,SCHEDULE]")
  p.add_argument("--hardware", default="h200", choices=sorted(HARDWARE))
  for rate in ("flops", "hbm", "link", "net"):
    p.add_argument(f"--{rate}", type=float, default=None)
  p.add_argument("--calibrate", type=float, default=None,
                 help="measured one-device step time (s) of the same model, method, seq, "
                      "remat and per-device batch: fits the compute efficiency")
  q = sub.add_parser("plan")
  q.add_argument("--hardware", default="h100,v5p")
  q.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  if args.cmd == "plan":
    rows = plan(tuple(args.hardware.split(",")))
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    return rows
  hw = HARDWARE[args.hardware]
  hw = dataclasses.replace(hw, **{k: getattr(args, k) for k in ("flops", "hbm", "link", "net")
                                  if getattr(args, k) is not None})
  w = workload_from_args(args)
  eff = None
  if args.calibrate:
    one = dataclasses.replace(w, mesh=(1, 1, 1, 1), microbatches=1,
                              batch=args.batch // math.prod(w.mesh))
    base = predict(one, hw, efficiency=1.0)
    eff = base["compute_s"] / args.calibrate
  out = predict(w, hw, efficiency=eff)
  print(json.dumps(out, default=float))
  return out


def workload_from_args(args) -> Workload:
  data, fsdp, tensor = map(int, args.mesh.split(","))
  stage, micro, sched = 1, 1, "gpipe"
  if args.pipeline:
    parts = args.pipeline.split(",")
    stage, micro = int(parts[0]), int(parts[1])
    sched = parts[2] if len(parts) > 2 else "gpipe"
  return Workload(model=args.preset, method=args.method, batch=args.batch, seq=args.seq,
                  remat=args.remat, mesh=(stage, data, fsdp, tensor), microbatches=micro,
                  schedule=sched)


_init_efficiency()

if __name__ == "__main__":
  main()
