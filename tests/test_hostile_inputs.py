"""Hostile and malformed inputs at every public boundary.

Each case ends in a correct result or a ``jlora.JloraError`` that names the
problem, within a time bound, with nothing half-written and no previous
checkpoint lost. Hypothesis draws configs, ``adapter_config.json`` and
``jlora.json`` edits, safetensors headers and bitsandbytes quant states.
"""
import collections
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jlora
from jlora import checkpoint, cli, safe_regex
from jlora.interop.peft import config as peft_config
from jlora.quant import bnb_format as BF, quantize_array

FAST = settings(max_examples=int(os.environ.get("JLORA_FUZZ_EXAMPLES", 30)), deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
SECONDS = 3.0    # every case, however hostile, is decided within this


@contextlib.contextmanager
def within(seconds=SECONDS):
  t0 = time.perf_counter()
  yield
  assert time.perf_counter() - t0 < seconds, f"took {time.perf_counter() - t0:.1f} s"


OUTCOMES = collections.Counter()   # (function, kind of outcome): for docs/reliability.md


def outcome(fn, *args, **kwargs):
  """fn's result, or the JloraError it raised (checked to be named and bounded)."""
  name = getattr(fn, "__qualname__", "?")
  with within():
    try:
      got = fn(*args, **kwargs)
    except jlora.JloraError as err:
      assert 10 < len(str(err)) <= jlora.errors.MAX_MESSAGE + 3, str(err)[:300]
      OUTCOMES[name, type(err).__name__] += 1
      return err
  OUTCOMES[name, "result"] += 1
  return got


# --------------------------------------------------------------------------- fixtures

PARAMS = {"layers_0": {"self_attn": {"q_proj": {"kernel": np.zeros((16, 24), np.float32)},
                                     "v_proj": {"kernel": np.zeros((16, 8), np.float32)}}}}


def _adapter(rng, alpha=8.0):
  return {"layers_0": {"self_attn": {
      "q_proj": {"kernel": jlora.LoRA(a=jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
                                      b=jnp.asarray(rng.standard_normal((4, 24)), jnp.float32),
                                      alpha=alpha, rank=4)},
      "v_proj": {"kernel": jlora.LoRA(a=jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
                                      b=jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
                                      alpha=alpha, rank=4)}}}}


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("peft") / "adapter"
  jlora.peft.save(d, _adapter(np.random.default_rng(0)))
  return d


def _edited(src, dst, config=None, tensors=None, raw=None):
  shutil.copytree(src, dst, dirs_exist_ok=True)
  if config is not None:
    (dst / "adapter_config.json").write_text(config if isinstance(config, str) else
                                             json.dumps(config))
  if tensors is not None:
    from safetensors.numpy import save_file
    save_file(tensors, str(dst / "adapter_model.safetensors"))
  if raw is not None:
    (dst / "adapter_model.safetensors").write_bytes(raw)
  return dst


def _config(d):
  return json.loads((d / "adapter_config.json").read_text())


def _tensors(d):
  from safetensors.numpy import load_file
  return load_file(str(d / "adapter_model.safetensors"))


# --------------------------------------------------------------------------- the named cases

def test_catastrophic_patterns_are_matched_in_linear_time(peft_dir, tmp_path):
  c = _config(peft_dir)
  c["rank_pattern"] = {"(.*.*)*Z": 2, "(a|aa)+$": 3, "(x+x+)+y": 5}
  c["target_modules"] = "(.*.*)*(q|v)_proj"
  d = _edited(peft_dir, tmp_path / "redos", c)
  with within(2.0):
    adapter, cfg = jlora.peft.load(d, PARAMS)   # no key matches: every module keeps r=4
  assert {lo.rank for lo in jlora.adapter.loras(adapter).values()} == {4}
  with within(2.0):
    assert not safe_regex.fullmatch("(.*.*)*Z", "model.layers.0.self_attn.q_proj" * 30)
  c["rank_pattern"] = {r"(\w+)\1": 2}
  with pytest.raises(jlora.ConfigError, match=r"rank_pattern key '\(\\\\w\+\)\\\\1' uses groupref"):
    jlora.peft.load(_edited(peft_dir, tmp_path / "backref", c), PARAMS)
  status = cli.main(["inspect", str(tmp_path / "redos")])
  assert status == 0


@pytest.mark.parametrize("field,value,message", [
    ("lora_alpha", float("inf"), r"lora_alpha=inf \(must be a positive finite number\)"),
    ("lora_alpha", float("nan"), r"lora_alpha=nan"),
    ("r", 0, r"r=0 \(must be a positive int\)"),
    ("use_rslora", "false", r"use_rslora='false' \(must be true or false\)"),
    ("alpha_pattern", {"q_proj": float("inf")}, r"alpha_pattern\['q_proj'\]=inf"),
    ("target_modules", 7, r"target_modules=7"),
])
def test_config_values_that_change_numbers_are_refused(peft_dir, tmp_path, field, value, message):
  c = dict(_config(peft_dir), **{field: value})
  with pytest.raises(jlora.ConfigError, match=message):
    jlora.peft.load(_edited(peft_dir, tmp_path / "e", c), PARAMS)


def test_malformed_files_are_format_errors(peft_dir, tmp_path):
  with pytest.raises(jlora.FormatError, match=r"adapter_config.json: not valid JSON \(nested too "
                     "deeply\)"):
    jlora.peft.load(_edited(peft_dir, tmp_path / "deep", "[" * 100_000), PARAMS)
  t = _tensors(peft_dir)
  key = next(k for k in t if k.endswith("lora_A.weight"))
  for dtype in (np.int32, np.bool_):
    bad = dict(t, **{key: t[key].astype(dtype)})
    with pytest.raises(jlora.FormatError, match=rf"has dtype (I32|BOOL); LoRA weights are floating"):
      jlora.peft.load(_edited(peft_dir, tmp_path / f"int{dtype.__name__}", tensors=bad), PARAMS)
  huge = dict(t, **{"base_model.model." + "x" * 5_000_000 + ".lora_A.weight": t[key]})
  err = outcome(jlora.peft.load, _edited(peft_dir, tmp_path / "long", tensors=huge), PARAMS)
  assert isinstance(err, jlora.FormatError) and "5,000,0" in str(err) and len(str(err)) < 700


def test_integer_kernels_are_not_merged_and_ties_keeps_a_nan(rng):
  ad = _adapter(rng)
  ints = jax.tree.map(lambda x: x.astype(np.int8), PARAMS)
  with pytest.raises(jlora.AdapterError, match=r"'layers_0/self_attn/q_proj/kernel' has dtype int8"):
    jlora.merge(ints, ad)
  poisoned = jax.tree.map(lambda x: x, ad)
  q = poisoned["layers_0"]["self_attn"]["q_proj"]["kernel"]
  poisoned["layers_0"]["self_attn"]["q_proj"]["kernel"] = q.replace(a=q.a.at[3, 1].set(jnp.nan))
  for method, extra in (("ties", {}), ("dare_ties", {"key": jax.random.key(0)})):
    both = jlora.combine([poisoned, ad], method=method, density=0.5, **extra)
    delta = jlora.delta(both)["layers_0"]["self_attn"]
    assert np.isnan(delta["q_proj"]["kernel"]).any(), method
    assert np.isfinite(delta["v_proj"]["kernel"]).all(), method


def test_config_json_declaring_too_many_layers_fails_before_tracing(tmp_path):
  from jlora.interop import hf
  from jlora.models import LlamaConfig
  config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
  from jlora.models.llama import abstract_params
  import flax.linen as nn
  flat = jlora.paths.flatten(nn.unbox(abstract_params(config)))
  params = jlora.paths.unflatten({p: np.full(s.shape, 0.5, np.float32) for p, s in flat.items()})
  hf.to_hf(tmp_path, config, params)
  cfg = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=20_000)))
  with within(2.0), pytest.raises(jlora.FormatError, match="declares 20000 layers but the "
                                  "checkpoint's tensors are for 2"):
    hf.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_attention_heads=0)))
  with pytest.raises(jlora.ConfigError, match="config.json"):
    hf.from_hf(tmp_path)


