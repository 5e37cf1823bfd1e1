"""The examples run end to end with tiny flags: finetune.py and serve_many.py as scripts,
sharded_training.py in this process (conftest's 8 CPU devices). examples/conv_lora.py is
not run here (about 15 s of compiling; conv LoRA is tested in tests/test_transform.py)."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import jlora
import jlora.train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_finetune_demo_runs(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmd = [sys.executable, str(ROOT / "examples" / "finetune.py"), "--qlora", "--steps", "3",
         "--pretrain-steps", "3", "--batch-size", "4", "--eval-size", "8", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  png = out / "loss_curves.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  adapter = jlora.restore(str(out / "adapter"))
  loras = jlora.adapter.loras(adapter)
  assert loras and all(p.endswith(("q_proj/kernel", "v_proj/kernel")) for p in loras)
  assert all(lo.rank == 2 and np.all(np.isfinite(lo.a)) for lo in loras.values())
  assert "QLoRA:" in proc.stdout and "merged model vs base + adapter" in proc.stdout
  assert "restores identically: True" in proc.stdout
  # a second invocation continues the same run: --resume from the checkpoints in <out>/run
  again = subprocess.run(cmd[:-2] + ["--steps", "5", "--resume", "--out", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "resumed fine-tuning at step 3" in again.stdout
  history = jlora.train.TrainCheckpointer(out / "run").history
  assert history["step"] == [1, 2, 3, 4, 5] and len(history["loss"]) == 5
  refused = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0 and "pass --resume" in refused.stderr


def test_serve_many_runs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  cmd = [sys.executable, str(ROOT / "examples" / "serve_many.py"), "--pretrain-steps", "2",
         "--steps", "2", "--batch-size", "4", "--rows", "5"]
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "read back from the PEFT directory" in proc.stdout
  assert "rows right:" in proc.stdout and "(base)" in proc.stdout and "mirror" in proc.stdout


def _run_example(name, argv):
  """An example's main() in this process (no new JAX start-up; conftest's 8 CPU devices)."""
  import importlib.util
  import sys as _sys
  _sys.path.insert(0, str(ROOT / "examples"))
  try:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
  finally:
    _sys.path.remove(str(ROOT / "examples"))


def test_sharded_training_runs(capsys):
  out = _run_example("sharded_training", ["--steps", "2", "--batch-size", "8", "--layers", "1"])
  assert np.isfinite(out["first"]) and np.isfinite(out["loss"])
  text = capsys.readouterr().out
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in text and "P('fsdp', 'tensor')" in text


def test_dpo_example_runs(tmp_path):
  """examples/dpo.py end to end at a tiny size (in-process): pairs, DPO steps, the PNG."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("dpo_example", ROOT / "examples" / "dpo.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  rc = example.main(["--pretrain-steps", "0", "--steps", "2", "--pairs", "64", "--eval-pairs",
                     "32", "--batch-size", "8", "--targets", "q_proj,v_proj", "--out",
                     str(tmp_path)])
  assert rc == 0
  assert (tmp_path / "dpo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
