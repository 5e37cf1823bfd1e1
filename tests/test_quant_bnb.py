"""Bit-compatibility with bitsandbytes (its CPU backend) and transformers' 4-bit files.

Exact (bit-for-bit) checks: the code books and dynamic map; NF4/FP4 packed
codes and absmax for float32, bfloat16 and float16 weights, full and partial
blocks; double-quantization codes and nested absmax given the same offset;
dequantized values (compared as values: bitsandbytes' C++ kernel writes FP4's
code 8 as -0.0, its table as +0.0). The one documented difference: the
offset ``mean(absmax)``, which torch sums in another (machine-dependent)
order — within 4 float32 ulps.

The oracle is bitsandbytes checked against its own documented math.
:func:`bnb_dequantize` recomputes every value bitsandbytes' ``dequantize_4bit``
returns from the codes and statistics bitsandbytes itself stored, in float64
NumPy (code book × absmax of the flat block; double quantization: dynamic
code × nested absmax + offset). On CPUs where bitsandbytes' native kernel
takes its AVX-512 path (bitsandbytes 0.50, ``csrc/cpu_ops.cpp``: rows of
``[out, in]`` with ``in % 16 == 0``), that path restarts the blocks at every
row, which is only right when ``in`` is a multiple of the block size; it
returns wrong values otherwise. There, and only there (the condition is
checked, and the wrong values must equal that row-restarting model exactly),
jlora is compared with the documented math instead of bitsandbytes' output.
"""
import dataclasses
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

import jlora
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