# --------------------------------------------------------------------------- peft.save killed

_SAVER = r"""
import sys
import jax.numpy as jnp, numpy as np
import jlora
rng = np.random.default_rng(0)
big = [{"lm_head": {"kernel": jlora.LoRA(a=jnp.full((2048, 64), float(i + 1)),
                                         b=jnp.full((64, 2048), float(i + 1)),
                                         alpha=float(8 * (i + 1)), rank=64)}} for i in range(2)]
print("ready", flush=True)
i = 0
while True:
  jlora.peft.save(sys.argv[1], big[i % 2])
  i += 1
"""


def test_peft_save_killed_mid_write_leaves_a_consistent_adapter(tmp_path):
  """Whenever the saver is killed, the directory holds one whole adapter: its config's
  alpha and its weights come from the same save (never new weights beside the old alpha)."""
  d = tmp_path / "adapter"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  rng = np.random.default_rng(1)
  for _ in range(2):
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n", child.stderr.read()[-2000:]
    time.sleep(rng.uniform(0.2, 0.6))
    child.kill()
    child.wait()
    if not d.exists():
      continue
    c = json.loads((d / "adapter_config.json").read_text())
    w = _tensors(d)["base_model.model.lm_head.lora_A.weight"]
    assert c["lora_alpha"] == 8 * w[0, 0], (c["lora_alpha"], w[0, 0])
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json",
                                                   "adapter_model.safetensors"]
  adapter, _ = jlora.peft.load(d, {"lm_head": {"kernel": np.zeros((2048, 2048), np.float32)}})
  lo = adapter["lm_head"]["kernel"]
  assert lo.alpha == 8 * float(lo.a[0, 0])


