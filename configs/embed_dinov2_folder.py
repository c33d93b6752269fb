"""Embed a folder of images with DINOv2 (for similarity grouping; issue 4).

  python -m groupdiff_jax.embed --config=configs/embed_dinov2_folder.py \
      --config.model_dir=/models/dinov2-large --config.data.path=/data/imagenet/train \
      --workdir=/data/emb/imagenet_dinov2_l

model_dir is a Hugging Face folder (config.json + model.safetensors), e.g. a snapshot of
facebook/dinov2-large. Image ids are the sorted relative paths (saved as WORKDIR/image_ids.txt).
Then build the neighbour file:
  python -m groupdiff_jax.neighbors --config=configs/neighbors_default.py \
      --config.embeddings=/data/emb/imagenet_dinov2_l --workdir=/data/neighbors/imagenet_dinov2_l
"""
import ml_collections

from groupdiff_jax.data import image_sources


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_dir = ''          # Hugging Face DINOv2 or CLIP folder
  c.encoder_kind = ''       # '' = from config.json model_type (dinov2 | clip)
  c.dtype = 'float32'       # compute dtype; 'bfloat16' is faster on TPU/GPU
  c.batch_size = 256        # global batch, rounded up to a multiple of the device count
  c.shard_size = 50_000     # images per shard file (the unit of resumption)
  c.num_workers = 8         # host threads decoding and resizing images
  c.resize = 0              # 0 = the encoder's own preprocessing (DINOv2: 256 -> crop 224)
  c.crop = 0
  c.log_every_s = 30.0      # progress line period

  c.data = image_sources.default_config('folder')  # folder | tfds (data/image_sources.py)
  return c
