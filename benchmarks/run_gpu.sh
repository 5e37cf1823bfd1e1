#!/usr/bin/env bash
# The GPU benchmark calls, as run through the device tool (one mode per call):
#   bash benchmarks/run_gpu.sh tiny     # TinyLlama shape: jlora LoRA/QLoRA + the PEFT anchor
#   bash benchmarks/run_gpu.sh large    # 8B LoRA (jlora, PEFT) and 70B QLoRA (jlora)
#   bash benchmarks/run_gpu.sh peft70b  # 70B QLoRA with PEFT + bitsandbytes
#   bash benchmarks/run_gpu.sh probe    # kernel-time table, command buffers off, dequant alone
#   bash benchmarks/run_gpu.sh scale    # 8B LoRA scaling over 1/2/4 GPUs (needs nvidia-h200-x4; not yet run)
#   bash benchmarks/run_gpu.sh pair     # nvidia-h200-x2: two queues of one-GPU runs side by side:
#        GPU 0: jlora (this tree) vs the code before the jaxpr transformation (.bench_old,
#        exported with `git archive 29428b6 jlora benchmarks/train_step.py`), lora/qlora,
#        unrolled/scanned, chunked loss, frozen base, no sibling fusion;
#        GPU 1: qwix (its wheel in .whl), PEFT (+ bitsandbytes), the bank and the bf16 curve
#   bash benchmarks/run_gpu.sh methods  # full fine-tune and BitFit beside the PyTorch full-FT anchor, then IA³,
#                                       # bottleneck adapters, prompt and prefix tuning (TinyLlama shape)
#   bash benchmarks/run_gpu.sh scale2   # 8B LoRA on 1 and 2 GPUs: data, FSDP, pipeline (GPipe, 1F1B) + cost model
#   bash benchmarks/run_gpu.sh scale2q  # 70B QLoRA on 1 and 2 GPUs: FSDP and pipeline + cost model
# bitsandbytes travels as a wheel in .whl/ (ignored by git) and goes to /tmp/site,
# so nothing replaces the image's CUDA jax or torch. Logs and traces go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
run() { echo "+ $*"; "$@" 2>&1 | grep -v Warning | tail -4; }
full() { echo "+ $*"; "$@" 2>&1 | grep -v "Warning\|it/s]"; }
case "$1" in
  tiny)  # the BENCHMARKS.md workload, jlora (unrolled and scanned layers) then the anchor
    for v in lora qlora; do
      run python3 benchmarks/train_step.py $v --scan 0
      run python3 benchmarks/train_step.py $v --scan 1
    done
    run python3 benchmarks/peft_baseline.py lora qlora ;;
  large)
    run python3 benchmarks/train_step.py lora --preset llama-3-8b --batch 2 --scan 1
    run python3 benchmarks/peft_large.py lora8b
    run python3 benchmarks/train_step.py qlora --preset llama-3-70b --batch 1 --remat full --scan 1 ;;
  peft70b)
    run python3 benchmarks/peft_large.py qlora70b ;;
  scale)  # 8B LoRA on 1, 2, 4 GPUs (kind nvidia-h200-x4): data parallel and FSDP, 2 sequences a GPU
    for n in 1 2 4; do
      run python3 benchmarks/train_step.py lora --preset llama-3-8b --scan 1 --batch $((2 * n)) --mesh $n,1,1
      run python3 benchmarks/train_step.py lora --preset llama-3-8b --scan 1 --batch $((2 * n)) --mesh 1,$n,1
      if [ "$n" -gt 1 ]; then   # the layers in n stages, 2 microbatches a stage
        run python3 benchmarks/train_step.py lora --preset llama-3-8b --batch $((2 * n)) --pipeline $n,$((2 * n)),gpipe
      fi
    done ;;
  scale2|scale2q)  # 1 GPU, then 2 GPUs (kind nvidia-h200-x2) as data, FSDP and pipeline meshes;
    # each RESULT line holds the cost model's prediction, plain and calibrated on the 1-GPU step
    if [ "$1" = scale2 ]; then
      common="lora --preset llama-3-8b --scan 1 --steps 4 --warmup 2 --hardware h200"; b=2
    else
      common="qlora --preset llama-3-70b --scan 1 --remat full --steps 3 --warmup 2 --hardware h200"; b=1
    fi
    one=$(python3 benchmarks/train_step.py $common --batch $b 2>&1 | grep '^RESULT' | tail -1)
    echo "$one"
    cal=$(printf '%s' "$one" | python3 -c 'import sys, json; print(json.loads(sys.stdin.read()[7:])["step_s"])' 2>/dev/null)
    common="$common ${cal:+--calibrate $cal}"
    run python3 benchmarks/train_step.py $common --batch $((2 * b)) --mesh 2,1,1
    run python3 benchmarks/train_step.py $common --batch $((2 * b)) --mesh 1,2,1
    run python3 benchmarks/train_step.py $common --batch $((2 * b)) --pipeline 2,$((2 * b)),gpipe
    if [ "$1" = scale2 ]; then
      run python3 benchmarks/train_step.py $common --batch 4 --pipeline 2,4,1f1b
    fi ;;
  probe)  # where the time goes: kernel table, XLA command buffers off, the dequant kernel
    run python3 benchmarks/train_step.py lora --scan 0 --profile "$OUT/prof"
    python3 benchmarks/kernels.py "$OUT/prof" --top 30
    cp "$(find "$OUT/prof" -name perfetto_trace.json.gz | head -1)" "$OUT/lora.json.gz"
    rm -rf "${OUT:?}/prof"
    XLA_FLAGS=--xla_gpu_enable_command_buffer= run python3 benchmarks/train_step.py lora --scan 0
    run python3 benchmarks/dequant.py ;;
  pair)
    T="python3 benchmarks/train_step.py"
    # a quick smoke run first: stop here (not minutes later) if this image breaks something
    set -o pipefail
    $T lora --preset tiny --batch 2 --seq 64 --steps 2 2>&1 | grep RESULT | cut -c1-120 || exit 1
    python3 benchmarks/bank.py --preset tiny --rows 8 --new 4 --seq 32 2>&1 | tail -3 || exit 1
    set +o pipefail
    ( export CUDA_VISIBLE_DEVICES=0
      for v in "lora --scan 0" "qlora --scan 0" "lora --scan 1" "qlora --scan 1"; do
        full $T $v
        (cd .bench_old && PYTHONPATH=$PWD:/tmp/site full python3 benchmarks/train_step.py $v)
      done
      full $T lora --scan 0 --loss chunked
      full $T qlora --scan 0 --loss chunked
      full $T lora --scan 0 --loss chunked --frozen
      full $T lora --scan 0 --fuse 0
    ) > "$OUT/gpu0.log" 2>&1 &
    ( export CUDA_VISIBLE_DEVICES=1
      full python3 benchmarks/qwix_llama.py lora --skip-check
      full python3 benchmarks/qwix_llama.py lora --frozen --skip-check
      full python3 benchmarks/qwix_llama.py qlora --skip-check
      full python3 benchmarks/peft_baseline.py lora frozen full qlora
      full python3 benchmarks/bank.py
      XLA_PYTHON_CLIENT_PREALLOCATE=false full python3 benchmarks/curve.py --out "$OUT"
    ) > "$OUT/gpu1.log" 2>&1 &
    wait
    grep -h "^+ \|RESULT\|^peft_\|^full_ft\|Error\|error" "$OUT"/gpu*.log | python3 benchmarks/summary.py ;;
  rest)  # (nvidia-h200-x2) the second pair of queues: scanned new/old, compile time again,
    # memory (remat), full fine-tune and BitFit beside the PyTorch anchor, the bank, the curve
    T="python3 benchmarks/train_step.py"
    ( export CUDA_VISIBLE_DEVICES=0
      for v in "lora --scan 1" "qlora --scan 1" "lora --scan 0"; do
        full $T $v
        (cd .bench_old && PYTHONPATH=$PWD:/tmp/site full python3 benchmarks/train_step.py $v)
      done
      XLA_PYTHON_CLIENT_PREALLOCATE=false full python3 benchmarks/curve.py --out "$OUT"
    ) > "$OUT/gpu0.log" 2>&1 &
    ( export CUDA_VISIBLE_DEVICES=1
      full $T full --scan 0
      full $T bitfit --scan 0
      full python3 benchmarks/peft_baseline.py full
      full $T lora --scan 0 --loss chunked --remat dots_no_batch
      full python3 benchmarks/bank.py
    ) > "$OUT/gpu1.log" 2>&1 &
    wait
    grep -h "^+ \|RESULT\|^peft_\|^full_ft\|Error\|error" "$OUT"/gpu*.log | python3 benchmarks/summary.py ;;
  methods)  # the fine-tuning family (docs/methods.md), one process per row, the anchor in the same call
    for v in full bitfit; do
      run python3 benchmarks/train_step.py $v --scan 0
    done
    run python3 benchmarks/peft_baseline.py full
    for v in ia3 adapter prompt prefix; do
      run python3 benchmarks/train_step.py $v --scan 0
    done ;;
  *) echo "usage: bash benchmarks/run_gpu.sh tiny|large|peft70b|probe|scale|scale2|scale2q|pair|methods" >&2; exit 2 ;;
esac