def test_peft_save_keeps_other_files_and_never_half_writes(tmp_path, rng, monkeypatch):
  d = tmp_path / "adapter"
  jlora.peft.save(d, _adapter(rng, alpha=8.0))
  (d / "README.md").write_text("my notes")
  before = {p.name: p.read_bytes() for p in d.iterdir()}

  def die(tmp, target):
    raise KeyboardInterrupt   # killed after writing both files, before the swap

  monkeypatch.setattr(checkpoint.files, "_swap_in", die)
  with pytest.raises(KeyboardInterrupt):
    jlora.peft.save(d, _adapter(rng, alpha=16.0))
  monkeypatch.undo()
  assert {p.name: p.read_bytes() for p in d.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
  jlora.peft.save(d, _adapter(rng, alpha=16.0))
  assert (d / "README.md").read_text() == "my notes" and _config(d)["lora_alpha"] == 16
  with pytest.raises(jlora.CheckpointError, match="exists; pass overwrite=True"):
    jlora.peft.save(d, _adapter(rng), overwrite=False)


# --------------------------------------------------------------------------- the CLI

def _cli(argv, capsys):
  status = cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_cli_user_errors_are_one_line_and_destinations_need_force(peft_dir, tmp_path, capsys):
  dst = tmp_path / "out"
  assert _cli(["convert", peft_dir, dst], capsys)[0] == 0
  before = sorted(os.listdir(dst))
  status, _, err = _cli(["convert", peft_dir, dst], capsys)
  assert status == 1 and err.count("\n") == 1 and "exists; pass --force" in err
  assert sorted(os.listdir(dst)) == before
  assert _cli(["convert", peft_dir, dst, "--force"], capsys)[0] == 0
  (tmp_path / "file").write_text("x")
  cases = [["convert", peft_dir, tmp_path / "file" / "sub"],        # output under a file
           ["convert", peft_dir, "/proc/jlora-unwritable/out"],     # an unwritable place
           ["inspect", tmp_path / "missing"],
           ["inspect", _edited(peft_dir, tmp_path / "deep", "[" * 100_000)],
           ["convert", dst, tmp_path / "peft-back", "--to", "jlora"]]
  for argv in cases:
    status, out, err = _cli(argv, capsys)
    assert status == 1 and err.count("\n") == 1 and err.startswith("jlora "), (argv, err)
    assert "Traceback" not in err and len(err) < 1100


# --------------------------------------------------------------------------- properties

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                st.floats(allow_nan=True, allow_infinity=True) |
                st.sampled_from(["", "false", "(.*.*)*Z", "q_proj", "all-linear", "a)|(b",
                                 "(?=x)", "\\", "[", "gaussian", "pissa", "x" * 3000]))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.sampled_from(["q_proj", "v_proj", ".*", "(", "r"]),
                                    inner, max_size=3), max_leaves=8)
FIELDS = st.sampled_from(list(peft_config.SUPPORTED) + ["bias", "fan_in_fan_out", "peft_type",
                                                        "layers_to_transform", "new_field"])


@FAST
@given(edits=st.dictionaries(FIELDS, JSON, min_size=1, max_size=3))
def test_property_adapter_config_json(peft_dir, tmp_path_factory, edits):
  d = _edited(peft_dir, tmp_path_factory.mktemp("c"), dict(_config(peft_dir), **edits))
  got = outcome(jlora.peft.load, d, PARAMS)
  if not isinstance(got, jlora.JloraError):
    adapter, cfg = got
    for lo in jlora.adapter.loras(adapter).values():
      assert np.isfinite(lo.scale) and lo.scale > 0 and lo.rank == 4


@FAST
@given(kwargs=st.dictionaries(st.sampled_from(["rank", "alpha", "targets", "exclude", "dropout",
                                                "use_rslora", "use_dora", "init", "rank_pattern",
                                                "alpha_pattern", "dtype"]), JSON, max_size=4))
