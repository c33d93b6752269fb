"""SiT-B/2 + GroupDiff-l (N=4) on ImageNet-256 latents; otherwise as configs/sit_xl.py:

  python -m groupdiff_jax.main --config=configs/sit_b.py --workdir=DIR \
      --config.data.path=/data/latents/imagenet256 \
      --config.data.neighbors=/data/neighbors/imagenet_dinov2_l
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sit_xl.get_config()
  c.model.name = 'SiT-B/2'
  return c
