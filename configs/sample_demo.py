"""Samples the demo checkpoint (configs/demo.py: digits, pixel space, no VAE) the way the demo's
own grid does: 1,000 images (100 per class, groups of 4 sharing a class), Heun 15 steps, CFG 3.0
on t in [0.5, 1], float32. Well under a minute on 2 CPU cores:

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
  c.sample.sampler = 'heun'
  c.sample.num_steps = 15
  c.sample.cfg_scale = 3.0
  c.sample.guidance_low = 0.5
  c.sample.guidance_high = 1.0
  c.sample.guided_channels = 0
  return c
