"""jlora.save / jlora.restore: bit-exact round trips, atomic saves, clear errors, shardings."""
import contextlib
import dataclasses
import functools
import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.core import FrozenDict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora import checkpoint
from jlora.lora import LoRA


def _normal(rng, shape, dtype=np.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _adapter(rng):
  """Stacked bf16, DoRA, einsum and embed LoRA nodes; no square matrices."""
  stacked = LoRA(a=_normal(rng, (3, 16, 4), jnp.bfloat16), b=_normal(rng, (3, 4, 24), jnp.bfloat16),
                 alpha=8, rank=4, rslora=True, dropout=0.05)
  dora = LoRA(a=_normal(rng, (16, 2)), b=_normal(rng, (2, 24)), magnitude=_normal(rng, (24,)),
              alpha=16.0, rank=2)
  einsum = LoRA(a=_normal(rng, (6, 5, 2)), b=_normal(rng, (2, 7)), alpha=4.0, rank=2,
                in_axes=(0, 1), out_axes=(2,), kind="einsum")
  embed = LoRA(a=_normal(rng, (50, 4)), b=_normal(rng, (4, 12)), alpha=4.0, rank=4, kind="embed")
  return {"layers": {"attn": {"q_proj": {"kernel": stacked}, "k_proj": {"kernel": dora}}},
          "mlp": {"up": {"kernel": einsum}}, "embed": {"embedding": embed}}


def _static(node):
  kids = {k.name for (k,), _ in jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda y: y is not node)[0]}
  return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name not in kids}


