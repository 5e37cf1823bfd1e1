"""Bit-compatibility with bitsandbytes (its CPU backend) and transformers' 4-bit files.

Exact (bit-for-bit) checks: the code books and dynamic map; NF4/FP4 packed
codes and absmax for float32, bfloat16 and float16 weights, full and partial
blocks; double-quantization codes and nested absmax given the same offset;
dequantized values (compared as values: bitsandbytes' C++ kernel writes FP4's
code 8 as -0.0, its table as +0.0). The one documented difference: the
offset ``mean(absmax)``, which torch sums in another (machine-dependent)
order — within 4 float32 ulps.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
import transformers as tf

from jlora.quant import QArray, blockwise as B, bnb_format as BF, codebooks as C
from jlora.quant import quantize_array

TORCH = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}


@pytest.fixture(autouse=True, scope="module")
def no_torch_compile():
  """bitsandbytes wraps its fallback kernels in torch.compile: seconds per shape, same numbers."""
  old = torch._dynamo.config.disable
  torch._dynamo.config.disable = True
  yield
  torch._dynamo.config.disable = old


def bits32(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def ulps(a, b) -> int:
  return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def as_np(t):
  return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def state_dict(packed, st, name="w"):
  return {name: packed.numpy(), **{f"{name}.{k}": as_np(v) if isinstance(v, torch.Tensor) else v
                                   for k, v in st.as_dict(packed=True).items()}}


def test_code_books_and_dynamic_map_are_bitsandbytes():
  from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
  for scheme in ("nf4", "fp4"):
    np.testing.assert_array_equal(bits32(C.TABLES[scheme]),
                                  bits32(F.get_4bit_type(scheme, device="cpu").numpy()))
    bounds, order = _get_4bit_quantize_bounds(scheme, torch.device("cpu"))
    np.testing.assert_array_equal(bits32(C.midpoints(scheme)), bits32(bounds.numpy()))
    np.testing.assert_array_equal(C.sorted_order(scheme), order.numpy())
  np.testing.assert_array_equal(bits32(C.dynamic_map()), bits32(F.create_dynamic_map().numpy()))
  assert C.NF4[7] == 0 and np.all(np.diff(C.NF4) > 0)


def test_dynamic_lookup_grid_matches_bitsandbytes_at_every_switch(rng):
  """Values on both sides of every grid cell where the dynamic code changes
  (and 1500 random cells), in blocks of 256 scaled by random absmax, through
  the jitted double quantizer: codes and absmax equal bitsandbytes'."""
  lut = C.dynamic_lut()
  cells = np.concatenate([np.nonzero(np.diff(lut.astype(int)))[0] + 1,
                          rng.integers(1, 65536, 1500)])
  t = ((cells - 0.5) / 65535 * 2 - 1).astype(np.float32)
  v = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2))])
  v = v[np.abs(v) <= 1]
  nb = -(-v.size // 255)
  am = rng.uniform(0.01, 100, nb).astype(np.float32)
  vp = np.zeros((nb, 255), np.float32)
  vp.reshape(-1)[:v.size] = v
  x = np.concatenate([(vp * am[:, None]).astype(np.float32), am[:, None]], 1).reshape(-1)
  q, st = F.quantize_blockwise(torch.from_numpy(x), blocksize=256)
  codes, a2, _ = jax.jit(B.double_quantize)(jnp.asarray(x), jnp.float32(0))
  np.testing.assert_array_equal(np.asarray(codes), q.numpy())
  np.testing.assert_array_equal(bits32(a2), bits32(st.absmax.numpy()))


CASES = [((96, 200), jnp.float32, "nf4", 64),      # out, in: n a multiple of the block
         ((33, 71), jnp.bfloat16, "fp4", 32),      # n = 2343: odd, partial last block
         ((130, 48), jnp.float16, "nf4", 128),
         ((7, 9), jnp.float32, "fp4", 64)]         # smaller than one block


@pytest.mark.parametrize("shape,dtype,scheme,block", CASES)
def test_codes_statistics_and_values_equal_bitsandbytes(rng, shape, dtype, scheme, block):
  w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.01, 5), dtype)     # [out, in]
  w = w.at[: shape[0] // 3].set(0)                                               # zero blocks too
  wt = torch.from_numpy(np.array(w.astype(jnp.float32))).to(TORCH[dtype])
  n = w.size
  packed, st = F.quantize_4bit(wt, blocksize=block, compress_statistics=False, quant_type=scheme)
  q = quantize_array(w.T, scheme, block, double_quant=False)                    # kernel [in, out]
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1)[:(n + 1) // 2],
                                packed.numpy().reshape(-1))
  np.testing.assert_array_equal(bits32(q.scales), bits32(st.absmax.numpy()))
  np.testing.assert_array_equal(as_np(F.dequantize_4bit(packed, st)),
                                np.asarray(q.dequantize().T.astype(jnp.float32)))

  packed2, st2 = F.quantize_4bit(wt, blocksize=block, compress_statistics=True, quant_type=scheme)
  q2 = quantize_array(w.T, scheme, block, double_quant=True)
  np.testing.assert_array_equal(packed2.numpy(), packed.numpy())
  assert ulps(q2.offset, st2.offset.item()) <= 4
  # with bitsandbytes' offset, the double-quantization statistics are its own, bit for bit
  codes, nested, _ = jax.jit(B.double_quantize)(q.scales, jnp.float32(st2.offset.item()))
  np.testing.assert_array_equal(np.asarray(codes), st2.absmax.numpy())
  np.testing.assert_array_equal(bits32(nested), bits32(st2.state2.absmax.numpy()))
  # bitsandbytes' state read into a QArray dequantizes to bitsandbytes' values, with and without jit
  qb = BF.from_bnb(state_dict(packed2, st2), "w")
  want = as_np(F.dequantize_4bit(packed2, st2))
  np.testing.assert_array_equal(np.asarray(qb.dequantize().T.astype(jnp.float32)), want)


