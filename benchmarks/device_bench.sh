#!/usr/bin/env bash
# The one prepared accelerator run of the benchmarks (at most 9 minutes of a 15-minute device budget), in order of
# what matters most, each command with its own timeout under one deadline (--budget-s, 535 s):
#   1. versions, nvidia-smi                                                       -> env.txt
#   2. cuDNN's attention dropout against the XLA path: keep rate, forward values and the gradients of q, k, v, in
#      one call, a scan, a remat'd scan, the gradient cache's order and the layer loop m3jax uses
#      (benchmarks/cudnn_dropout.py)                                              -> cudnn_dropout.jsonl
#   3. the uncached step at the short shape as bge-m3 trains (attention dropout 0.1 on cuDNN, the layer loop,
#      remat none: 86.4 GiB on the H200), profiled (jax.profiler, reduced by benchmarks/profile_trace.py): the
#      gradient cache's baseline                                                  -> m3jax.jsonl, profiles.*
#   4. the gradient cache with chunks chosen by memory (--gradient-cache auto, remat none) at the short shape and
#      at 8x its batch (256x8:64:256), one process as a run starts: each candidate chunk compiled (bench.log has
#      one line per candidate), then the chosen step timed and profiled             -> m3jax.jsonl, profiles.*
#   5. the gradient cache with chunks of 16 rows (the old default) at both shapes -> m3jax.jsonl
#   6. the packed train step (config.packing) timed beside the padded one at the recipe's 48 x 8 queries x passages,
#      MS MARCO-shaped lengths (benchmarks/packing_train.py --time; bf16, remat full, XLA attention, the scan):
#      median step s, real tokens/s, packed / padded                            -> m3jax.jsonl
#   7. m3jax at the long shape, remat auto                                        -> m3jax.jsonl
#   8. our PyTorch reference step (benchmarks/torch_reference.py) at the long shape -> reference.jsonl
#   9. m3jax at the middle shape, remat full                                      -> m3jax.jsonl
#  10. the reference's largest batch at 8x8:512:8192 (runs steps until OOM), with what time is left -> reference.jsonl
# With the layer loop a bge-m3 shape compiles in about 100 s (the scan: 25 s); the cached step holds the encoder
# 1.5x as often (about 150 s, not measured). Chunk auto at 32x8 is one candidate compile (the whole batch fits) and
# at 256x8 about five (2048 rows, then a bisection), so step 4 may reach its timeout in the 256x8 search: its
# candidates' lines in bench.log still say which chunk fits. Steps 6-10 run only with time left over (at the
# estimates above, none is; step 6 compiles 1 padded and 1-3 packed shapes with the scan, about 25 s each). JAX_COMPILATION_CACHE_DIR is set so that the timed step can reuse the compile of the
# candidate chosen (compile_s says whether it did).
# A step that would start with less than 20 s left is skipped. Each command's exit status and time go to
# status.jsonl, stderr to bench.log; at most 8 files come back from the device tool, so profiles are gathered
# into profiles.md / profiles.jsonl (the traces themselves stay on the machine under /tmp/m3jax_profiles).
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
SHAPES="32x8:64:256"
MIDDLE="8x8:512:2048"
LONG="8x2:512:8192"
CACHE_SHAPES="32x8:64:256,256x8:64:256"
MAX_BATCH_SHAPE="8x8:512:8192"
PROFILES=/tmp/m3jax_profiles
REFERENCE="benchmarks/torch_reference.py"
WHEELS=""
BUDGET_S=535
DRY_RUN=0

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "options: --dry-run --out DIR --reference PATH --wheels DIR --python PY --shapes LIST --middle SHAPE"
  echo "         --long SHAPE --cache-shapes LIST --max-batch-shape SHAPE --budget-s SECONDS"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --reference) REFERENCE="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    --shapes) SHAPES="$2"; shift ;;
    --middle) MIDDLE="$2"; shift ;;
    --long) LONG="$2"; shift ;;
    --cache-shapes) CACHE_SHAPES="$2"; shift ;;
    --max-batch-shape) MAX_BATCH_SHAPE="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_bench.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

if [ -z "$WHEELS" ] && [ -d "$REPO/.whl" ]; then WHEELS="$REPO/.whl"; fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=.92
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/m3jax_xla_cache}"
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
  echo "export JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
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

# --- 2. cuDNN's attention dropout against the XLA path (issue 24) ----------------------------------------------
run "cudnn dropout" 50 cudnn_dropout.jsonl "$PYTHON" -m benchmarks.cudnn_dropout --rate 0.1 --layers 3

# --- 3. the uncached step at the short shape as bge-m3 trains (attention dropout 0.1 on cuDNN, the layer loop),
#        remat none (it fits: 86.4 GiB), profiled: the gradient cache's baseline ---------------------------------
run "m3jax $SHAPES" 150 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$SHAPES" --attention cudnn \
  --remat none --steps 4 --warmup 1 --profile "$PROFILES" --profile-steps 2

# --- 4. the gradient cache, chunks chosen by memory (issue 24): the largest chunk whose compiled step fits the
#        allocator's limit, per shape, then timed and profiled ---------------------------------------------------
run "m3jax gradient cache auto" 330 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$CACHE_SHAPES" \
  --attention cudnn --remat none --gradient-cache auto --steps 3 --warmup 1 --profile "$PROFILES" --profile-steps 2

# --- 5. the gradient cache with chunks of 16 rows, beside it ----------------------------------------------------
run "m3jax gradient cache 16" 300 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$CACHE_SHAPES" \
  --attention cudnn --remat none --gradient-cache 16 --steps 3 --warmup 1

# --- 6. the packed train step beside the padded one (issue 25): 4 batches' shapes compiled, 1 warm-up, 8 timed ----
run "packing train time" 180 m3jax.jsonl "$PYTHON" -m benchmarks.packing_train --time --layers 24 --batches 4 \
  --warmup 1 --steps 8 --remat full --attention xla

# --- 7. m3jax at the long shape, remat auto (the trainer's choice per shape) ----------------------------------
run "m3jax $LONG" 200 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$LONG" --attention cudnn \
  --remat auto --steps 4 --warmup 1

# --- 8. the PyTorch reference at the long shape ------------------------------------------------------------------
run "reference $LONG" 70 reference.jsonl "$PYTHON" "$REFERENCE" --configs "$LONG" --ckpt 1 --sub_batch auto

# --- 9. the middle shape -----------------------------------------------------------------------------------------
run "m3jax $MIDDLE" 130 m3jax.jsonl "$PYTHON" -m benchmarks.train_step --shapes "$MIDDLE" --attention cudnn \
  --remat full

# --- 10. the reference's largest batch at the max-batch shape (steps until OOM), with what time is left ----------
run "reference max batch $MAX_BATCH_SHAPE" 200 reference.jsonl "$PYTHON" "$REFERENCE" --find-max-batch \
  "$MAX_BATCH_SHAPE" --granularity 2 --steps 1 --warmup 1 --ckpt 1 --sub_batch auto

# --- profiles: the reduced tables into two files (the device tool brings back at most 8) -------------------------
if [ "$DRY_RUN" != 1 ]; then
  for d in "$PROFILES"/*/; do
    [ -f "$d/profile.md" ] || continue
    { echo "## $(basename "$d")"; cat "$d/profile.md"; echo; } >> "$OUT_DIR/profiles.md"
    { cat "$d/profile.json"; echo; } >> "$OUT_DIR/profiles.jsonl"
  done
fi

if [ "$DRY_RUN" != 1 ]; then
  echo "device_bench.sh: done in $(($(date +%s) - START)) s; results in $OUT_DIR" >&2
fi
