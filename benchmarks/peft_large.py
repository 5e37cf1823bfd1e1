"""PEFT on the large shapes of ../shared/BENCHMARKS.md, as the anchor script does it.

  python3 benchmarks/peft_large.py lora8b      # Llama-3-8B shape, bf16 base, LoRA r=16
  python3 benchmarks/peft_large.py qlora70b    # Llama-3-70B shape, NF4 + double quant, QLoRA

Same recipe as benchmarks/peft_baseline.py (random weights, AdamW, r=16,
alpha=32 on the seven projections, median of 10 steps after 3 warm-up), with
two changes forced by size. The 8B model is built on the GPU directly. The
70B model cannot exist in bf16 (140 GB), and transformers can only quantize
while loading files (140 GB of disk), so it is built on the meta device and
each decoder projection is made on the GPU and quantized into a bitsandbytes
``Linear4bit`` at once (what ``from_pretrained(quantization_config=...)``
does per tensor), then ``prepare_model_for_kbit_training`` with gradient
checkpointing, as a 70B QLoRA run needs. B and T come from the environment
(defaults: 2 x 1024 for lora8b, 1 x 1024 for qlora70b).
"""
import gc
import json
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "lora8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8),
    "qlora70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8),
}
BATCH = {"lora8b": 2, "qlora70b": 1}


def config(variant):
  return LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=500000.0, tie_word_embeddings=False, **SHAPES[variant])


def quantized_70b(cfg):
  import bitsandbytes as bnb
  with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, lin in list(parent.named_children()):
        if not isinstance(lin, torch.nn.Linear):
          continue
        w = torch.empty(lin.out_features, lin.in_features, device="cuda",
                        dtype=torch.bfloat16).normal_(0.0, 0.02)
        with torch.device("meta"):
          q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64,
                                     compress_statistics=True, quant_type="nf4").to("cuda")
        setattr(parent, name, q)
        del w
  for mod in model.modules():  # embeddings, norms, lm_head: real bf16 tensors
    for name, p in list(mod.named_parameters(recurse=False)):
      if p.is_meta:
        data = torch.empty(p.shape, device="cuda", dtype=torch.bfloat16)
        if "Norm" in type(mod).__name__:
          data.fill_(1.0)
        else:
          data.normal_(0.0, 0.02)
        setattr(mod, name, torch.nn.Parameter(data, requires_grad=p.requires_grad))
  model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to("cuda")
  model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
  return model


def main():
  from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
  variant = sys.argv[1]
  cfg = config(variant)
  b, t = int(os.environ.get("B", BATCH[variant])), int(os.environ.get("T", 1024))
  torch.manual_seed(0)
  t0 = time.perf_counter()
  if variant == "lora8b":
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
      model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
  else:
    model = quantized_70b(cfg)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
  torch.cuda.synchronize()
  weights_gib = torch.cuda.memory_allocated() / 2**30
  init_s = time.perf_counter() - t0
  model.config.use_cache = False
  model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
  q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
  if variant == "qlora70b":  # PEFT's bitsandbytes LoRA layer, over a 4-bit weight
    assert type(q_proj).__module__.endswith("lora.bnb"), type(q_proj)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  ids = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")
  torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(13):
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if i >= 3:
      times.append(time.perf_counter() - t1)
  dt = statistics.median(times)
  r = dict(variant=f"peft_{variant}", batch=b, seq=t, step_s=round(dt, 4),
           tokens_per_s=round(b * t / dt), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
           weights_gib=round(weights_gib, 2), init_s=round(init_s, 1),
           trainable=sum(p.numel() for p in params), loss=round(out.loss.item(), 3),
           torch=torch.__version__)
  print("RESULT", json.dumps(r), flush=True)
  del model, opt
  gc.collect()


if __name__ == "__main__":
  main()
