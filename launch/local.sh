#!/usr/bin/env bash
# One host, all its accelerators (or CPU): a thin wrapper that keeps a log next to the run.
#
#   launch/local.sh configs/sit_xl.py workdirs/sit_xl --config.data.source=synthetic
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
mkdir -p "$workdir"
python -m groupdiff_jax.main --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/train.log"
