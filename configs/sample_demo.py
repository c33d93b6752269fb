"""Samples the demo checkpoint (configs/demo.py: digits, pixel space, no VAE) the way the demo's
own grid does: 1,000 images (100 per class, groups of 4 sharing a class), Heun 15 steps, CFG 3.0
on t in [0.5, 1], float32. Well under a minute on 2 CPU cores:

  python -m groupdiff_jax.sample --config=configs/sample_demo.py --config.ckpt=workdirs/demo \
      --workdir=workdirs/demo_samples
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import demo  # pylint: disable=wrong-import-position
import sample_sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sample_sit_xl.get_config()
  c.num_samples = 1000
  c.batch_size = 200
  c.shard_size = 200
  c.precision = 'float32'   # CPU: bf16 matmuls are slower there
  # The sampler settings of the demo's own grid, taken from configs/demo.py so the two cannot
  # drift apart (sampler, steps, CFG and its interval, guided channels, group sizes).
  trained = demo.get_config().sample
  for key in c.sample.keys():
    if key in trained:
      c.sample[key] = trained[key]
  return c
