"""DiT-XL/2 backbone (learned sigma: 8 output channels) + GroupDiff-l (N=4), trained here with
the flow-matching objective (the sigma channels get no loss):

  python -m groupdiff_jax.main --config=configs/dit_xl.py --workdir=DIR \
      --config.data.path=/data/latents/imagenet256 \
      --config.data.neighbors=/data/neighbors/imagenet_dinov2_l
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sit_xl.get_config()
  c.model.name = 'DiT-XL/2'
  c.model.learn_sigma = True
  c.sample.cfg_scale = 1.65
  c.sample.guidance_low = 0.0
  c.sample.guidance_high = 1.0
  return c
