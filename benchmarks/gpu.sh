#!/usr/bin/env bash
# The device-side benchmarks in one command: bench_limit, bench_at_step and bench_mrc on one CUDA GPU
# with bf16 autocast + channels_last (the defaults there), each under a hard time limit; the whole
# script stays under 8 minutes (limits below add up to 7m20s) and prints every figure.
#
#   bash benchmarks/gpu.sh            # on a machine with a CUDA GPU
#   bash benchmarks/gpu.sh --dry      # a dry check on the CPU: same scripts, tiny sizes, ~1-3 minutes
#
# Python: $PYTHON if set, else .venv/bin/python if present, else python3 (needs torch with CUDA and
# this project's dependencies importable: run from the repository root or anywhere, it cd's there).
# Data: the real CIFAR-10 archive when found (--data-dir / RIFT_SHARED_DATA / ../shared/data);
# otherwise random images (timings only; said so in the output).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; fi
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi

if [[ $DRY == 1 ]]; then
  DEV=cpu
  LIMIT_ARGS="--width 8 --batch-size 16 --reps 1"
  STEP_ARGS="--width 8 --batch-size 16 --reps 1"
  MRC_ARGS="--width 8 --examples 64 --batch-size 64 --modules 4 --iterations 2"
  T_LIMIT=240; T_STEP=240; T_MRC=300
else
  DEV=cuda
  LIMIT_ARGS="--reps 5 --all"
  STEP_ARGS="--reps 5 --all"
  MRC_ARGS="--iterations 10 --memory"
  T_LIMIT=120; T_STEP=120; T_MRC=200
fi
COMMON="--device $DEV --allow-synthetic"

echo "== gpu.sh: device=$DEV dry=$DRY python=$PY"
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}", end="")
if torch.cuda.is_available():
    print(f", {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}, "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cudnn {torch.backends.cudnn.allow_tf32}")
else:
    print()
EOF
if [[ $DRY == 0 ]] && ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch; use --dry for the CPU check" >&2
  exit 2
fi

status=0
run() {  # run LIMIT_SECONDS TITLE COMMAND...
  local limit=$1 title=$2; shift 2
  echo; echo "== $title (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $title: exit $rc after $((SECONDS - t0))s"
  if [[ $rc != 0 ]]; then status=1; fi
}

run "$T_LIMIT" "bench_limit (achieved FLOP/s / best kernel, bf16)" "$PY" benchmarks/bench_limit.py $COMMON $LIMIT_ARGS
run "$T_STEP" "bench_at_step (PGD-10 AT step, ours vs plain fp32)" "$PY" benchmarks/bench_at_step.py $COMMON $STEP_ARGS
run "$T_MRC" "bench_mrc (MRC search, ours vs the authors' way)" "$PY" benchmarks/bench_mrc.py $COMMON $MRC_ARGS
echo; echo "== gpu.sh done in ${SECONDS}s (status $status)"
exit $status
