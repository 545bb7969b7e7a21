#!/usr/bin/env bash
# Launch m3jax training on every worker of a Cloud TPU VM (a pod slice such as v4-32 or v5p-64).
#
#   scripts/launch_tpu_pod.sh --name my-tpu --zone us-central2-b --config configs/bge_m3_unified.py \
#       [--project P] [--create --accelerator-type v4-32 --version tpu-ubuntu2204-base [--spot]] \
#       [--skip-install] [--detach] [--dry-run] [-- --config.output_dir=gs://b/run --config.learning_rate=1e-5 ...]
#
# Steps (each a command printed by --dry-run / DRY_RUN=1 instead of being run):
#   1. with --create: gcloud compute tpus tpu-vm create
#   2. unless --skip-install: pack this source tree (tar), copy it to every worker (tpu-vm scp --worker=all),
#      unpack it in --remote-dir and pip install jax[tpu] and the package with its gcs extra (gcsfs, for gs://
#      paths) there (tpu-vm ssh --worker=all)
#   3. run `python train.py --config CONFIG <overrides>` in --remote-dir on all workers at once
#      (tpu-vm ssh --worker=all). jax finds the other hosts of the slice itself; every worker runs the same
#      command with the same config. --detach runs it under nohup (log: <remote-dir>/train.log) so that it
#      survives the ssh session; otherwise the output of all workers streams to this terminal.
# Everything after `--` is passed to train.py verbatim (quoted for the remote shell), typically
# --config.<field>=<value> overrides. Put output_dir on storage every worker can reach (e.g. gs://...).
# gs:// works for output_dir (checkpoints, metrics.jsonl, TensorBoard, base_model/: read and written in place, every
# worker resumes from it), eval.corpus/queries/qrels (read in place), model_name_or_path and train_data (staged:
# copied once to each worker's $M3JAX_CACHE_DIR, default ~/.cache/m3jax). The gs:// paths of the overrides are
# listed on stderr.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

. "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"  # q, qjoin
run() {  # print (dry run) or execute one command
  if [[ $DRY_RUN == 1 ]]; then qjoin "$@"; echo; else "$@"; fi
}
die() { echo "launch_tpu_pod.sh: error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
NAME="" ZONE="" PROJECT="" CONFIG="" CREATE=0 ACCELERATOR="" VERSION="" SPOT=0 INSTALL=1 DETACH=0
REMOTE_DIR=m3jax PYTHON=python3 JAX_SPEC='jax[tpu]'
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) NAME=${2:?}; shift 2 ;;
    --zone) ZONE=${2:?}; shift 2 ;;
    --project) PROJECT=${2:?}; shift 2 ;;
    --config) CONFIG=${2:?}; shift 2 ;;
    --create) CREATE=1; shift ;;
    --accelerator-type) ACCELERATOR=${2:?}; shift 2 ;;
    --version) VERSION=${2:?}; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --detach) DETACH=1; shift ;;
    --remote-dir) REMOTE_DIR=${2:?}; shift 2 ;;
    --python) PYTHON=${2:?}; shift 2 ;;
    --jax-spec) JAX_SPEC=${2:?}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (train.py overrides go after --; see --help)" ;;
  esac
done
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
[[ -n $CONFIG ]] || die "--config is required"
if [[ $CREATE == 1 ]]; then
  [[ -n $ACCELERATOR && -n $VERSION ]] || die "--create needs --accelerator-type and --version"
fi
# A config inside this checkout is addressed relative to it (the workers get a copy of the checkout).
case $CONFIG in
  "$REPO"/*) CONFIG=${CONFIG#"$REPO"/} ;;
  /*) ;;
  *) [[ -f $REPO/$CONFIG || $DRY_RUN == 1 ]] || die "config $CONFIG not found in $REPO" ;;
esac

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_FLAGS+=(--project="$PROJECT")

if [[ $CREATE == 1 ]]; then
  CREATE_CMD=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR"
              --version="$VERSION")
  [[ $SPOT == 1 ]] && CREATE_CMD+=(--spot)
  run "${CREATE_CMD[@]}"
fi

if [[ $INSTALL == 1 ]]; then
  ARCHIVE=${TMPDIR:-/tmp}/m3jax-src-$NAME.tar.gz
  run tar -czf "$ARCHIVE" --exclude=.git --exclude=.venv --exclude=runs --exclude=work_dirs \
      --exclude=__pycache__ --exclude='*.egg-info' -C "$REPO" .
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:m3jax-src.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  INSTALL_CMD="set -e; rm -rf $(q "$REMOTE_DIR"); mkdir -p $(q "$REMOTE_DIR"); tar -xzf m3jax-src.tar.gz -C $(q "$REMOTE_DIR"); $(q "$PYTHON") -m pip install -U $(q "$JAX_SPEC"); $(q "$PYTHON") -m pip install -e $(q "$REMOTE_DIR[gcs]")"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$INSTALL_CMD"
fi

# Say what the workers do with each gs:// path (stderr: stdout is the commands alone).
for arg in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  case $arg in
    --config.output_dir=gs://*) echo "output_dir ${arg#*=}: read and written in place by every worker" >&2 ;;
    --config.model_name_or_path=gs://*|--config.train_data=*gs://*)
      echo "${arg%%=*}: ${arg#*=} is staged (copied once to each worker's \$M3JAX_CACHE_DIR)" | sed 's/^--config.//' >&2 ;;
    --config.eval.*=gs://*) echo "${arg%%=*}: ${arg#*=} is read in place" | sed 's/^--config.//' >&2 ;;
  esac
done

TRAIN=$(qjoin "$PYTHON" train.py --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
if [[ $DETACH == 1 ]]; then
  TRAIN_CMD="cd $(q "$REMOTE_DIR") && nohup $TRAIN > train.log 2>&1 < /dev/null &"
else
  TRAIN_CMD="cd $(q "$REMOTE_DIR") && $TRAIN"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$TRAIN_CMD"
