"""The same training curve as PEFT: one checkpoint, one initial adapter, bf16.

A random Llama checkpoint (TinyLlama shape by default) is written once by
``transformers``; jlora loads it with ``jlora.interop.from_hf`` and PEFT with
``from_pretrained``. jlora's initial adapter (r=16 on q/k/v/o/gate/up/down,
B random so that step 0 already trains both factors) is written with
``jlora.peft.save`` and loaded by PEFT, so both sides start from the same
numbers. Both train --steps AdamW steps on the same batches (--distinct random
batches, cycled, so the loss can fall), in bf16 (the
adapters float32, as PEFT keeps them); with ``--quant nf4`` both bases are
NF4 with double quantization (jlora's quantizer and bitsandbytes', which
give the same codes).

  python benchmarks/curve.py --out /tmp/out                 # GPU
  python benchmarks/curve.py --preset tiny --steps 5 --batch 2 --seq 32 --out /tmp/c   # CPU smoke

Writes ``curve.json`` and ``curve.png`` to --out; prints the largest relative
gap between the two loss curves.
"""
import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import jlora
from jlora import train
from jlora.models import preset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(c):
  return transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=4096,
      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tinyllama-1.1b")
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--lr", type=float, default=2e-4)
  ap.add_argument("--distinct", type=int, default=4,
                  help="distinct batches, cycled (random tokens: only repeats can be learnt)")
  ap.add_argument("--quant", default="none", choices=["none", "nf4"])
  ap.add_argument("--out", default="out")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  dev = "cuda" if torch.cuda.is_available() else "cpu"

  c = preset(args.preset)
  folder = tempfile.mkdtemp()
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_config(c)).to(torch.bfloat16).save_pretrained(folder + "/base")
  rng = np.random.default_rng(0)
  pool = [rng.integers(0, c.vocab_size, size=(args.batch, args.seq)) for _ in range(args.distinct)]
  batches = [pool[i % args.distinct] for i in range(args.steps)]

  # --- jlora ---------------------------------------------------------------------
  quant = "nf4" if args.quant == "nf4" else None
  model, params = jlora.interop.from_hf(folder + "/base", dtype=jnp.bfloat16, quantize=quant)
  cfg = jlora.LoraConfig(rank=16, alpha=32, targets=TARGETS)
  ids0 = jnp.asarray(batches[0][:1, :8])
  adapter = jlora.init_adapter(jax.random.key(0), params, cfg, model=model, args=(ids0,))
  adapter = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(v.size), v.shape),
                         adapter)
  jlora.peft.save(folder + "/adapter", adapter, cfg, base_model_name_or_path="random-llama")

  def loss_fn(ad, base, batch, key):
    logits = jlora.apply(model, {"params": base}, ad, batch)
    return train.lm_loss(logits[:, :-1], batch[:, 1:])
  opt = optax.adamw(args.lr, weight_decay=0.0)
  step = train.make_train_step(loss_fn, opt)
  state = opt.init(adapter)
  ours = []
  for b in batches:
    adapter, state, m = step(adapter, state, params, jnp.asarray(b))
    ours.append(float(m["loss"]))
  del params

  # --- PEFT ------------------------------------------------------------------------
  import peft
  kw = dict(dtype=torch.bfloat16)
  if quant:
    kw["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)
    kw["device_map"] = {"": 0} if dev == "cuda" else "cpu"
  base = transformers.LlamaForCausalLM.from_pretrained(folder + "/base", **kw)
  if not quant:
    base = base.to(dev)
  pm = peft.PeftModel.from_pretrained(base, folder + "/adapter", is_trainable=True)
  params_t = [p for p in pm.parameters() if p.requires_grad]
  topt = torch.optim.AdamW(params_t, lr=args.lr, weight_decay=0.0, eps=1e-8)
  theirs = []
  for b in batches:
    x = torch.tensor(b, device=dev)
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    topt.step()
    topt.zero_grad(set_to_none=True)
    theirs.append(float(loss))

  gap = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
  result = dict(preset=args.preset, quant=args.quant, steps=args.steps, batch=args.batch,
                seq=args.seq, lr=args.lr, jlora=ours, peft=theirs, max_rel_gap=max(gap),
                jax=jax.__version__, torch=torch.__version__, peft_version=peft.__version__)
  with open(os.path.join(args.out, f"curve_{args.quant}.json"), "w") as f:
    json.dump(result, f)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ours, label="jlora")
    ax.plot(theirs, "--", label="PEFT")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{args.preset}, bf16{', NF4 base' if quant else ''}: max gap {max(gap):.2%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"curve_{args.quant}.png"), dpi=100)
  except ImportError:
    pass
  print("RESULT", json.dumps({k: v for k, v in result.items() if k not in ("jlora", "peft")}))
  print("first/last losses  jlora", ours[0], ours[-1], "  peft", theirs[0], theirs[-1])


if __name__ == "__main__":
  main()
