#!/usr/bin/env bash
# The three preparation jobs of "Train on ImageNet" (README), in order; each resumes when rerun.
#
#   launch/prepare_imagenet.sh VAE_DIR DINOV2_DIR OUT_DIR [TFDS_DATA_DIR]
#
#   VAE_DIR       diffusers AutoencoderKL folder (e.g. a snapshot of stabilityai/sd-vae-ft-ema)
#   DINOV2_DIR    Hugging Face DINOv2 folder (e.g. a snapshot of facebook/dinov2-large)
#   OUT_DIR       receives latents/, embeddings/ and neighbors/
#   TFDS_DATA_DIR the TFDS data_dir holding a prepared imagenet2012 (default: TFDS's own)
# Set IMAGENET_DIR=/data/imagenet/train to read a class-folder tree instead of TFDS.
# Then train:
#   python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=RUN \
#       --config.data.path=OUT_DIR/latents --config.data.neighbors=OUT_DIR/neighbors
set -euo pipefail
vae=${1:?VAE_DIR}; dinov2=${2:?DINOV2_DIR}; out=${3:?OUT_DIR}; data_dir=${4:-}
python=${PYTHON:-python}

if [[ -n "${IMAGENET_DIR:-}" ]]; then
  source_flags=(--config.data.kind=folder "--config.data.path=$IMAGENET_DIR")
else
  source_flags=(--config.data.kind=tfds --config.data.tfds_name=imagenet2012
                --config.data.split=train "--config.data.data_dir=$data_dir")
fi

mkdir -p "$out"
"$python" -m groupdiff_jax.encode --config=configs/encode_imagenet.py \
    "--config.vae_dir=$vae" "${source_flags[@]}" "--workdir=$out/latents" \
    2>&1 | tee -a "$out/encode.log"
"$python" -m groupdiff_jax.embed --config=configs/embed_dinov2_folder.py \
    "--config.model_dir=$dinov2" "${source_flags[@]}" "--workdir=$out/embeddings" \
    2>&1 | tee -a "$out/embed.log"
"$python" -m groupdiff_jax.neighbors --config=configs/neighbors_default.py \
    "--config.embeddings=$out/embeddings" "--workdir=$out/neighbors" \
    2>&1 | tee -a "$out/neighbors.log"
echo "prepared: --config.data.path=$out/latents --config.data.neighbors=$out/neighbors"