def test_partial_block_is_divided_as_bitsandbytes_does(rng):
  """bitsandbytes multiplies full blocks by 1/absmax but divides the last,
  partial one. Values where the two roundings fall on different sides of an
  NF4 boundary, put in the partial block of 32 stacked slices (each slice a
  separate bitsandbytes tensor [1, 127]), get bitsandbytes' codes."""
  mids = C.midpoints("nf4")
  slices, flips = [], 0
  for _ in range(32):
    am = np.float32(rng.uniform(0.5, 4))
    x = rng.uniform(-am, am, 127).astype(np.float32)
    x[64] = am                                        # the partial block's absmax
    cand = [y for m in mids for y in np.float32(m * am) + np.float32(m * am) * np.float32(2.0 ** -23)
            * np.arange(-3, 4, dtype=np.float32)
            if np.searchsorted(mids, np.float32(y * (np.float32(1) / am))) !=
            np.searchsorted(mids, np.float32(y / am))][:62]
    x[65:65 + len(cand)] = cand
    flips += len(cand)
    slices.append(x)
  assert flips > 50
  w = np.stack(slices)[:, None, :]                     # [32, out=1, in=127]
  q = quantize_array(np.swapaxes(w, -1, -2), "nf4", 64, False)
  for i, x in enumerate(slices):
    packed, st = F.quantize_4bit(torch.from_numpy(x[None]), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q.codes[i]).reshape(-1)[:64], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bits32(q.scales[i]), bits32(st.absmax.numpy()))


def test_quantize_under_jit_gives_the_same_codes(rng):
  w = jnp.asarray(rng.standard_normal((40, 70)), jnp.bfloat16)
  eager = quantize_array(w, "nf4")
  jitted = jax.jit(lambda w: quantize_array(w, "nf4"))(w)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)


def test_all_zero_and_constant_tensors_match_bitsandbytes():
  """(An all-zero *partial* block's absmax is stored as 1e-38, a subnormal; XLA
  flushes subnormals, so its double-quantization statistics are the one place
  jlora and bitsandbytes differ; the values are 0 either way.)"""
  w = np.zeros((10, 13), np.float32)
  packed, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True,
                               quant_type="nf4")
  q = quantize_array(w.T, "nf4", 64, True)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1)[:packed.numel()],
                                packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, as_np(F.dequantize_4bit(packed, st)))
  for w in (np.zeros((10, 13), np.float32), np.zeros((8, 64), np.float32),
            np.full((64, 64), -0.5, np.float32)):
    for dq in (False, True) if w.size % 64 == 0 else (False,):
      packed, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=dq,
                                   quant_type="nf4")
      q = quantize_array(w.T, "nf4", 64, dq)
      np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1)[:packed.numel()],
                                    packed.numpy().reshape(-1))
      if dq:      # all absmax equal the offset: nested absmax 0, codes 0
        np.testing.assert_array_equal(np.asarray(q.scales), st.absmax.numpy())
        np.testing.assert_array_equal(bits32(q.nested_scales), bits32(st.state2.absmax.numpy()))
      else:
        np.testing.assert_array_equal(bits32(q.scales), bits32(st.absmax.numpy()))
      np.testing.assert_array_equal(np.asarray(q.dequantize()).T, as_np(F.dequantize_4bit(packed, st)))


