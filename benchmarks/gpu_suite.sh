#!/usr/bin/env bash
# The benchmark suite on a GPU machine that has jax[cuda], torch and transformers but no network:
# TRL and its missing dependencies are installed from wheels in .whl/ (if present) into /tmp/site.
# Results go to ${OUT:-benchmarks/out}/gpu_*.json; render with `python benchmarks/common.py`.
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
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T=${BENCH_STEP_TIMEOUT:-150}
for case in tiny gpt2; do
    timeout "$T" python3 benchmarks/ppo.py --cases $case --iters 5 \
        --out "$OUT/gpu_jax_ppo_$case.json" | grep -E '"median"' | head -2
    timeout "$T" python3 benchmarks/baseline/trl_ppo.py --cases $case --warmup 2 --iters 5 \
        --out "$OUT/gpu_trl_ppo_$case.json" | grep -E '"median"' | head -2
done
timeout "$T" python3 benchmarks/train_steps.py --iters 5 --out "$OUT/gpu_jax_steps.json" \
    | grep -E '"median"'
timeout "$T" python3 benchmarks/baseline/trl_sft.py --warmup 2 --iters 5 --loss-type nll \
    --out "$OUT/gpu_trl_sft.json" | grep -E '"median"' | head -1
timeout "$T" python3 benchmarks/baseline/trl_reward.py --warmup 2 --iters 5 \
    --out "$OUT/gpu_trl_reward.json" | grep -E '"median"' | head -1
ls -la "$OUT"
