#!/usr/bin/env bash
# GPU validation (issues 2, 3, 5, 7, 8): the CUDA tests, the >2^31-element check, the GPU
# benchmark sweep (the fused loss on both launch grids: "ours", a program per row, and
# "ours persistent", a program per SM looping over rows), the LM-head memory check; a short
# table printed last.
#
#   bench/gpu_check.sh                 # results in bench/results/
#   OUT=/some/dir bench/gpu_check.sh   # results in $OUT
#
# Sized for under 5 minutes on one H100: every step has its own timeout (knobs below, in
# seconds; they add up to 285), and the sweep writes a partial JSON after each row and runs
# the largest shape (16384 x 151936 bf16: the targets, and 2.49e9 elements, past 2^31)
# first, so a cut-off run still holds what matters.
# Uses the machine's python3 as it is (torch + triton + pytest + hypothesis + tabulate +
# matplotlib + tqdm): no venv, no package index. Wheels carried in .whl/ (liger-kernel, for
# the Liger baseline) are installed with --no-index --no-deps first.
# Knobs: PYTHON; TESTS_TIMEOUT (65), BIG_TIMEOUT (40), SWEEP_TIMEOUT (150),
# MEMORY_TIMEOUT (30), VERL_TIMEOUT (300, only with verl and vLLM installed); SWEEP_ARGS
# (extra arguments for python -m bench).
# Files in $OUT (at most 8): cuda-tests.log, big_tensor_check.json, sweep.log,
# <card>-<date>.json and .png, memory_linear.json, extras.log.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET                 # the real kernels, compiled for the GPU
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
rc=0
step() {   # step NAME TIMEOUT LOGFILE CMD...: run with a timeout, log to a file, keep going
    local name=$1 limit=$2 logfile=$3; shift 3
    log "$name (timeout ${limit}s)"
    timeout -k 10 "$limit" "$@" >> "$logfile" 2>&1
    local t=$?
    [ $t -eq 0 ] || { log "$name: failed or timed out (exit $t), see $logfile"; rc=1; }
    return 0
}

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if compgen -G ".whl/*.whl" > /dev/null; then
    log "installing carried wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || log "wheel install failed; going on"
fi
timeout 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'NO CUDA DEVICE')" || exit 1

: > "$OUT/cuda-tests.log"
# Compiling each kernel variant dominates a fresh machine's test time: with pytest-xdist
# (in the GPU image) four processes compile side by side on the GPU machine's cores.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
step "CUDA tests: pytest -m cuda tests/ ${XDIST[*]}" "${TESTS_TIMEOUT:-65}" \
    "$OUT/cuda-tests.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider "${XDIST[@]}" tests/
tail -n 15 "$OUT/cuda-tests.log"

: > "$OUT/extras.log"
if [ -f bench/big_tensor_check.py ]; then
    step "logits over 2^31 elements: bench/big_tensor_check.py" "${BIG_TIMEOUT:-40}" \
        "$OUT/extras.log" "$PY" bench/big_tensor_check.py --out-dir "$OUT"
fi

# torch.compile only for the token-level loss at 16384 x 151936: each compile (and each
# new shape's recompile) costs ~30-60 s. The ops most targets are about come first.
: > "$OUT/sweep.log"
step "GPU sweep: python -m bench" "${SWEEP_TIMEOUT:-150}" "$OUT/sweep.log" \
    "$PY" -m bench --device cuda --check --compile loss_token --compile-at largest \
    --ops loss_token sls_nograd loss_seq sls_grad advantages \
    --max-seconds 0.5 --out-dir "$OUT" ${SWEEP_ARGS:-}
grep -v "benchmark:" "$OUT/sweep.log" | tail -n 50

if [ -f bench/memory_linear.py ]; then
    step "LM-head + loss peak memory: python -m bench.memory_linear" "${MEMORY_TIMEOUT:-30}" \
        "$OUT/extras.log" "$PY" -m bench.memory_linear --device cuda \
        --json "$OUT/memory_linear.json"
fi
tail -n 20 "$OUT/extras.log"

# HAPO end to end in verl's Ray trainer (vLLM rollouts, FSDP actor, a tiny random model):
# only where verl and vLLM are installed; otherwise said so, and nothing counted.
if "$PY" -c "import verl, vllm, ray" 2>/dev/null; then
    step "verl + HAPO: python -m bench.verl_run (2 steps)" "${VERL_TIMEOUT:-300}" \
        "$OUT/extras.log" "$PY" -m bench.verl_run --out "$OUT/verl_run" --steps 2
else
    log "verl + HAPO Ray run: skipped (verl, vllm or ray not installed)"
fi

log "summary (exit $rc)"
"$PY" -m bench.report "$OUT"
exit $rc
