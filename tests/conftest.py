"""Strict harness: 8 simulated CPU devices, rank promotion raises."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


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
