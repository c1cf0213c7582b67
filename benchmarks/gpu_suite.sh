#!/usr/bin/env bash
# The GPU benchmarks in one command (one GPU, about 10 minutes), each step under its own time limit
# so that a slow one cannot take the others with it:
#   1. benchmarks/gpu_scale.py: bf16 matmul rate, bandwidth, our PPO iteration at GPT-2-124M
#      (batch 64, 64 + 64 tokens, f32/TF32) and at a 1.1B Llama shape (bf16), the update's MFU,
#      sampling at batch 128 against the bandwidth bound;
#   2. TRL's PPO iteration at the same GPT-2 case (benchmarks/baseline/trl_ppo.py --cases gpt2-b64);
#   3. HF generate vs our sampler at batch 128, 64 + 128 tokens, f32 and bf16 on both sides;
#   4. LoRA vs full fine-tuning, one PPO iteration at SmolLM2-135M shapes (benchmarks/lora.py,
#      the CPU case of RESULTS.md; LORA_CASES=tiny checks the step on a CPU in a minute).
# The machine needs jax[cuda], torch and transformers; TRL and anything else missing can be
# installed from wheels in .whl/ (if present) into /tmp/site, with no network.
# Results go to ${OUT:-benchmarks/out}/gpu_*; RESULTS.md's H200 section is written from them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export BENCH_TORCH_DEVICE=cuda PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout "${GPU_SCALE_TIMEOUT:-270}" python3 benchmarks/gpu_scale.py \
    --out "$OUT/gpu_scale.json" 2>&1 | grep -v '^ \|^{\|^}' | tee "$OUT/gpu_scale.log"
timeout "${TRL_TIMEOUT:-90}" python3 benchmarks/baseline/trl_ppo.py --cases gpt2-b64 \
    --warmup 1 --iters 3 --out "$OUT/gpu_trl_ppo_gpt2_b64.json" 2>&1 \
    | grep -E '^# trl|Error|error' | tee "$OUT/gpu_trl.log"
timeout "${GEN_TIMEOUT:-80}" python3 benchmarks/generation.py --configs gpt2 --batch-sizes 128 \
    --new-tokens 128 --repeats 3 --compute-dtype bfloat16 --hf-bf16 2>&1 \
    | grep -v Warning | tee "$OUT/gpu_generation.md"
timeout "${LORA_TIMEOUT:-120}" python3 benchmarks/lora.py --cases ${LORA_CASES:-smollm2} \
    --warmup 1 --iters 5 --out "$OUT/gpu_lora.json" 2>&1 | grep -v Warning | tee "$OUT/gpu_lora.log"
ls -la "$OUT"
