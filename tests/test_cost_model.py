"""benchmarks/cost_model.py: exact memory parts from eval_shape shardings, the schedule's
bubble and volumes, the fitted efficiency (no compiles: abstract meshes only)."""
import dataclasses
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import cost_model as C  # noqa: E402


def test_memory_parts_follow_the_shardings():
  one = C.state_bytes(C.Workload(model="llama-3-8b"))
  assert one["base"] == one["base_total"]                         # one device holds it all
  assert 14.9 < one["base"] / C.GIB < 15.0                         # 8.03 B bf16 parameters
  assert one["adapter_params"] == 41_943_040                       # r=16 on 7 projections x 32
  fsdp8 = C.state_bytes(C.Workload(model="llama-3-8b", mesh=(1, 1, 8, 1)))
  assert fsdp8["base"] == pytest.approx(one["base"] / 8, rel=1e-3)   # every weight divides by 8
  assert fsdp8["fsdp_gathered"] == pytest.approx(one["base"] * 7 / 8, rel=1e-3)
  stage4 = C.state_bytes(C.Workload(model="llama-3-8b", mesh=(4, 1, 1, 1)))
  cfg = one["cfg"]
  outer = 2 * cfg.vocab_size * cfg.hidden_size * 2 + cfg.hidden_size * 2   # embed, head, norm
  assert stage4["base"] == pytest.approx((one["base"] - outer) / 4 + outer, rel=1e-6)
  q = C.state_bytes(C.Workload(model="llama-3-70b", method="qlora", mesh=(1, 8, 1, 1)))
  assert 36 < q["base"] / C.GIB < 37.5                              # data parallel: a replica each


def test_prediction_parts():
  hw = C.HARDWARE["h200"]
  w, measured = C.REFERENCE
  assert C.predict(w, C.HARDWARE["h100"])["step_s"] == pytest.approx(measured)   # the fit
  gpipe = C.predict(dataclasses.replace(w, batch=4, mesh=(2, 1, 1, 1), microbatches=4), hw)
  onefb = C.predict(dataclasses.replace(w, batch=4, mesh=(2, 1, 1, 1), microbatches=4,
                                        schedule="1f1b"), hw)
  assert gpipe["bubble"] == onefb["bubble"] == pytest.approx(1 / 5)
  # 1F1B: its forward again, and memory bounded by S microbatches instead of M + S - 1
  assert onefb["matmul_s"] > gpipe["matmul_s"]
  assert onefb["mem_gib"]["activations"] < gpipe["mem_gib"]["activations"] / 2
  mb_bytes = 1 * 1024 * 4096 * 2                                     # one sequence, bf16
  sends = gpipe["comms"]["stage: activations to the next stage"]["gb"]
  assert sends == pytest.approx(2 * 5 * mb_bytes / C.GB, abs=1e-3)  # 5 ticks, each way
  data = C.predict(dataclasses.replace(w, batch=4, mesh=(1, 2, 1, 1)), hw)
  fsdp = C.predict(dataclasses.replace(w, batch=4, mesh=(1, 1, 2, 1)), hw)
  assert data["step_s"] < fsdp["step_s"]                # FSDP gathers the weights twice a step
  assert fsdp["peak_gib"] < data["peak_gib"]
