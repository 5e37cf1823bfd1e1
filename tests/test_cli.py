"""The ``jlora`` command: ``convert`` (PEFT <-> jlora) and ``inspect``."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

import jlora  # noqa: E402
from jlora import cli  # noqa: E402
from jlora.adapter import loras  # noqa: E402

N_LAYERS = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A tiny random HF Llama and a PEFT adapter on it (random non-zero A, B; DoRA)."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)).float()
  base = tmp_path_factory.mktemp("base")
  model.save_pretrained(base)
  pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
      r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"],
      rank_pattern={"down_proj": 2}))
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)) if "magnitude" in name
                else 0.2 * torch.randn(p.shape, generator=g))
  src = tmp_path_factory.mktemp("peft")
  pm.save_pretrained(src)
  return base, src


def _run(argv, capsys):
  status = cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_convert_peft_to_jlora_and_back(dirs, tmp_path, capsys):
  base, src = dirs
  status, out, _ = _run(["convert", src, tmp_path / "ckpt"], capsys)
  assert status == 0
  assert "read PEFT adapter" in out and "4 weights" in out and "rank 2/4" in out and "DoRA" in out
  assert "layers_1/mlp/down_proj/kernel" in out and "wrote jlora adapter checkpoint" in out
  restored = loras(jlora.restore(tmp_path / "ckpt"))
  assert sorted(restored) == sorted(f"layers_{i}/{m}/kernel" for i in range(N_LAYERS)
                                    for m in ("self_attn/q_proj", "mlp/down_proj"))
  raw = load_file(os.path.join(src, "adapter_model.safetensors"))
  lo = restored["layers_1/mlp/down_proj/kernel"]
  np.testing.assert_array_equal(np.asarray(lo.a),
                                raw["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].T)
  assert (lo.rank, lo.alpha, lo.use_dora) == (2, 8.0, True)

  status, out, _ = _run(["convert", tmp_path / "ckpt", tmp_path / "back",
                         "--base-model-name", "tiny/llama"], capsys)
  assert status == 0 and "wrote PEFT adapter" in out
  back = load_file(tmp_path / "back" / "adapter_model.safetensors")
  assert back.keys() == raw.keys()
  for k in raw:
    np.testing.assert_array_equal(back[k], raw[k], err_msg=k)
  config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == "tiny/llama" and config["use_dora"]


def test_convert_with_base_and_scanned_layers(dirs, tmp_path, capsys):
  base, src = dirs
  status, out, err = _run(["convert", src, tmp_path / "scanned", "--base", base,
                           "--scan-layers"], capsys)
  assert status == 0, err
  stacked = loras(jlora.restore(tmp_path / "scanned"))
  flat = loras(jlora.peft.load(src, jlora.interop.from_hf(base)[1])[0])
  assert sorted(stacked) == ["layers/mlp/down_proj/kernel", "layers/self_attn/q_proj/kernel"]
  for path, lo in stacked.items():
    assert lo.stack == 1
    for i in range(N_LAYERS):
      one = flat[path.replace("layers/", f"layers_{i}/")]
      np.testing.assert_array_equal(np.asarray(lo.b[i]), np.asarray(one.b))
  status, out, err = _run(["convert", tmp_path / "scanned", tmp_path / "peft2", "--base", base,
                           "--scan-layers"], capsys)
  assert status == 0 and "checked against the model" in out, err
  assert load_file(tmp_path / "peft2" / "adapter_model.safetensors").keys() == \
      load_file(os.path.join(src, "adapter_model.safetensors")).keys()


def test_inspect_both_formats(dirs, tmp_path, capsys):
  base, src = dirs
  status, out, _ = _run(["inspect", src], capsys)
  assert status == 0 and out.startswith("PEFT LoRA adapter")
  n = sum(x.size for x in load_file(os.path.join(src, "adapter_model.safetensors")).values())
  assert f"{n:,} parameters" in out
  assert "layers_0/self_attn/q_proj/kernel  [64, 4]" in out
  ckpt = tmp_path / "ckpt"
  jlora.save(ckpt, jlora.peft.load(src, jlora.peft.params_from_file(src))[0])
  # the installed console script, in a fresh process
  res = subprocess.run([sys.executable, "-m", "jlora.cli", "inspect", str(ckpt)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith("jlora adapter checkpoint") and f"{n:,} parameters" in res.stdout
  assert "layers_1/mlp/down_proj/kernel" in res.stdout and "rank 2/4" in res.stdout


def test_errors_exit_nonzero_with_a_message(dirs, tmp_path, capsys):
  base, src = dirs
  status, _, err = _run(["convert", src, tmp_path / "x", "--to", "peft"], capsys)
  assert status == 1 and "already is a peft adapter" in err
  status, _, err = _run(["convert", tmp_path / "missing", tmp_path / "x"], capsys)
  assert status == 1 and "is not a directory" in err
  status, _, err = _run(["convert", src, tmp_path / "x", "--scan-layers"], capsys)
  assert status == 1 and "--scan-layers needs --base" in err
  (tmp_path / "empty").mkdir()
  status, _, err = _run(["inspect", tmp_path / "empty"], capsys)
  assert status == 1 and "jlora inspect: error:" in err
  assert not (tmp_path / "x").exists()
  with pytest.raises(SystemExit):
    cli.main(["convert"])
