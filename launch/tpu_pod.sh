#!/usr/bin/env bash
# Cloud TPU VMs through a queued resource: one slice, or SLICES slices (multislice). Every job
# runs the same command on every worker of every slice. Run from the repository root.
#
#   export TPU_NAME=gdiff ZONE=us-east5-a PROJECT=my-project
#   export ACCEL=v5p-64 RUNTIME=v2-alpha-tpuv5   # slice type and TPU software version
#   export CAPACITY=spot                         # spot | reserved | on-demand (default: spot)
#   export SLICES=1                              # > 1: multislice, SLICES x ACCEL
#   launch/tpu_pod.sh create                     # queue the request
#   launch/tpu_pod.sh status                     # until the state is ACTIVE
#   launch/tpu_pod.sh setup                      # this checkout + a Python 3.11 venv everywhere
#   launch/tpu_pod.sh mount BUCKET               # gs://BUCKET at /gcs/BUCKET on every worker
#   launch/tpu_pod.sh train configs/sit_xl.py /gcs/BUCKET/runs/sit_xl [--config.a.b=v ...]
#   launch/tpu_pod.sh logs train                 # follow worker 0's log (~/groupdiff_train.log)
#   launch/tpu_pod.sh stop train                 # SIGTERM on every worker: save, then exit
#   launch/tpu_pod.sh sample configs/sample_sit_xl.py /gcs/BUCKET/samples \
#       --config.ckpt=/gcs/BUCKET/runs/sit_xl    # each process samples its own shards
#   launch/tpu_pod.sh merge /gcs/BUCKET/samples  # once every worker is done: samples.npz
#   launch/tpu_pod.sh encode configs/encode_imagenet.py /gcs/BUCKET/latents --config.vae_dir=...
#   launch/tpu_pod.sh embed configs/embed_dinov2_folder.py /gcs/BUCKET/emb --config.model_dir=...
#   launch/tpu_pod.sh neighbors configs/neighbors_default.py /gcs/BUCKET/nbrs \
#       --config.embeddings=/gcs/BUCKET/emb      # one process (CPU), on worker 0 of slice 0
#   launch/tpu_pod.sh delete                     # the queued resource and its TPU VMs
#
# Workdirs must be one file system that every worker sees at the same path (the Orbax
# checkpoint is written by all processes together): a Cloud Storage FUSE mount (`mount`, needs
# gcsfuse on the TPU VM image) or a Filestore NFS share. gs:// URLs are refused by the jobs.
# Multislice: --config.mesh.shape="(SLICES, -1, 1)" (data across slices, fsdp inside each);
# the TPU runtime sets the MEGASCALE_* variables, --distributed needs no other flag.
# A preempted spot slice gets SIGTERM: every process saves the same step and exits; `create`
# (once the old resource is deleted), `setup`, `mount` and the same `train` line resume it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCEL=${ACCEL:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
CAPACITY=${CAPACITY:-spot}
SLICES=${SLICES:-1}
REMOTE_DIR=${REMOTE_DIR:-groupdiff_jax}
PYTHON=${PYTHON:-3.11}
WHERE=(--zone "$ZONE" --project "$PROJECT")

# The first slice's TPU VM: TPU_NAME, or TPU_NAME-0 in a multislice request (node-prefix).
first_node() {
  if (( SLICES > 1 )); then echo "$TPU_NAME-0"; else echo "$TPU_NAME"; fi
}

# Runs a shell command on every worker of every slice.
on_all() {
  gcloud compute tpus queued-resources ssh "$TPU_NAME" "${WHERE[@]}" --node=all --worker=all \
    --command "$1"
}

# Runs a shell command on worker 0 of the first slice.
on_first() {
  gcloud compute tpus tpu-vm ssh "$(first_node)" "${WHERE[@]}" --worker=0 --command "$1"
}

# Starts `python -m groupdiff_jax.MODULE ARGS` in the background (on_all or on_first), logging
# to ~/groupdiff_JOB.log, its pid in ~/groupdiff_JOB.pid.
start() {
  local where=$1 job=$2 module=$3; shift 3
  local args; args=$(printf ' %q' "$@")
  local command="cd $REMOTE_DIR && nohup .venv/bin/python -m groupdiff_jax.$module$args"
  command+=" > ~/groupdiff_$job.log 2>&1 < /dev/null & echo \$! > ~/groupdiff_$job.pid"
  "$where" "$command"
  echo "started $job; follow it with: $0 logs $job"
}

case "${1:-}" in
  create)
    case "$CAPACITY" in
      spot) capacity=(--spot) ;; reserved) capacity=(--reserved) ;; on-demand) capacity=() ;;
      *) echo "CAPACITY=$CAPACITY: use spot, reserved or on-demand" >&2; exit 2 ;;
    esac
    if (( SLICES > 1 )); then placement=(--node-count "$SLICES" --node-prefix "$TPU_NAME")
    else placement=(--node-id "$TPU_NAME"); fi
    gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME" "${placement[@]}" \
      "${capacity[@]}" ;;
  status)
    gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
      --format='value(state.state)' ;;
  setup)
    tar czf /tmp/groupdiff_jax.tgz --exclude=.git --exclude=.venv --exclude=workdirs .
    gcloud compute tpus queued-resources scp /tmp/groupdiff_jax.tgz "$TPU_NAME": "${WHERE[@]}" \
      --node=all --worker=all
    # TPU VM images ship an older Python than jax needs: uv fetches PYTHON for the venv.
    on_all "mkdir -p $REMOTE_DIR && tar xzf groupdiff_jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR \
      && python3 -m pip install -q --user uv && python3 -m uv venv -q --python $PYTHON .venv \
      && python3 -m uv pip install -q --python .venv/bin/python -e '.[tpu]'" ;;
  mount)
    bucket=${2:?usage: $0 mount BUCKET}
    on_all "sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket \
      && gcsfuse --implicit-dirs $bucket /gcs/$bucket" ;;
  train)
    config=${2:?config file}; workdir=${3:?workdir}; shift 3
    start on_all train main --distributed "--config=$config" "--workdir=$workdir" "$@" ;;
  sample|encode|embed)
    job=$1; config=${2:?config file}; workdir=${3:?workdir}; shift 3
    start on_all "$job" "$job" --distributed "--config=$config" "--workdir=$workdir" "$@" ;;
  merge)
    on_first "cd $REMOTE_DIR && .venv/bin/python -m groupdiff_jax.sample merge ${2:?workdir}" ;;
  neighbors)
    config=${2:?config file}; workdir=${3:?workdir}; shift 3
    start on_first neighbors neighbors "--config=$config" "--workdir=$workdir" "$@" ;;
  logs)
    on_first "tail -n 100 -f ~/groupdiff_${2:-train}.log" ;;
  stop)
    on_all "kill \$(cat ~/groupdiff_${2:-train}.pid) 2>/dev/null || true" ;;
  delete)
    gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet ;;
  *)
    sed -n '/^set -euo/q;2,$p' "$0"; exit 2 ;;
esac
