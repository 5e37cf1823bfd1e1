"""NF4 (+ double quant) dequantization to bf16 on its own: time and bandwidth.

  python3 benchmarks/dequant.py            # jlora's kernel, with the unpack-then-interleave
                                           # formulation it replaced, for comparison

Bytes moved per value: 0.5 (codes) + 2 (bf16 out) + scales; the floor is that
over the device's copy bandwidth. Prints one RESULT line per shape and variant.
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jlora import nbytes
from jlora.quant import blockwise as B
from jlora.quant import codebooks as C
from jlora.quant import quantize_array


def unpack_then_lookup(codes, scheme):
  return B.lookup(C.TABLES[scheme], B.unpack(codes).astype(jnp.int32))


def timed(f, q, n=20):
  f(q).block_until_ready()
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    f(q).block_until_ready()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main():
  for shape in [(2048, 5632), (4096, 14336), (8192, 28672)]:
    q = quantize_array(jax.random.normal(jax.random.key(0), shape, jnp.bfloat16), "nf4")
    moved = nbytes(q) + 2 * shape[0] * shape[1]
    for name in ("pair_table", "unpack_interleave"):
      saved = B.code_values
      if name == "unpack_interleave":
        B.code_values = unpack_then_lookup
      f = jax.jit(lambda q: q.dequantize(jnp.bfloat16))
      f(q)  # traced here, with this variant's code_values
      B.code_values = saved
      dt = timed(f, q)
      print("RESULT", json.dumps(dict(shape=shape, variant=name, ms=round(dt * 1e3, 3),
                                      gb_per_s=round(moved / dt / 1e9, 1),
                                      device=jax.devices()[0].device_kind)), flush=True)


if __name__ == "__main__":
  main()