def test_property_lora_config(kwargs):
  got = outcome(lambda: jlora.LoraConfig(**kwargs))
  if not isinstance(got, jlora.JloraError):
    rank, alpha = got.resolve("layers_0/q_proj/kernel")
    assert np.isfinite(got.scale(rank, alpha)) and got.scale(rank, alpha) > 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("ck") / "ck"
  tree = {"ad": _adapter(np.random.default_rng(2)),
          "q": quantize_array(jnp.asarray(np.random.default_rng(3).standard_normal((64, 32)),
                                          jnp.float32), "nf4", 64, True), "n": [1, None, "x"]}
  jlora.save(path, tree)
  return path, tree


def _paths_in(obj, at=()):
  yield at
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _paths_in(v, at + (k,))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _paths_in(v, at + (i,))


@FAST
@given(data=st.data(), value=JSON, resign=st.booleans())
def test_property_jlora_json(saved, tmp_path_factory, data, value, resign):
  """Any edit of jlora.json: the checksum catches it, or (re-signed) the restore is
  correct or a JloraError; the checkpoint is never changed by a restore."""
  src, tree = saved
  d = tmp_path_factory.mktemp("j") / "ck"
  shutil.copytree(src, d)
  manifest = json.loads((d / "jlora.json").read_text())
  where = data.draw(st.sampled_from(list(_paths_in(manifest["tree"]))[1:]))
  parent = manifest["tree"]
  for k in where[:-1]:
    parent = parent[k]
  parent[where[-1]] = value
  if resign:
    manifest["checksum"] = checkpoint.files.checksum(manifest["tree"])
  (d / "jlora.json").write_text(json.dumps(manifest))
  before = {p: open(p, "rb").read() for p in _files(d)}
  got = outcome(jlora.restore, d)
  if not resign and checkpoint.files.checksum(manifest["tree"]) != json.loads(
      (src / "jlora.json").read_text())["checksum"]:
    assert isinstance(got, jlora.FormatError) and "checksum" in str(got)
  if not isinstance(got, jlora.JloraError):
    for node in jax.tree.leaves(got, is_leaf=jlora.paths.is_node):
      if isinstance(node, (jlora.LoRA, jlora.QArray)):
        assert checkpoint.nodes.check_node(node) is None
  assert {p: open(p, "rb").read() for p in _files(d)} == before


def _files(d):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


@FAST
@given(cut=st.integers(0, 400), byte=st.integers(0, 255), header=st.none() | JSON)
def test_property_safetensors_header(peft_dir, tmp_path_factory, cut, byte, header):
  raw = bytearray((peft_dir / "adapter_model.safetensors").read_bytes())
  n = struct.unpack("<Q", raw[:8])[0]
  if header is not None:   # a whole new header: any JSON, declared sizes and offsets included
    text = json.dumps(header).encode()
    raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
  else:                    # one byte of the header or its length changed
    raw[min(cut, 8 + n - 1)] = byte
  d = _edited(peft_dir, tmp_path_factory.mktemp("s"), raw=bytes(raw))
  got = outcome(jlora.peft.load, d, PARAMS)
  assert isinstance(got, (jlora.JloraError, tuple))


@FAST
@given(field=st.sampled_from(["quant_type", "blocksize", "dtype", "shape", "nested_offset",
                              "nested_blocksize", "nested_dtype", "extra"]), value=JSON,
       drop=st.sampled_from([None, "w.absmax", "w.nested_absmax", "w.quant_map", "w"]))
def test_property_bnb_quant_state(field, value, drop):
  good = BF.to_bnb(quantize_array(jnp.asarray(np.random.default_rng(0).standard_normal((96, 64)),
                                              jnp.float32), "nf4", 64, True), "w")
  key = "w.quant_state.bitsandbytes__nf4"
  state = dict(json.loads(bytes(good[key])), **{field: value})
  tensors = {k: v for k, v in good.items() if k != drop}
  tensors[key] = np.frombuffer(json.dumps(state).encode(), np.uint8)
  got = outcome(BF.from_bnb, tensors, "w")
  if isinstance(got, jlora.QArray):
    assert checkpoint.nodes.check_qarray(got) is None
    assert np.isfinite(np.asarray(got.dequantize(jnp.float32))).all()


@FAST
@given(leaf=st.sampled_from(["object", "key", "int-key", "set"]))
def test_property_failed_saves_lose_nothing(saved, tmp_path_factory, leaf):
  src, tree = saved
  d = tmp_path_factory.mktemp("f") / "ck"
  shutil.copytree(src, d)
  bad = {"object": {"x": object()}, "key": {"k": jax.random.key(0)}, "int-key": {1: 2},
         "set": {"s": {1, 2}}}[leaf]
  before = {p: open(p, "rb").read() for p in _files(d)}
  with pytest.raises(TypeError):
    jlora.save(d, bad)
  assert {p: open(p, "rb").read() for p in _files(d)} == before
  assert sorted(os.listdir(d.parent)) == ["ck"]
