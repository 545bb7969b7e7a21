#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every node with the torchrun-style variables.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=12355 scripts/launch_multinode.sh \
#       configs/bge_m3_unified.py --config.output_dir=/shared/runs/m3        # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=12355 scripts/launch_multinode.sh ...   # on node 1
#
# NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR (node 0's address; required when NNODES > 1),
# MASTER_PORT (default 12355), NPROC_PER_NODE (default 1: one process drives all the node's GPUs; N > 1: N
# processes, process i sees only GPU i), PYTHON (default python). They map onto what m3jax's trainer reads:
#   M3JAX_COORDINATOR_ADDRESS=MASTER_ADDR:MASTER_PORT  M3JAX_NUM_PROCESSES=NNODES*NPROC_PER_NODE
#   M3JAX_PROCESS_ID=NODE_RANK*NPROC_PER_NODE+i
# and train.py runs in this checkout with the same config and overrides on every node.
# --dry-run as first argument (or DRY_RUN=1): print the commands instead of running them.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"  # q, qjoin
die() { echo "launch_multinode.sh: error: $*" >&2; exit 2; }
int() { [[ $2 =~ ^[0-9]+$ ]] || die "$1=$2: expected a non-negative integer"; }

DRY_RUN=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 1 && $1 != -* ]] || die "usage: [NNODES=.. NODE_RANK=.. MASTER_ADDR=.. MASTER_PORT=..] launch_multinode.sh CONFIG [--config.<field>=<value> ...]"
NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0} NPROC_PER_NODE=${NPROC_PER_NODE:-1} MASTER_PORT=${MASTER_PORT:-12355}
int NNODES "$NNODES"; int NODE_RANK "$NODE_RANK"; int NPROC_PER_NODE "$NPROC_PER_NODE"; int MASTER_PORT "$MASTER_PORT"
[[ $NNODES -ge 1 && $NPROC_PER_NODE -ge 1 ]] || die "NNODES and NPROC_PER_NODE must be at least 1"
[[ $NODE_RANK -lt $NNODES ]] || die "NODE_RANK=$NODE_RANK must be smaller than NNODES=$NNODES"
if [[ $NNODES -gt 1 && -z ${MASTER_ADDR:-} ]]; then die "MASTER_ADDR (the address of node 0) is required when NNODES > 1"; fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOTAL=$((NNODES * NPROC_PER_NODE))

commands=()
for ((i = 0; i < NPROC_PER_NODE; i++)); do
  ENV=()
  if [[ $TOTAL -gt 1 ]]; then
    ENV+=(M3JAX_COORDINATOR_ADDRESS="$MASTER_ADDR:$MASTER_PORT" M3JAX_NUM_PROCESSES="$TOTAL"
          M3JAX_PROCESS_ID="$((NODE_RANK * NPROC_PER_NODE + i))")
  fi
  [[ $NPROC_PER_NODE -gt 1 ]] && ENV+=(CUDA_VISIBLE_DEVICES="$i")
  if [[ ${#ENV[@]} -gt 0 ]]; then
    commands+=("$(qjoin env "${ENV[@]}" "$PYTHON" train.py --config "$@")")
  else
    commands+=("$(qjoin "$PYTHON" train.py --config "$@")")
  fi
done

if [[ $DRY_RUN == 1 ]]; then
  echo "cd $(q "$REPO")"
  printf '%s\n' "${commands[@]}"
  exit 0
fi
cd "$REPO"
if [[ $NPROC_PER_NODE -eq 1 ]]; then
  eval "exec ${commands[0]}"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for cmd in "${commands[@]}"; do
  eval "$cmd" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do  # first failure stops the node's other processes
  if ! wait "$pid"; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