def assert_same_tree(got, want):
  """Same containers, node metadata (values and types) and array bytes and dtypes."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert hash(jax.tree.structure(got)) == hash(jax.tree.structure(want))
  nodes = zip(jax.tree.leaves(got, is_leaf=jlora.paths.is_node),
              jax.tree.leaves(want, is_leaf=jlora.paths.is_node))
  for g, w in nodes:
    if jlora.paths.is_node(w):
      assert type(g) is type(w)
      gs, ws = _static(g), _static(w)
      assert gs == ws and [type(v) for v in gs.values()] == [type(v) for v in ws.values()]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if hasattr(w, "dtype"):
      assert isinstance(g, jax.Array)
      assert (g.dtype, g.shape) == (w.dtype, w.shape)
      assert np.asarray(g).tobytes() == np.asarray(w).tobytes()
    else:
      assert (type(g), g) == (type(w), w)


def test_adapter_round_trip_is_bit_exact(tmp_path, rng):
  adapter = _adapter(rng)
  jlora.save(tmp_path / "ad", adapter)
  got = jlora.restore(tmp_path / "ad")
  assert_same_tree(got, adapter)
  assert got["layers"]["attn"]["q_proj"]["kernel"].magnitude is None
  assert got["layers"]["attn"]["k_proj"]["kernel"].magnitude.shape == (24,)
  assert got["layers"]["attn"]["q_proj"]["kernel"].scale == 4.0  # rsLoRA: 8 / sqrt(4)
  other = {"q": {"kernel": LoRA(a=_normal(rng, (8, 3)), b=_normal(rng, (3, 5)), rank=3)}}
  jlora.save(tmp_path / "ad", other)  # overwrite
  assert_same_tree(jlora.restore(tmp_path / "ad"), other)
  assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temporary left behind
  umask = os.umask(0o022)
  os.umask(umask)
  assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o777 & ~umask


def test_base_tree_round_trip_keeps_dtypes_and_bits(tmp_path, rng):
  special = np.array([np.nan, -0.0, np.inf, 1e-45, -3.5], np.float32)
  base = {
      "f32": _normal(rng, (5, 3)).at[0, :].set(jnp.asarray(special[:3])),
      "bf16": _normal(rng, (4, 6), jnp.bfloat16),
      "u8": jnp.asarray(rng.integers(0, 256, (7, 2)), jnp.uint8),
      "i8": np.asarray(rng.integers(-128, 128, (3, 9)), np.int8),
      "scalar": np.float32(3.5),
      "special": special,
      "containers": {"list": [_normal(rng, (2,)), None, 3, "name"],
                     "tuple": (_normal(rng, (3, 1)), 2.5, True)},
      "frozen": FrozenDict({"w": _normal(rng, (2, 3))}),
  }
  jlora.save(tmp_path / "base", base)
  got = jlora.restore(tmp_path / "base")
  want = dict(base, frozen={"w": base["frozen"]["w"]}, scalar=np.asarray(base["scalar"]))
  assert_same_tree(got, want)
  assert got["i8"].dtype == np.int8 and got["bf16"].dtype == jnp.bfloat16
  jlora.save(tmp_path / "empty", {})
  assert jlora.restore(tmp_path / "empty") == {}
  assert not (tmp_path / "empty" / "arrays").exists()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeQArray:
  """A stand-in for a quantized node: array children, static metadata of many kinds."""
  codes: jax.Array
  absmax: jax.Array
  nested: tuple | None = None
  _jlora_node = True
  shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  dtype: object = dataclasses.field(default=jnp.bfloat16, metadata=dict(static=True))
  storage: object = dataclasses.field(default=np.dtype("uint8"), metadata=dict(static=True))
  scheme: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
  offset: float | None = dataclasses.field(default=None, metadata=dict(static=True))
  options: dict | None = dataclasses.field(default=None, metadata=dict(static=True))


def test_any_registered_node_class_round_trips(tmp_path, rng):
  checkpoint.register_node(FakeQArray)
  q = FakeQArray(codes=jnp.asarray(rng.integers(0, 256, (2, 48)), jnp.uint8),
                 absmax=_normal(rng, (2, 3)), nested=(_normal(rng, (2, 1)), None),
                 shape=(2, 8, 12), offset=0.25, options={"axes": [0, (1, 2)], "kind": np.float32})
  tree = {"layers": {"w": {"kernel": q}}, "plain": FakeQArray(
      codes=jnp.zeros((5,), jnp.uint8), absmax=jnp.ones((1,)), dtype=np.dtype("float32"))}
  jlora.save(tmp_path / "q", tree)
  got = jlora.restore(tmp_path / "q")
  assert_same_tree(got, tree)
  assert got["layers"]["w"]["kernel"].dtype is jnp.bfloat16
  assert got["layers"]["w"]["kernel"].options["axes"][1] == (1, 2)


def test_qarray_round_trips(tmp_path, rng):
  base = {"layer": {"kernel": _normal(rng, (2, 128, 64)), "bias": _normal(rng, (64,))}}
  q = jlora.quantize(base, "nf4", double_quant=True, targets=".*kernel")
  single = jlora.quantize(base, "fp4", double_quant=False, targets=".*kernel")["layer"]["kernel"][1]
  tree = {"stacked": q, "single": single}
  jlora.save(tmp_path / "q", tree)
  got = jlora.restore(tmp_path / "q")
  assert_same_tree(got, tree)
  assert isinstance(got["stacked"]["layer"]["kernel"], jlora.QArray)
  assert got["single"].offset is None and got["single"].matrix_shape == (128, 64)


def test_restore_places_arrays_on_requested_shardings(tmp_path, rng):
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  rows, cols = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P(None, "x"))
  tree = {"w": _normal(rng, (8, 6)),
          "q": {"kernel": LoRA(a=_normal(rng, (6, 4)), b=_normal(rng, (4, 10)), rank=4)}}
  jlora.save(tmp_path / "ck", tree)
  as_tree = {"w": rows, "q": {"kernel": LoRA(a=rows, b=cols, rank=4)}}
  got = jlora.restore(tmp_path / "ck", shardings=as_tree)
  assert_same_tree(got, tree)
  assert got["w"].sharding == rows and got["q"]["kernel"].b.sharding == cols
  assert [x.data.shape for x in got["w"].addressable_shards] == [(4, 6), (4, 6)]
  by_path = jlora.restore(tmp_path / "ck", shardings=lambda p: rows if p.endswith("/a") else None)
  assert by_path["q"]["kernel"].a.sharding == rows
  assert by_path["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  jlora.save(tmp_path / "from_mesh", {"w": jax.device_put(tree["w"], rows)})
  assert_same_tree(jlora.restore(tmp_path / "from_mesh"), {"w": tree["w"]})
  with pytest.raises(ValueError, match="no sharding for.*'w'"):
    jlora.restore(tmp_path / "ck", shardings={"q": as_tree["q"]})
  with pytest.raises(ValueError, match="does not fit 'w' of shape \\[8, 6\\]"):
    jlora.restore(tmp_path / "ck", shardings=NamedSharding(mesh, P(None, None, "x")))


def test_restore_into_a_target(tmp_path, rng):
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  tree = {"dense": {"kernel": _normal(rng, (4, 6), jnp.bfloat16)},
          "q": {"kernel": LoRA(a=_normal(rng, (6, 2)), b=_normal(rng, (2, 3)), alpha=2.0, rank=2)}}
  jlora.save(tmp_path / "ck", tree)
  spec = lambda x, s=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  rows = NamedSharding(mesh, P("x"))
  target = FrozenDict({"dense": {"kernel": spec(tree["dense"]["kernel"], rows)},
                       "q": {"kernel": jax.tree.map(spec, tree["q"]["kernel"])}})
  got = jlora.restore(tmp_path / "ck", target=target)
  assert isinstance(got, FrozenDict) and got["dense"]["kernel"].sharding == rows
  assert_same_tree(got, FrozenDict(tree))
  bad_shape = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 7), jnp.bfloat16)}, "q": target["q"]}
  with pytest.raises(ValueError, match=r"'dense/kernel'.*bfloat16\[4, 6\].*bfloat16\[4, 7\]"):
    jlora.restore(tmp_path / "ck", target=bad_shape)
  other_alpha = {"dense": target["dense"],
                 "q": {"kernel": target["q"]["kernel"].replace(alpha=3.0)}}
  with pytest.raises(ValueError, match="does not match target at 'q/kernel'"):
    jlora.restore(tmp_path / "ck", target=other_alpha)


_CHILD = """
import sys
import numpy as np
import jlora
rng = np.random.default_rng(0)
jlora.save(sys.argv[1], {f"w{i}": rng.random((1024, 1024), np.float32) for i in range(24)})
"""


def test_killed_save_leaves_previous_checkpoint_readable(tmp_path, rng):
  path = tmp_path / "ck"
  old = _adapter(rng)
  jlora.save(path, old)
  child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 120
  while not glob.glob(str(tmp_path / ".ck.jlora-tmp-*" / "*")):  # orbax has started writing
    assert child.poll() is None, f"the save ended before it was killed: {child.communicate()}"
    assert time.monotonic() < deadline, "the save never started"
    time.sleep(0.002)
  child.send_signal(signal.SIGKILL)
  child.communicate()
  assert glob.glob(str(tmp_path / ".ck.jlora-tmp-*"))  # killed mid-save: its temp dir is left
  assert_same_tree(jlora.restore(path), old)
  new = {"w": _normal(rng, (3, 5))}
  jlora.save(path, new)  # a later save is not disturbed by the leftover
  assert_same_tree(jlora.restore(path), new)


def test_failed_save_leaves_previous_checkpoint_and_no_temp(tmp_path, rng, monkeypatch):
  old = _adapter(rng)
  jlora.save(tmp_path / "ck", old)

  def broken_write(directory, tree):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint.files, "write_manifest", broken_write)
  with pytest.raises(OSError, match="disk full"):
    jlora.save(tmp_path / "ck", {"w": _normal(rng, (3, 2))})
  assert [p.name for p in tmp_path.iterdir()] == ["ck"]
  assert_same_tree(jlora.restore(tmp_path / "ck"), old)


def test_save_refuses_what_it_must_not_replace(tmp_path, rng):
  tree = {"w": _normal(rng, (2, 3))}
  jlora.save(tmp_path / "ck", tree)
  with pytest.raises(ValueError, match="exists; pass overwrite=True"):
    jlora.save(tmp_path / "ck", tree, overwrite=False)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="refusing to replace .*not a jlora checkpoint"):
    jlora.save(tmp_path / "mine", tree)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="it is a file"):
    jlora.save(tmp_path / "file", tree)
  (tmp_path / "empty").mkdir()
  jlora.save(tmp_path / "empty", tree)
  assert_same_tree(jlora.restore(tmp_path / "empty"), tree)


def test_save_rejects_unsupported_leaves(tmp_path):
  with pytest.raises(TypeError, match="'k'.*PRNG"):
    jlora.save(tmp_path / "a", {"k": jax.random.key(0)})
  with pytest.raises(TypeError, match="'f64'.*float64 becomes float32 in JAX with jax_enable_x64 off"):
    jlora.save(tmp_path / "b", {"f64": np.ones(3)})
  with pytest.raises(TypeError, match="dict keys must be strings"):
    jlora.save(tmp_path / "b", {"x": {1: jnp.ones(2)}})
  with pytest.raises(jlora.UnsavableError, match="'x/0'.*unsupported object"):
    jlora.save(tmp_path / "c", {"x": [object()]})

  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Unknown:
    w: jax.Array
    _jlora_node = True

  with pytest.raises(TypeError, match="'u'.*Unknown is not a node class jlora knows"):
    jlora.save(tmp_path / "d", {"u": Unknown(jnp.ones(2))})
  assert not list(tmp_path.iterdir())


def _largest_array_file(path):
  files = [f for f in glob.glob(str(path / "arrays" / "**"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip_middle_byte(file):
  data = bytearray(open(file, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(file, "wb").write(bytes(data))


CORRUPTIONS = {
    "truncated array file": (lambda p: os.truncate(_largest_array_file(p),
                                                   os.path.getsize(_largest_array_file(p)) // 2),
                             "array 'noise' in arrays/ could not be read"),
    "removed array file": (lambda p: os.remove(_largest_array_file(p)),
                           "array 'noise' in arrays/ could not be read"),
    "flipped bit": (lambda p: _flip_middle_byte(_largest_array_file(p)),
                    r"the bytes of 'noise' \(uint8\[256, 256\]\) fail their CRC-32 check"),
    "removed arrays dir": (lambda p: shutil.rmtree(p / "arrays"), "arrays/ directory is missing"),
    "garbled json": (lambda p: (p / "jlora.json").write_text((p / "jlora.json").read_text()[:300]),
                     "jlora.json is not valid JSON"),
    "changed alpha": (lambda p: (p / "jlora.json").write_text(
        (p / "jlora.json").read_text().replace('"alpha": 8.0', '"alpha": 9.0')),
                      "jlora.json fails its checksum"),
    "unknown node class": (lambda p: _edit_manifest(p, '"LoRA"', '"os.system"'),
                           "unknown node class 'os.system' at 'q/kernel'"),
    "wrong static field": (lambda p: _edit_manifest(p, '"alpha"', '"alpah"'),
                           "LoRA at 'q/kernel' that cannot be rebuilt"),
    "rank 0": (lambda p: _edit_manifest(p, '"rank": 2', '"rank": 0'),
               r"invalid LoRA at 'q/kernel': rank=0 \(expected a positive int\)"),
    "infinite alpha": (lambda p: _edit_manifest(p, '"alpha": 8.0', '"alpha": Infinity'),
                       r"invalid LoRA at 'q/kernel': alpha=inf \(expected a finite number\)"),
    "shape the arrays lack": (lambda p: _edit_tree(p, lambda t: t["dict"]["noise"].update(
        shape=[256, 99999999999])),
                              r"says array 'noise' is uint8\[256, 99999999999\], but arrays/ "
                              r"stores uint8\[256, 256\]"),
    "deep nesting": (lambda p: _edit_tree(p, lambda t: t["dict"].update(
        deep=functools.reduce(lambda x, _: [x], range(100), []))),
                     "nests deeper than 64 levels"),
}


def _edit_tree(path, change):
  data = json.loads((path / "jlora.json").read_text())
  change(data["tree"])
  _edit_manifest(path, "", "", json.dumps(data))


def _edit_manifest(path, old, new, text=None):
  """Edits jlora.json and re-signs it, as someone who means to would: what the node checks catch."""
  data = json.loads(text or (path / "jlora.json").read_text().replace(old, new, 1))
  data["checksum"] = checkpoint.files.checksum(data["tree"])
  (path / "jlora.json").write_text(json.dumps(data))


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupted_checkpoint_fails_clearly(tmp_path, rng, damage):
  noise = jnp.asarray(rng.integers(0, 256, (256, 256)), jnp.uint8)  # incompressible bytes
  tree = {"noise": noise,
          "q": {"kernel": LoRA(a=_normal(rng, (6, 2)), b=_normal(rng, (2, 3)), alpha=8.0, rank=2)}}
  jlora.save(tmp_path / "ck", tree)
  corrupt, message = CORRUPTIONS[damage]
  corrupt(tmp_path / "ck")
  with pytest.raises(jlora.FormatError, match=f"corrupted jlora checkpoint at .*ck'.*({message})"):
    jlora.restore(tmp_path / "ck")
  assert len(str(pytest.raises(jlora.FormatError, jlora.restore, tmp_path / "ck").value)) < 700


def test_foreign_paths_are_not_checkpoints(tmp_path):
  with pytest.raises(ValueError, match="no checkpoint at .* does not exist"):
    jlora.restore(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a jlora checkpoint: .* is an empty directory"):
    jlora.restore(tmp_path / "empty")
  (tmp_path / "random").mkdir()
  (tmp_path / "random" / "data.bin").write_bytes(b"\x00\x01")
  with pytest.raises(ValueError, match="has no jlora.json \\(it holds data.bin\\)"):
    jlora.restore(tmp_path / "random")
  (tmp_path / "file").write_text("{}")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    jlora.restore(tmp_path / "file")
  orbax = ocp.StandardCheckpointer()
  orbax.save(tmp_path / "orbax", {"w": np.ones(3, np.float32)})
  orbax.wait_until_finished()
  orbax.close()
  with pytest.raises(ValueError, match="looks like an orbax checkpoint that jlora.save did not"):
    jlora.restore(tmp_path / "orbax")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "jlora.json").write_text(json.dumps({"format": "something-else"}))
  with pytest.raises(ValueError, match="does not say format 'jlora-checkpoint'"):
    jlora.restore(tmp_path / "other")
  (tmp_path / "other" / "jlora.json").write_text(json.dumps({"format": "jlora-checkpoint",
                                                              "version": 99, "tree": None}))
  with pytest.raises(ValueError, match="format version 99; this jlora reads versions 1 to 2"):
    jlora.restore(tmp_path / "other")


_UNPICKLING = []
_WATCHING = []


def _audit(event, args):
  if _WATCHING and event == "pickle.find_class":
    _UNPICKLING.append(args)


sys.addaudithook(_audit)


def test_restore_never_unpickles(tmp_path, rng, monkeypatch):
  adapter = _adapter(rng)
  jlora.save(tmp_path / "ad", adapter)

  def refuse(*args, **kwargs):
    raise AssertionError("restore tried to unpickle")

  for name in ("load", "loads", "Unpickler"):
    monkeypatch.setattr(pickle, name, refuse)
  _WATCHING.append(True)
  try:
    got = jlora.restore(tmp_path / "ad")
  finally:
    _WATCHING.clear()
  assert not _UNPICKLING
  assert_same_tree(got, adapter)


@pytest.mark.parametrize("name", ["run[1]", "back\\slash", "with space", "nön-ascii ✓", "a*?b"])
def test_awkward_paths_save_restore_and_overwrite(tmp_path, rng, name):
  path = tmp_path / name / "ck"
  first, second = {"w": _normal(rng, (3, 5))}, _adapter(rng)
  jlora.save(path, first)
  assert_same_tree(jlora.restore(path), first)
  jlora.save(path, second)                       # the overwrite is as safe as the first save
  assert_same_tree(jlora.restore(path), second)
  assert sorted(os.listdir(path.parent)) == ["ck"]


def test_orbax_writing_nothing_replaces_nothing(tmp_path, rng, monkeypatch):
  """Without jlora's safe path orbax skips its merge under '[1]' with a log line only;
  the read-back check must catch that before the swap."""
  path = tmp_path / "run[1]" / "ck"
  old = {"w": _normal(rng, (3, 5))}
  jlora.save(path, old)
  monkeypatch.setattr(checkpoint.files, "orbax_path", contextlib.nullcontext)
  with pytest.raises(jlora.CheckpointError, match="orbax did not write the arrays readably.*"
                     "nothing was replaced"):
    jlora.save(path, {"w": _normal(rng, (4, 2))})
  monkeypatch.undo()
  assert_same_tree(jlora.restore(path), old)
  assert sorted(os.listdir(path.parent)) == ["ck"]


def test_save_never_replaces_a_directory_it_did_not_write(tmp_path, rng):
  tree = {"w": _normal(rng, (2, 3))}
  mine = tmp_path / "project"
  mine.mkdir()
  (mine / "jlora.json").write_text('{"learning_rate": 0.1}')   # the user's own config file
  (mine / "train.py").write_text("print('mine')")
  with pytest.raises(jlora.CheckpointError, match="refusing to replace .*project'.*not a jlora "
                     "checkpoint"):
    jlora.save(mine, tree)
  assert sorted(os.listdir(mine)) == ["jlora.json", "train.py"]
  jlora.save(tmp_path / "ck", tree)
  (tmp_path / "ck" / "notes.txt").write_text("keep me")      # a checkpoint plus a user's file
  with pytest.raises(jlora.CheckpointError, match="besides a jlora checkpoint it holds 'notes.txt'"):
    jlora.save(tmp_path / "ck", tree)
  assert (tmp_path / "ck" / "notes.txt").read_text() == "keep me"
  (tmp_path / "ck" / "notes.txt").unlink()
  manifest = tmp_path / "ck" / "jlora.json"
  manifest.write_text(manifest.read_text().replace('"shape"', '"shapes"'))   # damaged, but ours
  with pytest.raises(jlora.FormatError, match="fails its checksum"):
    jlora.restore(tmp_path / "ck")
  jlora.save(tmp_path / "ck", tree)                            # may be replaced
  assert_same_tree(jlora.restore(tmp_path / "ck"), tree)
  (tmp_path / "file").write_text("x")
  with pytest.raises(jlora.CheckpointError, match="cannot write .*file/ck'.*(File exists|Not a directory)"):
    jlora.save(tmp_path / "file" / "ck", tree)
  with pytest.raises(jlora.CheckpointError, match="local file system"):
    jlora.save("gs://bucket/ck", tree)


def test_restore_while_another_thread_saves_sees_a_whole_checkpoint(tmp_path, rng):
  path = tmp_path / "ck"
  trees = [{"w": _normal(rng, (64, 32)), "v": _normal(rng, (5,))} for _ in range(2)]
  jlora.save(path, trees[0])
  done = threading.Event()

  def saver():
    for i in range(12):
      jlora.save(path, trees[i % 2])
    done.set()

  thread = threading.Thread(target=saver)
  thread.start()
  seen = 0
  while not done.is_set():
    got = jlora.restore(path)      # never "corrupted": a replaced checkpoint is read again
    assert any(np.array_equal(got["w"], t["w"]) and np.array_equal(got["v"], t["v"])
               for t in trees)
    seen += 1
  thread.join()
  assert seen >= 2


_MULTIHOST = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jlora
mesh = Mesh(np.array(jax.devices()), ("x",))
rows = NamedSharding(mesh, P("x"))
full = np.arange(24, dtype=np.float32).reshape(8, 3)
x = jax.make_array_from_callback((8, 3), rows, lambda i: full[i])
lora = jlora.LoRA(a=x, b=jax.device_put(np.ones((3, 5), np.float32), NamedSharding(mesh, P())),
                  alpha=4.0, rank=3)
for _ in range(2):   # a first save, then an overwrite
  jlora.save(sys.argv[2], {"q": {"kernel": lora}, "step": 7})
got = jlora.restore(sys.argv[2], shardings=lambda p: rows if p.endswith("/a") else None)
a = got["q"]["kernel"].a
assert a.sharding == rows and got["step"] == 7
assert all(np.array_equal(s.data, full[s.index]) for s in a.addressable_shards)
print("ok", jax.process_index())
"""


def test_multi_host_save(tmp_path):
  """Two processes (one CPU device each) save one sharded adapter together."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-c", _MULTIHOST, str(i), str(tmp_path / "ck"),
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, err[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["ck"]
  got = jlora.restore(tmp_path / "ck")
  assert np.array_equal(got["q"]["kernel"].a, np.arange(24, dtype=np.float32).reshape(8, 3))
