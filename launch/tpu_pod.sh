#!/usr/bin/env bash
# Run groupdiff_jax on a Cloud TPU VM pod slice: the same command on every worker.
#
#   export TPU_NAME=gdiff-v5p-64 ZONE=us-east5-a PROJECT=my-proj ACCEL=v5p-64 RUNTIME=v2-alpha-tpuv5
#   launch/tpu_pod.sh create            # (spot) queued resource / TPU VM
#   launch/tpu_pod.sh setup             # copy this checkout to every worker, pip install -e .[tpu]
#   launch/tpu_pod.sh train configs/sit_xl.py gs://bucket/runs/sit_xl [--config.x=y ...]
#   launch/tpu_pod.sh logs | kill | delete
#
# Workdirs on GCS work as-is (Orbax writes gs:// paths). A preempted spot slice gets SIGTERM;
# the trainer saves a checkpoint at the next step and `train` again resumes from it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
ACCEL=${ACCEL:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-groupdiff_jax}
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all)

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
      --accelerator-type "$ACCEL" --version "$RUNTIME" ${SPOT:+--spot} ;;
  setup)
    tar czf /tmp/groupdiff_jax.tgz --exclude=.git --exclude=.venv --exclude=workdirs .
    gcloud compute tpus tpu-vm scp /tmp/groupdiff_jax.tgz "$TPU_NAME":~ --zone "$ZONE" \
      --project "$PROJECT" --worker=all
    "${SSH[@]}" --command "mkdir -p $REMOTE_DIR && tar xzf groupdiff_jax.tgz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'" ;;
  train)
    config=${2:?config file}; workdir=${3:?workdir}; shift 3
    "${SSH[@]}" --command "cd $REMOTE_DIR && nohup .venv/bin/python -m groupdiff_jax.main \
      --distributed --config=$config --workdir=$workdir $* > ~/train.log 2>&1 & echo \$! > ~/train.pid" ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=0 \
      --command "tail -n 50 -f ~/train.log" ;;
  kill)
    "${SSH[@]}" --command "kill \$(cat ~/train.pid) 2>/dev/null || true" ;;  # SIGTERM: saves first
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --quiet ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
