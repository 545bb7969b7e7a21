#!/usr/bin/env bash
# The one prepared accelerator run of the benchmarks (about 9.5 minutes of a 15-minute device budget):
#   1. versions, nvidia-smi                                                       -> env.txt
#   2. our PyTorch reference step (benchmarks/torch_reference.py), three shapes  -> reference.jsonl
#   3. m3jax's train step at the same shapes, cuDNN attention, remat full, one process per shape (so that each
#      peak_gib is that shape's own)                                              -> m3jax.jsonl
#   4. the largest per-device batch at 512/8192 tokens, train_group_size 8: compiled memory analysis against the
#      allocator's limit, then the step timed at the batch found                  -> maxbatch.jsonl
#      and the same search with --sub-batch-size 1 --remat none (no step timed)   -> maxbatch.jsonl
#   5. m3jax with the gradient cache (chunks of 16 rows, remat none) at 32x8 and 256x8:64:256 -> m3jax.jsonl
#   6. m3jax at the two shorter shapes with the alternative remat policy           -> m3jax.jsonl
# Every command has its own timeout and the whole script a deadline (--budget-s): a step that would start with
# less than 20 s left is skipped. Each command's exit status and time go to status.jsonl, stderr to bench.log.
# JSON lines go to $OUT (the device tool's result folder) or --out DIR (default runs/device_bench).
#
#   bash benchmarks/device_bench.sh --dry-run                 # print the commands, run nothing
#   bash benchmarks/device_bench.sh --wheels runs/wheels
#
# It runs from the repository root (`python -m benchmarks.train_step`, `python benchmarks/torch_reference.py`).
# Python packages the machine lacks (grain, ml-collections, array-record, portpicker, importlib_resources) travel
# as wheels in --wheels DIR (BENCHMARKS.md has the download command); they are installed into /tmp/site.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-$REPO/runs/device_bench}"
SHAPES="32x8:64:256,8x8:512:2048,8x2:512:8192"
ALT_SHAPES="32x8:64:256,8x8:512:2048"
ALT_REMAT="dots_no_batch"
CACHE_SHAPES="32x8:64:256,256x8:64:256"
MAX_BATCH_SHAPE="8x8:512:8192"
REFERENCE="benchmarks/torch_reference.py"
WHEELS=""
BUDGET_S=570
DRY_RUN=0

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "options: --dry-run --out DIR --reference PATH --wheels DIR --python PY --shapes LIST --alt-remat POLICY"
  echo "         --alt-shapes LIST --cache-shapes LIST --max-batch-shape SHAPE --budget-s SECONDS"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --reference) REFERENCE="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    --shapes) SHAPES="$2"; shift ;;
    --alt-shapes) ALT_SHAPES="$2"; shift ;;
    --cache-shapes) CACHE_SHAPES="$2"; shift ;;
    --alt-remat) ALT_REMAT="$2"; shift ;;
    --max-batch-shape) MAX_BATCH_SHAPE="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_bench.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$WHEELS" ] && [ -d "$REPO/.whl" ]; then WHEELS="$REPO/.whl"; fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=.92
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
cd "$REPO"

START=$(date +%s)

# Shell words as a person would type them: plain ones bare, others in single quotes.
quote_args() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

# run NAME TIMEOUT_S OUTFILE CMD...: stdout appended to OUTFILE, stderr to bench.log, status to status.jsonl.
run() {
  local name="$1" limit="$2" outfile="$3"
  shift 3
  if [ "$DRY_RUN" = 1 ]; then
    printf 'timeout -k 10 %s %s >> %s\n' "$limit" "$(quote_args "$@")" "$OUT_DIR/$outfile"
    return 0
  fi
  local now left t0 rc
  now=$(date +%s)
  left=$((BUDGET_S - (now - START)))
  if [ "$left" -lt 20 ]; then
    printf '{"step": "%s", "skipped": "deadline", "elapsed_s": %d}\n' "$name" "$((now - START))" \
      | tee -a "$OUT_DIR/status.jsonl"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$OUT_DIR/bench.log" >&2
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$OUT_DIR/$outfile" 2>> "$OUT_DIR/bench.log"
  rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" | tee -a "$OUT_DIR/status.jsonl"
  tail -n 3 "$OUT_DIR/$outfile" 2>/dev/null | cut -c1-400
}

if [ "$DRY_RUN" = 1 ]; then
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
else
  mkdir -p "$OUT_DIR"
fi

# --- 0. carried wheels ----------------------------------------------------------------------------------------
if [ -n "$WHEELS" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    echo "$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS/*.whl"
  else
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl >> "$OUT_DIR/bench.log" 2>&1 || echo "wheel install failed (see bench.log)" >&2
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- 1. versions ----------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  echo "nvidia-smi >> $OUT_DIR/env.txt"
else
  { date -u; nvidia-smi 2>&1 | head -20; } >> "$OUT_DIR/env.txt"
fi
run env 60 env.txt "$PYTHON" -m benchmarks.train_step --env

# --- 2. the PyTorch reference ---------------------------------------------------------------------------------
run reference 150 reference.jsonl "$PYTHON" "$REFERENCE" --configs "$SHAPES" --ckpt 1 --sub_batch auto

# --- 3. m3jax, one process per shape --------------------------------------------------------------------------
IFS=',' read -r -a SHAPE_LIST <<< "$SHAPES"
for shape in "${SHAPE_LIST[@]}"; do
  run "m3jax $shape" 100 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$shape" --attention cudnn --remat full
done

# --- 4. max batch at 512/8192, group 8 -------------------------------------------------------------------------
run "max batch $MAX_BATCH_SHAPE" 220 maxbatch.jsonl "$PYTHON" -m benchmarks.train_step --find-max-batch "$MAX_BATCH_SHAPE" \
  --memory-budget-gib auto --granularity 4 --verify --steps 2 --warmup 1 --attention cudnn --remat full

# --- 4b. the same search with passages encoded one per chunk and no per-layer remat (same FLOPs as 4) -----------
run "max batch $MAX_BATCH_SHAPE sub-batch 1" 150 maxbatch.jsonl "$PYTHON" -m benchmarks.train_step --find-max-batch \
  "$MAX_BATCH_SHAPE" --memory-budget-gib auto --granularity 4 --attention cudnn --remat none --sub-batch-size 1

# --- 5. the gradient cache (issue 13): the same step, chunks of 16 rows re-encoded instead of remat; 32x8 is the
#        uncached step 3 shape (speed per token side by side), 256x8 a batch the uncached step does not reach ------
run "m3jax gradient cache" 150 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$CACHE_SHAPES" \
  --attention cudnn --remat none --gradient-cache 16

# --- 6. the alternative remat policy ---------------------------------------------------------------------------
run "m3jax remat $ALT_REMAT" 120 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$ALT_SHAPES" --attention cudnn \
  --remat "$ALT_REMAT"

if [ "$DRY_RUN" != 1 ]; then
  echo "device_bench.sh: done in $(($(date +%s) - START)) s; results in $OUT_DIR" >&2
fi
