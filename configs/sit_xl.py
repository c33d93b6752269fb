"""SiT-XL/2 + GroupDiff-l (N=4) on ImageNet-256 SD-VAE latents (32x32x4), global batch 256,
official GroupDiff optimiser defaults. Prepare the latents and the neighbour file once
(launch/prepare_imagenet.sh; README "Train on ImageNet"), then:

  python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=DIR \
      --config.data.path=/data/latents/imagenet256 \
      --config.data.neighbors=/data/neighbors/imagenet_dinov2_l

Without data: --config.data.source=synthetic (random latents, same shapes).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=wrong-import-position


def get_config():
  c = common.get_config()
  c.model.name = 'SiT-XL/2'
  c.data.source = 'latents'
  c.data.path = ''       # the encode job's workdir (required for latents)
  c.data.neighbors = ''  # the neighbors job's workdir (required for latents)
  c.data.global_batch = 256
  c.group.cond_size = 1
  c.group.uncond_size = 4
  c.group.uncond_fraction = 0.1
  # Sampling as released for GroupDiff-l SiT-XL/2 (SDE 250 steps, CFG on 3 channels, interval).
  c.sample.cfg_scale = 2.585
  c.sample.guidance_low = 0.25
  c.sample.guidance_high = 0.75
  c.sample.guided_channels = 3
  return c
