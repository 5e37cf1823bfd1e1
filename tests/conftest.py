"""Strict harness: 8 simulated CPU devices, rank promotion raises."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for this run, shared by both xdist workers and every
# subprocess the tests start (examples, the CLI, docs): the same tiny-model steps
# are compiled by many tests, and XLA's compile is most of the suite's time. A new
# directory per run, so nothing is reused from an earlier checkout.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # xdist's workers inherit the controller's
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jlora-tests-xla-")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_unconfigure(config):
  if globals().get("_OWN_CACHE"):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def rng():
  """A fresh NumPy generator per test (seeded by the test's name, so failures reproduce)."""
  import zlib
  name = os.environ.get("PYTEST_CURRENT_TEST", "jlora")
  return np.random.default_rng(zlib.crc32(name.encode()))


def rel_err(x, ref) -> float:
  """‖x - ref‖ / ‖ref‖ in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))
