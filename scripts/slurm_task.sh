#!/usr/bin/env bash
# One SLURM task of scripts/launch_slurm.sbatch: M3JAX_PROCESS_ID from SLURM_PROCID, then train.py.
#
#   srun ... scripts/slurm_task.sh CONFIG [--config.<field>=<value> ...]
#
# Expects M3JAX_COORDINATOR_ADDRESS, M3JAX_NUM_PROCESSES, M3JAX_REPO and M3JAX_PYTHON from the batch script.
# With M3JAX_GPU_PER_TASK=1 (several tasks per node) the task sees only GPU $SLURM_LOCALID.
# DRY_RUN=1: print the command instead of running it.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"  # q, qjoin

[[ $# -ge 1 ]] || { echo "slurm_task.sh: error: usage: slurm_task.sh CONFIG [overrides ...]" >&2; exit 2; }
: "${SLURM_PROCID:?slurm_task.sh runs under srun}" "${M3JAX_COORDINATOR_ADDRESS:?}" "${M3JAX_NUM_PROCESSES:?}"
ENV=(M3JAX_COORDINATOR_ADDRESS="$M3JAX_COORDINATOR_ADDRESS" M3JAX_NUM_PROCESSES="$M3JAX_NUM_PROCESSES"
     M3JAX_PROCESS_ID="$SLURM_PROCID")
[[ ${M3JAX_GPU_PER_TASK:-0} == 1 ]] && ENV+=(CUDA_VISIBLE_DEVICES="${SLURM_LOCALID:?}")
REPO=${M3JAX_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CMD=(env "${ENV[@]}" "${M3JAX_PYTHON:-python}" train.py --config "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
  echo "cd $(q "$REPO") && $(qjoin "${CMD[@]}")"
  exit 0
fi
cd "$REPO"
exec "${CMD[@]}"
