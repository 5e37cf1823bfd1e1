"""The GPU benchmark script runs on CPU at a tiny size, sharded and not, with equal losses."""
import pathlib
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_train_step_benchmark_sharded_equals_single(variant):
  assert jax.device_count() == 8
  argv = [variant, "--preset", "tiny", "--batch", "8", "--seq", "16", "--steps", "1",
          "--warmup", "1"]
  one = train_step.main(argv)
  sharded = train_step.main(argv + ["--mesh", "2,2,2"])
  assert sharded["devices"] == 8 and sharded["trainable"] == one["trainable"] > 0
  assert abs(sharded["loss"] - one["loss"]) <= 1e-3
  if variant == "qlora":
    assert 0.5 < one["bytes_per_quantized_param"] < 0.56


def test_train_step_benchmark_bitfit_row():
  """The BitFit row runs (tiny preset): only the zero-initialised biases train."""
  argv = ["bitfit", "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1",
          "--warmup", "1"]
  bitfit = train_step.main(argv)
  assert bitfit["trainable"] == 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)   # biases of 2 layers
  assert 4.0 < bitfit["loss"] < 6.0                                     # ~log(128) at init
