"""The small-scale reproduction on the embedded digits (docs/reproduction.md): the demo's data
and model family at a smaller compute budget per run, three arms x three seeds.

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
  c = demo.get_config()
  c.total_steps = 600
  c.log_every_steps = 200
  c.ckpt_every_steps = 300
  c.eval.num_samples = 500
  c.eval.s_cross_groups = 4
  c.reproduce = ml_collections.ConfigDict()
  c.reproduce.arms = ('baseline', 'groupdiff_similarity', 'groupdiff_random')
  c.reproduce.seeds = (0, 1, 2)
  return c
