# Copied from the project's shared anchors (../shared/anchors/peft_baseline.py) so it travels to the GPU
# machine; one addition, marked: the 'frozen' variant (the frozen-base step of benchmarks/RESULTS.md).
"""Anchor baseline: HF PEFT LoRA / QLoRA / full fine-tune training step on a
TinyLlama-1.1B-shaped Llama (random init, no download), one GPU.
Prints tokens/s and peak memory per variant.  Run on the device machine."""
import json, os, sys, time, gc
import torch
from transformers import LlamaConfig, LlamaForCausalLM

B, T = int(os.environ.get("B", 4)), int(os.environ.get("T", 1024))
STEPS, WARM = 10, 3
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
results = {}

def run(name, model, params):
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(WARM + STEPS):
        if i == WARM:
            torch.cuda.synchronize(); t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / STEPS
    ntrain = sum(p.numel() for p in params)
    r = dict(step_s=round(dt, 4), tokens_per_s=round(B * T / dt), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
             trainable=ntrain, loss=round(out.loss.item(), 3))
    results[name] = r; print(name, json.dumps(r), flush=True)

def fresh():
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).cuda()

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
lcfg = lambda: LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")

if "lora" in sys.argv:
    m = get_peft_model(fresh(), lcfg())
    run("peft_lora_bf16", m, [p for p in m.parameters() if p.requires_grad]); del m; gc.collect(); torch.cuda.empty_cache()
if "frozen" in sys.argv:  # (jlora addition) the frozen-base step: one rank-1 adapter on layer 0's q_proj
    m = get_peft_model(fresh(), LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"], layers_to_transform=[0],
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    run("peft_frozen_base", m, [p for p in m.parameters() if p.requires_grad]); del m; gc.collect(); torch.cuda.empty_cache()
if "full" in sys.argv:
    m = fresh(); run("full_ft_bf16", m, list(m.parameters())); del m; gc.collect(); torch.cuda.empty_cache()
if "qlora" in sys.argv:
    from transformers import BitsAndBytesConfig
    fresh().save_pretrained("/tmp/rand_llama"); gc.collect(); torch.cuda.empty_cache()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    m = LlamaForCausalLM.from_pretrained("/tmp/rand_llama", quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    m = get_peft_model(m, lcfg())
    run("peft_qlora_nf4_dq", m, [p for p in m.parameters() if p.requires_grad])
    print("weights_gib_after_load", round(torch.cuda.memory_allocated() / 2**30, 2))
print("RESULTS", json.dumps(results))
