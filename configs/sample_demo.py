"""Samples the demo checkpoint (configs/demo.py: digits, pixel space, no VAE) the way the demo's
own grid does: 1,000 images (100 per class, groups of 4 sharing a class), SDE 100 steps, CFG 2.0
on [0, 1], float32. About a minute on 2 CPU cores:

  python -m groupdiff_jax.sample --config=configs/sample_demo.py --config.ckpt=workdirs/demo \
      --workdir=workdirs/demo_samples
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sample_sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sample_sit_xl.get_config()
  c.num_samples = 1000
  c.batch_size = 200
  c.shard_size = 200
  c.precision = 'float32'   # CPU: bf16 matmuls are slower there
  c.sample.num_steps = 100
  c.sample.cfg_scale = 2.0
  c.sample.guidance_low = 0.0
  c.sample.guidance_high = 1.0
  c.sample.guided_channels = 0
  return c
