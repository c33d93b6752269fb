#!/usr/bin/env bash
# TPU slices on GKE through xpk (pip install xpk; it drives gcloud, kubectl and JobSet). xpk
# layers this checkout into a base image and runs the same command on every host of every slice.
# Run from the repository root.
#
#   export CLUSTER=gdiff PROJECT=my-project ZONE=us-east5-a
#   export TPU_TYPE=v5p-64 SLICES=1            # slice type; SLICES > 1: multislice
#   export CAPACITY=--spot                     # --spot | --reservation=RESERVATION | --on-demand
#   launch/gke_xpk.sh cluster                  # create the GKE cluster and its TPU node pools
#   launch/gke_xpk.sh storage BUCKET           # gs://BUCKET at /gcs in every workload
#   launch/gke_xpk.sh train gdiff-xl configs/sit_xl.py /gcs/runs/sit_xl [--config.a.b=v ...]
#   launch/gke_xpk.sh sample gdiff-sample configs/sample_sit_xl.py /gcs/samples \
#       --config.ckpt=/gcs/runs/sit_xl         # then merge once, on a single host:
#   TPU_TYPE=v5p-8 launch/gke_xpk.sh run gdiff-merge \
#       "python -m groupdiff_jax.sample merge /gcs/samples"
#   launch/gke_xpk.sh encode|embed NAME CONFIG WORKDIR [--config.a.b=v ...]
#   launch/gke_xpk.sh list                     # workloads and their state
#   launch/gke_xpk.sh logs gdiff-xl            # follow the first host's log (kubectl)
#   launch/gke_xpk.sh delete gdiff-xl          # stop a workload (SIGTERM: training saves first)
#   launch/gke_xpk.sh cluster-delete
#
# Preemption: evicted or preempted pods get SIGTERM, every process saves the same step and exits
# (status 143); xpk restarts the workload up to MAX_RESTARTS times (default 50) with the same
# command, which resumes from that checkpoint. Multislice: pass
# --config.mesh.shape="(SLICES, -1, 1)" (data across slices); JobSet and the TPU runtime set the
# coordinator and MEGASCALE_* variables, --distributed needs no other flag.
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}"
TPU_TYPE=${TPU_TYPE:-v5p-8}
SLICES=${SLICES:-1}
CAPACITY=${CAPACITY:---spot}
BASE_IMAGE=${BASE_IMAGE:-python:3.11}
MAX_RESTARTS=${MAX_RESTARTS:-50}
WHERE=(--cluster "$CLUSTER" --project "$PROJECT" --zone "$ZONE")

# Submits NAME running `pip install` and then COMMAND on every host.
workload() {
  local name=$1 command=$2
  xpk workload create "${WHERE[@]}" --workload "$name" --tpu-type "$TPU_TYPE" \
    --num-slices "$SLICES" --base-docker-image "$BASE_IMAGE" --script-dir . \
    --max-restarts "$MAX_RESTARTS" \
    --command "pip install -q -e '.[tpu]' && $command"
}

# `python -m groupdiff_jax.MODULE --distributed --config=CONFIG --workdir=WORKDIR ARGS`, quoted.
job_command() {
  local module=$1 config=$2 workdir=$3; shift 3
  echo "python -m groupdiff_jax.$module --distributed$(printf ' %q' "--config=$config" \
    "--workdir=$workdir" "$@")"
}

case "${1:-}" in
  cluster)
    read -r -a capacity <<< "$CAPACITY"
    xpk cluster create "${WHERE[@]}" --tpu-type "$TPU_TYPE" --num-slices "$SLICES" \
      "${capacity[@]}" ;;
  storage)
    bucket=${2:?usage: $0 storage BUCKET}
    xpk storage attach "$bucket" --type=gcsfuse --bucket="$bucket" "${WHERE[@]}" \
      --mount-point=/gcs --readonly=false --size=1 --auto-mount=true ;;
  train)
    name=${2:?workload name}; shift 2
    workload "$name" "$(job_command main "$@")" ;;
  sample|encode|embed)
    module=$1; name=${2:?workload name}; shift 2
    workload "$name" "$(job_command "$module" "$@")" ;;
  run)
    workload "${2:?workload name}" "${3:?command}" ;;
  list)
    xpk workload list "${WHERE[@]}" ;;
  logs)  # process 0 (job 0, host 0) prints the step lines
    pod=$(kubectl get pods -l "jobset.sigs.k8s.io/jobset-name=${2:?workload name}" -o name \
      | sort | head -n 1)
    kubectl logs -f "${pod:?no pod of workload $2 yet}" --tail=100 ;;
  delete)
    xpk workload delete "${WHERE[@]}" --workload "${2:?workload name}" ;;
  cluster-delete)
    xpk cluster delete "${WHERE[@]}" ;;
  *)
    sed -n '/^set -euo/q;2,$p' "$0"; exit 2 ;;
esac
