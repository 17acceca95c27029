#!/usr/bin/env bash
# Every accelerator measurement in one call on a lent GPU machine, within
# about 8 minutes. Before the session, here: `bash benchmarks/device_wheels.sh`
# (the wheels the GPU image lacks, into .whl/). Then one call of the device
# tool, from the repository root:
#
#   run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=600)
#
# Each benchmark runs under its own time limit, so one that overruns costs
# only its own rows. Everything lands in $OUT: each benchmark's JSON and log,
# the machine's description, and benchmarks/RESULTS.md with a new section
# written by benchmarks/device_report.py. Copy that file back over ours.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SMALL=${SMALL:-0}  # 1: tiny sizes, to rehearse the script on a CPU
started=$(date +%s)

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# Compile once per program across the benchmarks below.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

{ date -u; nproc; free -g | head -2; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

bench() {  # bench NAME SECONDS COMMAND...: its log and exit status in $OUT
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s, $(( t0 - started ))s elapsed)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/status.txt"
  tail -n 15 "$OUT/$name.log"
}

if [ "$SMALL" = 1 ]; then
  bench train_step 300 python3 benchmarks/train_step.py --image_size 75 \
    --sizes 2 --dtypes bfloat16 float32 --steps 2 --json "$OUT/train_step.json"
  bench evaluate 300 python3 benchmarks/evaluate.py --images 64 \
    --batch_sizes 8 16 --reps 2 --json "$OUT/evaluate.json"
  bench loop 300 python3 benchmarks/loop.py --steps 20 --log_every 5 \
    --checkpoint_every 10 --num_images 400 --json "$OUT/loop.json"
  bench data 300 python3 benchmarks/data.py --copies 1 --batches 20 \
    --threads "$(nproc)" --workers 2 --json "$OUT/data.json"
  bench step_cost 300 python3 benchmarks/step_cost.py --models inception_v3 \
    --batch 2 --size 75 --dtypes bfloat16 --no_keras --json "$OUT/step_cost.json"
else
  # InceptionV3 at 299 px, the paper's model: per-device batch 16-256, bf16
  # first (the goal is >= 4,000 img/s in bf16 on one H100-class GPU).
  bench train_step 170 python3 benchmarks/train_step.py --sizes 64 128 256 16 \
    --dtypes bfloat16 float32 --steps 10 --json "$OUT/train_step.json"
  bench evaluate 80 python3 benchmarks/evaluate.py --depth_multiplier 1.0 \
    --image_size 299 --images 2048 --batch_sizes 64 128 256 512 --reps 10 \
    --loader_threads 16 --json "$OUT/evaluate.json"
  bench loop 120 python3 benchmarks/loop.py --depth_multiplier 1.0 \
    --image_size 299 --dtype bfloat16 --batch 64 --steps 150 --log_every 10 \
    --checkpoint_every 50 --loader_threads 16 --num_images 1000 \
    --json "$OUT/loop.json"
  bench data 60 python3 benchmarks/data.py --copies 10 --batches 300 \
    --threads 16 --workers 8 --json "$OUT/data.json"
  bench step_cost 60 python3 benchmarks/step_cost.py --models inception_v3 \
    --batch 64 --size 299 --dtypes bfloat16 --no_keras \
    --json "$OUT/step_cost.json"
fi

python3 benchmarks/device_report.py "$OUT" benchmarks/RESULTS.md \
  && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo "total $(( $(date +%s) - started ))s"
