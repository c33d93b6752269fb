#!/usr/bin/env bash
# One-shot GPU check for an H100/H200 (or any CUDA machine with jax[cuda] preinstalled): installs
# what is missing, then prints the BENCHMARKS.md tables.
#
#   launch/gpu_bench.sh                    # a machine that reaches the package index
#   WHEELS=.wheels launch/gpu_bench.sh     # an offline machine: wheels made beforehand with
#                                          #   launch/download_wheels.sh .wheels 3.12
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
PACKAGES=(grain ml_collections scann tensorflow-datasets importlib_resources)
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --find-links "$WHEELS" "${PACKAGES[@]}" || exit 1
else
  python3 -m pip install -q "${PACKAGES[@]}" || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# cuDNN attention against the float32 reference (fwd + grad), and the GPU-marked tests.
python3 -m pytest -q -m gpu tests/test_attention.py
# SiT-XL/2, global batch 256, bf16, GroupDiff-l at N = 1, 4, 16, then -f at N = 4.
python3 -m groupdiff_jax.bench --config=configs/sit_xl.py --config.data.source=synthetic \
  --group_sizes=1,4,16 --steps=10
python3 -m groupdiff_jax.bench --config=configs/sit_xl.py --config.data.source=synthetic \
  --group_sizes=4 --mode=f --steps=10
