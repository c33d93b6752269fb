"""FID-50K sampling of a GroupDiff-l DiT-XL/2 checkpoint (configs/dit_xl.py runs, the converted
released gdiff-l-4-dit-xl-2 file, or a converted official DiT with uncond_group_size=1) as the
official eval: DDPM ancestral sampling on 250 respaced steps with the learned variance, CFG 1.65
on all 4 eps channels for every t, conditional groups of 1, unconditional groups of 4 sharing the
class, bf16, SD-VAE (sd-vae-ft-mse) decode:

  python -m groupdiff_jax.sample --config=configs/sample_dit_xl.py --config.ckpt=DIR \
      --config.vae=/path/to/sd-vae-ft-mse --workdir=OUT

Everything else (plan, shards, resume, OUT/samples.npz) is as configs/sample_sit_xl.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import dit_xl  # pylint: disable=wrong-import-position
import sample_sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sample_sit_xl.get_config()
  # The sampler settings the training config declares (DDPM 250 steps, CFG 1.65 on all eps
  # channels for every t, groups 1 / 4), taken from configs/dit_xl.py so the two cannot drift.
  trained = dit_xl.get_config().sample
  for key in c.sample.keys():
    if key in trained:
      c.sample[key] = trained[key]
  return c
