#!/usr/bin/env bash
# Downloads the wheels that a CUDA/TPU machine image with jax, flax, optax and orbax preinstalled
# usually lacks, for a machine without access to the package index (see launch/gpu_bench.sh).
#
#   launch/download_wheels.sh DIR [PYTHON_VERSION]     # e.g. launch/download_wheels.sh .wheels 3.12
set -euo pipefail
dir=${1:?usage: launch/download_wheels.sh DIR [PYTHON_VERSION]}
version=${2:-3.12}
python3 -m pip download -q -d "$dir" --only-binary=:all: --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --python-version "$version" \
  grain ml_collections scann tensorflow-datasets importlib_resources
echo "wheels for Python $version in $dir; copy the folder next to the repository and run"
echo "  WHEELS=$dir launch/gpu_bench.sh"
