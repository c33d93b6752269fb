"""The small-scale reproduction on the embedded digits (docs/reproduction.md): the demo's data
at a small compute budget per run (a 2-block SiT, 400 steps), three arms x three seeds.

  python -m groupdiff_jax.reproduce --config=configs/reproduce_digits.py \
      --workdir=workdirs/reproduce_digits

Every run: the same model, steps, batch and unconditional share (equal training compute); the arms
differ only in how the unconditional images are grouped (groupdiff_jax/evaluation/reproduction.py).
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import demo  # pylint: disable=wrong-import-position


def get_config():
  c = demo.get_config()  # digits data, 16x16x1 pixels, 10 classes
  # Pinned here so that tuning the demo does not change this study.
  c.model.name = 'SiT-d2h64n4/4'   # depth 2, hidden 64, 4 heads, patch 4: ~1/8 of the demo's
  c.data.global_batch = 64
  c.group.uncond_fraction = 0.125  # 8 unconditional images: 2 groups of 4, or 8 of 1
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.99
  c.total_steps = 400               # 25,600 images per run, ~14 epochs of the 1,797 digits
  c.log_every_steps = 100
  c.ckpt_every_steps = 200
  # The same sampler for every arm: Heun, 10 steps (19 model evaluations per branch), CFG 2 over
  # the whole interval.
  c.sample.sampler = 'heun'
  c.sample.num_steps = 10
  c.sample.cfg_scale = 2.0
  c.sample.guidance_low, c.sample.guidance_high = 0.0, 1.0
  c.eval.num_samples = 300
  c.eval.batch_size = 100
  c.eval.s_cross_groups = 4
  c.reproduce = ml_collections.ConfigDict()
  c.reproduce.arms = ('baseline', 'groupdiff_similarity', 'groupdiff_random')
  c.reproduce.seeds = (0, 1, 2)
  return c
