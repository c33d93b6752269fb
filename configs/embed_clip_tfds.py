"""Embed a prepared TFDS dataset with the CLIP ViT-L/14 image tower (image_embeds).

  python -m groupdiff_jax.embed --config=configs/embed_clip_tfds.py \
      --config.model_dir=/models/clip-vit-large-patch14 --config.data.tfds_name=my_images \
      --config.data.data_dir=/data/tfds --workdir=/data/emb/my_images_clip_l

Read with tfds.data_source(..., download=False); image id = record index in the split. Without
TensorFlow, images must be stored as uint8 Tensor features ([H, W, 3]); tfds.features.Image
cannot be decoded. model_dir: a CLIPModel or CLIPVisionModelWithProjection folder.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import embed_dinov2_folder  # pylint: disable=wrong-import-position


def get_config() -> ml_collections.ConfigDict:
  c = embed_dinov2_folder.get_config()
  c.data.kind = 'tfds'
  c.batch_size = 128
  return c