def documented_dequantize(packed: torch.Tensor, st, rows_restart: bool = False) -> np.ndarray:
  """bitsandbytes' 4-bit dequantization by its documented math, in float64
  NumPy, from the codes and statistics it stored: ``table[code] · absmax`` of
  the block of the row-major ``[out, in]`` flattening (first value in the
  high nibble), in float32 then cast to the state's dtype. With
  ``rows_restart`` the blocks restart at every row (what the AVX-512 kernel
  does), which equals the documented math when ``in % blocksize == 0``."""
  shape, block, n = tuple(st.shape), st.blocksize, int(np.prod(st.shape))
  codes = packed.numpy().reshape(-1)
  idx = np.stack([codes >> 4, codes & 15], 1).reshape(-1)[:n]
  table = np.asarray(as_np(st.code), np.float64)
  if st.nested:      # absmax = dynamic code × nested absmax (blocks of 256) + offset, float32
    s2 = st.state2
    nested = np.asarray(as_np(s2.absmax), np.float64)
    k = np.arange(st.absmax.numel())
    # (a product of two float32 is exact in float64, so rounding it once is
    # float32 multiplication; the offset is added in float32, as bitsandbytes)
    absmax = (np.asarray(as_np(s2.code), np.float64)[st.absmax.numpy().astype(int)]
              * nested[k // s2.blocksize]).astype(np.float32)
    absmax = absmax + np.float32(st.offset.item())
  else:
    absmax = st.absmax.numpy().astype(np.float32)
  flat = np.arange(n)
  if rows_restart:
    cols = shape[-1]
    flat = (flat // cols) * (cols // block) * block + flat % cols
  vals = (table[idx] * absmax.astype(np.float64)[flat // block]).astype(np.float32)
  return as_np(torch.from_numpy(vals.reshape(shape)).to(st.dtype))


def avx512_rows_condition(st) -> bool:
  """Where bitsandbytes' AVX-512 dequantization path runs and restarts blocks per row."""
  cols = st.shape[-1]
  return cols % 16 == 0 and st.blocksize >= 16 and cols % st.blocksize != 0


def bnb_dequantize(packed: torch.Tensor, st) -> tuple[np.ndarray, bool]:
  """``(values, trusted)``: the documented values of bitsandbytes' 4-bit state,
  and whether ``F.dequantize_4bit`` on this machine returned exactly them.

  Where it does not, the deviation must be the one known kernel fault (see
  the module docstring): the condition holds and bitsandbytes' values equal
  the row-restarting model bit for bit; anything else fails the test."""
  got = as_np(F.dequantize_4bit(packed, st))
  want = documented_dequantize(packed, st)
  if np.array_equal(got, want):
    return want, True
  assert avx512_rows_condition(st), (
      f"bitsandbytes' dequantize_4bit differs from its documented math outside the known "
      f"AVX-512 fault (shape {list(st.shape)}, blocksize {st.blocksize})")
  np.testing.assert_array_equal(got, documented_dequantize(packed, st, rows_restart=True),
                                "bitsandbytes' deviation is not the known per-row fault")
  return want, False


def assert_dequantizes_like_bnb(q_values, packed: torch.Tensor, st) -> None:
  """jlora's dequantized ``[out, in]`` values equal bitsandbytes' (its documented
  math; and its own kernel's output wherever that agrees with the math)."""
  want, _ = bnb_dequantize(packed, st)
  np.testing.assert_array_equal(np.asarray(q_values, np.float32), want)


def assert_quantizes_like_bnb(q, packed: torch.Tensor, st) -> None:
  """A single-quantized ``QArray`` of the kernel ``[in, out]`` holds bitsandbytes'
  packed codes and absmax for the weight ``[out, in]``, and its values."""
  n = int(np.prod(st.shape))
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1)[:(n + 1) // 2],
                                packed.numpy().reshape(-1))
  np.testing.assert_array_equal(bits32(q.scales), bits32(st.absmax.numpy()))
  assert_dequantizes_like_bnb(q.dequantize().T.astype(jnp.float32), packed, st)


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
         ((130, 48), jnp.float16, "nf4", 128),     # blocks span rows (in < block)
         ((64, 96), jnp.float32, "nf4", 64),       # in % 16 == 0, in % block != 0
         ((7, 9), jnp.float32, "fp4", 64)]         # smaller than one block


@pytest.mark.parametrize("shape,dtype,scheme,block", CASES)
def test_codes_statistics_and_values_equal_bitsandbytes(rng, shape, dtype, scheme, block):
  w = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.01, 5), dtype)     # [out, in]
  w = w.at[: shape[0] // 3].set(0)                                               # zero blocks too
  wt = torch.from_numpy(np.array(w.astype(jnp.float32))).to(TORCH[dtype])
  packed, st = F.quantize_4bit(wt, blocksize=block, compress_statistics=False, quant_type=scheme)
  q = quantize_array(w.T, scheme, block, double_quant=False)                    # kernel [in, out]
  assert_quantizes_like_bnb(q, packed, st)

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
  assert_dequantizes_like_bnb(qb.dequantize().T.astype(jnp.float32), packed2, st2)
  assert_dequantizes_like_bnb(jax.jit(lambda q: q.dequantize())(qb).T.astype(jnp.float32),
                              packed2, st2)


def test_bitsandbytes_follows_its_own_math_except_the_known_fault(rng):
  """The oracle's premise, over shapes on both sides of the fault's condition:
  bitsandbytes' dequantize_4bit equals its documented math, except (on CPUs
  whose kernel takes the AVX-512 path) exactly where the condition holds,
  and there it equals the per-row model (bnb_dequantize checks both)."""
  seen = {True: 0, False: 0}
  for out_f, in_f, block in ((5, 48, 32), (9, 96, 64), (4, 80, 64), (6, 64, 64),
                             (3, 200, 64), (7, 50, 32), (2, 256, 128), (11, 16, 64)):
    for scheme, dq in (("nf4", False), ("fp4", True)):
      w = torch.from_numpy(rng.standard_normal((out_f, in_f)).astype(np.float32))
      packed, st = F.quantize_4bit(w, blocksize=block, compress_statistics=dq, quant_type=scheme)
      _, trusted = bnb_dequantize(packed, st)
      seen[avx512_rows_condition(st)] += 1
      if not avx512_rows_condition(st):
        assert trusted, (out_f, in_f, block, scheme)
  assert seen[True] and seen[False]


def test_the_oracle_catches_a_perturbed_code_scale_or_value(rng):
  """The comparisons fail when one of jlora's codes, scales or values changes,
  also where bitsandbytes' own kernel is not trusted (``in`` = 96, block 64)."""
  for shape in ((40, 64), (40, 96)):
    w = rng.standard_normal(shape).astype(np.float32)
    packed, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=False,
                                 quant_type="nf4")
    q = quantize_array(jnp.asarray(w.T), "nf4", 64, double_quant=False)
    assert_quantizes_like_bnb(q, packed, st)
    flipped = q.codes.reshape(-1).at[17].set(q.codes.reshape(-1)[17] ^ 0x10).reshape(q.codes.shape)
    scaled = q.scales.at[1].multiply(np.float32(1 + 2 ** -20))
    for bad in (dataclasses.replace(q, codes=flipped), dataclasses.replace(q, scales=scaled)):
      with pytest.raises(AssertionError):
        assert_quantizes_like_bnb(bad, packed, st)
    values = np.array(q.dequantize().T, np.float32)
    values[3, 5] = np.nextafter(values[3, 5], np.float32(np.inf))
    with pytest.raises(AssertionError):
      assert_dequantizes_like_bnb(values, packed, st)


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
  assert_dequantizes_like_bnb(np.asarray(q.dequantize()).T, packed, st)
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
      assert_dequantizes_like_bnb(np.asarray(q.dequantize()).T, packed, st)


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
    assert_dequantizes_like_bnb(mine.dequantize().T.astype(jnp.float32), p.data, p.quant_state)


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
    assert_dequantizes_like_bnb(q.dequantize().T.astype(jnp.float32),
                                torch.from_numpy(raw[name]), st)
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
    assert_dequantizes_like_bnb(q.dequantize().T.astype(jnp.float32), wt.data, wt.quant_state)
  ids = torch.tensor([[1, 5, 9, 3]])
  # bitsandbytes' AVX512-BF16 CPUs repack 4-bit weights for inference (eval mode,
  # no grad), which fails for in % blocksize != 0 (down_proj: [64, 96]); train
  # mode (no dropout in this config) takes the generic dequantize-and-matmul path.
  model.train(), back.train()
  with torch.no_grad():
    rel = (back(ids).logits - model(ids).logits).norm() / model(ids).logits.norm()
  assert float(rel) < 0.05                        # same codes; offsets may differ by an ulp
  assert json.loads((ours / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
  assert os.path.getsize(ours / "model.safetensors") < os.path.getsize(plain / "model.safetensors")


@pytest.mark.parametrize("in_f", [96, 160])
def test_loading_4bit_files_whose_rows_are_not_whole_blocks(rng, tmp_path, in_f):
  """A Linear4bit weight [64, in] with in % 64 != 0 (Flax kernel [in, 64]) saved to a
  safetensors file, with and without double quantization: jlora reads bitsandbytes'
  exact codes and statistics and gives its documented values (bitsandbytes' own
  AVX-512 CPU kernel is the one that restarts blocks per row here; see the module
  docstring), and the matmul of a train-mode Linear4bit agrees."""
  from safetensors.numpy import save_file
  w = torch.from_numpy(rng.standard_normal((64, in_f)).astype(np.float32))
  x = torch.from_numpy(rng.standard_normal((3, in_f)).astype(np.float32))
  for dq in (False, True):
    lin = bnb.nn.Linear4bit(in_f, 64, bias=False, compress_statistics=dq, quant_type="nf4",
                            compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq,
                                   quant_type="nf4")
    lin = lin.to("cpu")
    save_file({f"lin.{k}": np.ascontiguousarray(as_np(v)) for k, v in lin.state_dict().items()},
              str(tmp_path / "m.safetensors"))
    q = BF.load_safetensors(tmp_path / "m.safetensors")["lin.weight"]
    assert q.shape == (in_f, 64) and q.double_quant == dq
    packed, st = lin.weight.data, lin.weight.quant_state
    if not dq:
      assert_quantizes_like_bnb(quantize_array(jnp.asarray(w.numpy().T), "nf4", 64, False),
                                *F.quantize_4bit(w, blocksize=64, quant_type="nf4"))
    want = documented_dequantize(packed, st)
    np.testing.assert_array_equal(np.asarray(q.dequantize()).T, want)
    _, trusted = bnb_dequantize(packed, st)       # bitsandbytes: right, or the known fault
    assert trusted == (not avx512_rows_condition(st) or not _has_avx512())
    with torch.no_grad():
      y = lin.train()(x).numpy()                    # train mode: no CPU repacking
    if trusted:
      np.testing.assert_allclose(x.numpy() @ want.T, y, rtol=2e-5, atol=2e-5)


def _has_avx512() -> bool:
  try:
    return "avx512" in open("/proc/cpuinfo").read()
  except OSError:
    return False


@pytest.mark.parametrize("edit,message", [
    (lambda st, t: st.update(dtype="int8"), r"quant state dtype='int8' \(expected one of"),
    (lambda st, t: st.update(blocksize=0), r"blocksize=0 \(expected one of"),
    (lambda st, t: st.update(shape=[64, "96"]), r"shape=\[64, '96'\] \(expected \[out, in\]"),
    (lambda st, t: st.update(shape=[64, 97]), r"'w' is uint8\[3072, 1\], expected uint8 with 3104"),
    (lambda st, t: st.update(nested_offset=float("nan")), r"nested_offset=nan \(expected a finite"),
    (lambda st, t: st.pop("quant_type"), r"quant_type=None \(expected one of"),
    (lambda st, t: t.pop("w.absmax"), r"'w.absmax' is missing"),
    (lambda st, t: t.update({"w.absmax": t["w.absmax"][:-1]}), r"'w.absmax' is uint8\[95\]"),
    (lambda st, t: t.update({"w.nested_absmax": t["w.nested_absmax"].astype(np.float64)}),
     r"'w.nested_absmax' is float64"),
])
def test_hostile_quant_states_are_named(edit, message):
  good = BF.to_bnb(quantize_array(jnp.asarray(np.random.default_rng(0).standard_normal((96, 64)),
                                              jnp.float32), "nf4", 64, True), "w")
  key = "w.quant_state.bitsandbytes__nf4"
  st = json.loads(bytes(good[key]))
  tensors = dict(good)
  edit(st, tensors)
  tensors[key] = np.frombuffer(json.dumps(st).encode(), np.uint8)
  with pytest.raises(jlora.FormatError, match=message):
    BF.from_bnb(tensors, "w")
  tensors[key] = np.frombuffer(b"[" * 60_000, np.uint8)
  with pytest.raises(jlora.FormatError, match="quant state is not valid JSON"):
    BF.from_bnb(tensors, "w")
