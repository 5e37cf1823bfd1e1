"""The ``jlora`` command: ``convert`` (PEFT <-> jlora), ``inspect``, ``merge``, ``quantize``.

Each verb runs once as a real subprocess on real files (and once on a bad
input); the rest run in-process through ``cli.main``. Oracles: PEFT's
``merge_and_unload`` for ``merge`` (logits of the checkpoint transformers
loads, 1e-5 relative), bitsandbytes' own dequantization of the weights
transformers loads for ``quantize`` (bit for bit).
"""
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
from jlora import paths  # noqa: E402
from jlora.adapter import loras  # noqa: E402

N_LAYERS = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A tiny random HF Llama and a PEFT adapter on it (random non-zero A, B; DoRA)."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, eos_token_id=2)).float()
  base = tmp_path_factory.mktemp("base")
  model.save_pretrained(base)
  (base / "tokenizer_config.json").write_text("{}")     # stands in for the tokenizer files
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
  return base, src, pm.eval()


def _run(argv, capsys):
  status = cli.main([str(a) for a in argv])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_convert_peft_to_jlora_and_back(dirs, tmp_path, capsys):
  base, src, _ = dirs
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
  base, src, _ = dirs
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
  base, src, _ = dirs
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
  base, src, _ = dirs
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


ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
IDS = np.random.default_rng(0).integers(0, 128, (2, 7))


def _jlora(*argv):
  """The command in a fresh process, as a user runs it."""
  return subprocess.run([sys.executable, "-m", "jlora.cli", *map(str, argv)], capture_output=True,
                        text=True, timeout=300, env=ENV)


def test_merge_output_loads_in_transformers_with_peft_merged_logits(dirs, tmp_path):
  base, src, pm = dirs
  res = _jlora("merge", base, src, tmp_path / "merged")
  assert res.returncode == 0, res.stderr
  assert "read PEFT adapter" in res.stdout and "merged 4 weights" in res.stdout
  assert sorted(os.listdir(tmp_path / "merged")) == [
      "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  assert merged.config.eos_token_id == 2
  with torch.no_grad():
    want = copy.deepcopy(pm).merge_and_unload()(torch.tensor(IDS)).logits.numpy()
    got = merged(torch.tensor(IDS)).logits.numpy()
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  # bad input: the base given as the adapter, and DST taken
  res = _jlora("merge", base, base, tmp_path / "merged")
  assert res.returncode == 1 and res.stderr.count("\n") == 1
  assert "exists; pass --force" in res.stderr
  status = cli.main(["merge", str(base), str(base), str(tmp_path / "m2")])
  assert status == 1 and not (tmp_path / "m2").exists()


def test_quantize_nf4_loads_in_transformers_bit_for_bit(dirs, tmp_path):
  bnb = pytest.importorskip("bitsandbytes")
  base, _, _ = dirs
  res = _jlora("quantize", base, tmp_path / "q", "--scheme", "nf4")
  assert res.returncode == 0, res.stderr
  assert "quantized 10 weights (65,536 values) to nf4 (block 64 + double quant)" in res.stdout
  assert "bits per weight" in res.stdout and "relative error |W - Q| / |W|: mean 0.0" in res.stdout
  q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
  from jlora.quant import bnb_format
  ours = bnb_format.load_safetensors(tmp_path / "q" / "model.safetensors")   # jlora's reading
  checked = 0
  for name, module in q.named_modules():
    if isinstance(module, bnb.nn.Linear4bit):
      w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy()
      np.testing.assert_array_equal(w, np.asarray(ours[name + ".weight"].dequantize()).T)
      checked += 1
  assert checked == 10
  with torch.no_grad():
    assert np.isfinite(q(torch.tensor(IDS)).logits.numpy()).all()
  # bad input: transformers has no format for jlora's int8
  res = _jlora("quantize", base, tmp_path / "q8", "--scheme", "int8", "--format", "hf")
  assert res.returncode == 1 and "no format for jlora's blockwise int8" in res.stderr
  assert not (tmp_path / "q8").exists()


def test_quantize_int8_and_merge_nf4_in_process(dirs, tmp_path, capsys):
  base, src, _ = dirs
  status, out, err = _run(["quantize", base, tmp_path / "q8", "--scheme", "int8"], capsys)
  assert status == 0, err
  restored = jlora.restore(tmp_path / "q8")
  kernel = restored["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(kernel, jlora.QArray) and kernel.scheme == "int8"
  w = load_file(base / "model.safetensors")["model.layers.1.mlp.down_proj.weight"].T.astype(np.float64)
  err = np.linalg.norm(np.asarray(kernel.dequantize(), np.float64) - w) / np.linalg.norm(w)
  assert f"layers_1/mlp/down_proj/kernel     8,192   {err:.4f}" in out
  status, out, _ = _run(["inspect", tmp_path / "q8"], capsys)
  assert status == 0 and "(10 quantized weights: 10 int8)" in out
  status, out, err = _run(["merge", base, src, tmp_path / "m4", "--quantize", "nf4",
                           "--block-size", "128", "--no-double-quant"], capsys)
  assert status == 0, err
  config = json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"]
  assert config["bnb_4bit_quant_type"] == "nf4" and not config["bnb_4bit_use_double_quant"]
  assert "lm_head" in config["llm_int8_skip_modules"]
  status, out, _ = _run(["inspect", tmp_path / "m4"], capsys)
  assert "10 bitsandbytes nf4 weights" in out and "model.layers.*.mlp.down_proj.weight" in out


def test_inspect_a_hugging_face_directory(dirs, tmp_path):
  base, _, _ = dirs
  res = _jlora("inspect", base)
  assert res.returncode == 0, res.stderr
  lines = res.stdout.splitlines()
  assert lines[0].startswith("Hugging Face model") and "llama (LlamaForCausalLM), 2 layers" in lines[0]
  assert lines[1].startswith("90,432 parameters")
  assert any(line.split()[:4] == ["model.layers.*.self_attn.k_proj.weight", "[32,", "64]", "F32"]
             for line in lines)
  # bad input: a truncated safetensors file
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text((base / "config.json").read_text())
  (tmp_path / "bad" / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:100])
  res = _jlora("inspect", tmp_path / "bad")
  assert res.returncode == 1 and "jlora inspect: error:" in res.stderr and "safetensors" in res.stderr


def test_help_explains_every_flag():
  for command in ("convert", "inspect", "merge", "quantize"):
    text = cli._parser()._subparsers._group_actions[0].choices[command].format_help()
    flags = [a for a in cli._parser()._subparsers._group_actions[0].choices[command]._actions
             if a.option_strings and a.dest != "help"]
    assert all(a.help for a in flags), command
    assert "usage: jlora " + command in text
