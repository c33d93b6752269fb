#!/usr/bin/env bash
# One-shot GPU check for an H100/H200 (or any CUDA machine with jax[cuda], flax, optax and orbax
# preinstalled): installs what is missing, runs the GPU tests and prints the BENCHMARKS.md tables.
#
#   launch/gpu_bench.sh [core|extra|all]   # a machine that reaches the package index
#   WHEELS=.whl launch/gpu_bench.sh        # an offline machine: wheels made beforehand with
#                                          #   launch/download_wheels.sh .whl 3.12
#   LOGS=DIR                               # also write each stage's log to DIR/NAME.log
#
# core: the GPU tests, the SiT-XL/2 train step (GroupDiff-l, N = 1 and 4) and the sampler;
# extra: the train step at N = 16 and GroupDiff-f at N = 4. Each stage has its own time limit, so
# one that hangs or fails costs its own minutes and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
what=${1:-all}
export PYTHONUNBUFFERED=1
# A rerun on the same machine loads its executables instead of compiling them again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/groupdiff_jax_cache}
# What the trainer imports that such an image lacks (scann and tensorflow-datasets are imported
# lazily and not needed here); the image's own jax, numpy and protobuf must not be shadowed.
PACKAGES=(grain ml_collections array_record dm_tree importlib_resources portpicker)
if ! python3 -c 'import grain, ml_collections' 2>/dev/null; then
  if [ -n "${WHEELS:-}" ]; then  # just these, from a folder that may hold their whole closure
    python3 -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" \
      --target /tmp/groupdiff_site "${PACKAGES[@]}" || exit 1
    export PYTHONPATH=/tmp/groupdiff_site${PYTHONPATH:+:$PYTHONPATH}
  else
    python3 -m pip install -q "${PACKAGES[@]}" || exit 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
logs=${LOGS:-}
[ -n "$logs" ] && mkdir -p "$logs"

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs it, goes on
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  local start=$SECONDS
  if [ -n "$logs" ]; then
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  else
    timeout "$limit" "$@" 2>&1
  fi
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

XL=(--config=configs/sit_xl.py --config.data.source=synthetic)
if [ "$what" = core ] || [ "$what" = all ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as o, grain; print("jax", jax.__version__, "| flax", flax.__version__, "| optax", optax.__version__, "| devices", jax.devices())'
  # cuDNN attention against the float32 reference (forward, gradient) and a train step with
  # cuDNN attention against XLA's, on the GPU.
  stage gpu_tests 240 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_attention.py tests/test_gpu.py
  # SiT-XL/2, global batch 256, bf16: GroupDiff-l at N = 1 (plain SiT) and N = 4.
  stage train_l_1_4 300 python3 -m groupdiff_jax.bench "${XL[@]}" --group_sizes=1,4 --steps=10
  # The sampler at the paper's settings but 50 SDE steps (throughput per image-forward is the
  # same as at 250; a fifth of the time).
  stage sample_xl 240 python3 -m groupdiff_jax.bench_sample --config=configs/sample_sit_xl.py \
    --model=SiT-XL/2 --batch=256 --config.sample.num_steps=50
fi
if [ "$what" = extra ] || [ "$what" = all ]; then
  stage train_l_16 240 python3 -m groupdiff_jax.bench "${XL[@]}" --group_sizes=16 --steps=10
  stage train_f_4 240 python3 -m groupdiff_jax.bench "${XL[@]}" --group_sizes=4 --mode=f \
    --steps=10
fi