def test_linear4bit_state_dict_round_trip(rng):
  """bitsandbytes' Linear4bit state dict -> QArray -> the same tensors, byte for byte;
  jlora's own export is read by Params4bit.from_prequantized to jlora's values."""
  w = torch.from_numpy(rng.standard_normal((48, 100)).astype(np.float32)).to(torch.bfloat16)
  for scheme, dq in (("nf4", True), ("fp4", False)):
    lin = bnb.nn.Linear4bit(100, 48, bias=False, compress_statistics=dq, quant_type=scheme)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq,
                                   quant_type=scheme)
    sd = {k: as_np(v) for k, v in lin.to("cpu").state_dict().items()}
    q = BF.from_bnb(sd, "weight")
    assert q.shape == (100, 48) and q.dtype == jnp.bfloat16 and q.double_quant == dq
    out = BF.to_bnb(q, "weight")
    assert set(out) == set(sd)
    for k in sd:
      np.testing.assert_array_equal(out[k].view(np.uint8), np.asarray(sd[k]).view(np.uint8), k)
    mine = quantize_array(jnp.asarray(as_np(w).T, jnp.bfloat16), scheme, 64, dq)
    t = {k: torch.from_numpy(np.array(v)) for k, v in BF.to_bnb(mine, "weight").items()}
    p = bnb.nn.Params4bit.from_prequantized(data=t.pop("weight"), quantized_stats=t,
                                            requires_grad=False, device="cpu")
    np.testing.assert_array_equal(as_np(F.dequantize_4bit(p.data, p.quant_state)),
                                  np.asarray(mine.dequantize().T.astype(jnp.float32)))


def test_export_errors():
  q = quantize_array(jnp.ones((2, 64, 32)), "nf4")
  with pytest.raises(ValueError, match="one 2-D weight"):
    BF.to_bnb(q)
  with pytest.raises(ValueError, match="int8"):
    BF.to_bnb(quantize_array(jnp.ones((64, 32)), "int8"))
  with pytest.raises(ValueError, match="block sizes"):
    BF.to_bnb(quantize_array(jnp.ones((64, 32)), "nf4", 48))
  good = BF.to_bnb(quantize_array(jnp.ones((64, 32)), "nf4"), "w")
  bad = dict(good, **{"w.quant_map": C.FP4})
  with pytest.raises(ValueError, match="quant_map"):
    BF.from_bnb(bad, "w")


def test_transformers_checkpoint_both_ways(tmp_path):
  """A tiny Llama quantized by transformers (BitsAndBytesConfig, CPU) and saved:
  jlora reads every 4-bit weight to the values bitsandbytes reads from the
  same file, quantizes the original bf16 weights to the same packed codes,
  and writes a file transformers loads back to jlora's values."""
  cfg = tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
  torch.manual_seed(0)
  plain, saved = tmp_path / "plain", tmp_path / "bnb"
  tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(plain)
  qcfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
  model = tf.LlamaForCausalLM.from_pretrained(plain, quantization_config=qcfg, device_map="cpu",
                                              dtype=torch.bfloat16)
  model.save_pretrained(saved)
  read = BF.load_safetensors(saved / "model.safetensors")
  originals = BF.load_safetensors(plain / "model.safetensors")
  quantized = {k: v for k, v in read.items() if isinstance(v, QArray)}
  assert len(quantized) == 7                       # q, k, v, o, gate, up, down
  from safetensors.numpy import load_file
  raw = load_file(str(saved / "model.safetensors"))
  mine = {}
  for name, q in quantized.items():
    tensors = {k[len(name) + 1:]: torch.from_numpy(np.array(v)) for k, v in raw.items()
               if k.startswith(name + ".")}
    st = F.QuantState.from_dict(tensors, device="cpu")
    want = as_np(F.dequantize_4bit(torch.from_numpy(raw[name]), st))
    np.testing.assert_array_equal(np.asarray(q.dequantize().T.astype(jnp.float32)), want)
    mine[name] = quantize_array(jnp.asarray(originals[name]).T, "nf4", 64, True)
    np.testing.assert_array_equal(np.asarray(mine[name].codes), np.asarray(q.codes))
  # jlora writes the model; transformers loads it and holds jlora's values
  ours = tmp_path / "ours"
  ours.mkdir()
  shutil.copy(saved / "config.json", ours / "config.json")
  BF.save_safetensors(ours / "model.safetensors", {**read, **mine})
  back = tf.LlamaForCausalLM.from_pretrained(ours, device_map="cpu", dtype=torch.bfloat16)
  for name, q in mine.items():        # (before any forward, which may repack them for the CPU)
    wt = back.get_submodule(name.rpartition(".")[0]).weight
    np.testing.assert_array_equal(as_np(F.dequantize_4bit(wt.data, wt.quant_state)),
                                  np.asarray(q.dequantize().T.astype(jnp.float32)))
  ids = torch.tensor([[1, 5, 9, 3]])
  with torch.no_grad():
    rel = (back(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
  assert float(rel) < 0.05                        # same codes; offsets may differ by an ulp
  assert json.loads((ours / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
  assert os.path.getsize(ours / "model.safetensors") < os.path.getsize(plain / "model.safetensors")
