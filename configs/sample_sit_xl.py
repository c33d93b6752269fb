"""FID-50K sampling of a GroupDiff-l SiT-XL/2 checkpoint as the official eval: 50 images per class
(groups of 4 share a class; 52,000 drawn, the first 50 of each class kept), SDE 250 steps with a
last mean step, CFG 2.585 on 3 channels inside t in [0.25, 0.75], unconditional groups of 4,
bf16, SD-VAE (sd-vae-ft-mse) decode:

  python -m groupdiff_jax.sample --config=configs/sample_sit_xl.py --config.ckpt=DIR \
      --config.vae=/path/to/sd-vae-ft-mse --workdir=OUT

DIR is a trainer workdir (newest step, or --config.step=N) or a groupdiff_jax.convert output; the
model comes from the checkpoint. OUT/samples.npz (arr_0 uint8 [50000, 256, 256, 3], arr_1 labels)
is what the ADM evaluator reads. Rerunning the command resumes.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=wrong-import-position


def get_config():
  c = ml_collections.ConfigDict()
  c.ckpt = ''                # trainer workdir or converted checkpoint
  c.step = -1                # -1 = newest
  c.use_ema = True           # False samples the raw training weights
  c.num_samples = 50_000     # a multiple of the number of classes (class-balanced)
  c.round_groups = True      # whole groups per class, first num_samples/classes kept (official)
  c.batch_size = 256         # images per sampler call on all local devices (rounded up to
                             # whole groups and a multiple of the device count)
  c.shard_size = 1024        # images per .npz shard (a multiple of the group size)
  c.precision = 'bfloat16'   # model compute dtype: bfloat16 (official eval) or float32
  c.attention = 'auto'
  c.vae = ''                 # diffusers AutoencoderKL dir; required for latent (4-channel) models
  c.grid_images = 64         # first images in OUT/samples_grid.png

  c.sample = common.get_config().sample
  del c.sample['num_images'], c.sample['write_grid']  # the trainer's end-of-run grid
  c.sample.sampler = 'sde'       # sde | euler | heun (flow models) | ddpm (DiT checkpoints)
  c.sample.num_steps = 250
  c.sample.last_step_size = 0.04  # the SDE's final noise-free mean step
  c.sample.cfg_scale = 2.585
  c.sample.guidance_low = 0.25
  c.sample.guidance_high = 0.75
  c.sample.guided_channels = 3
  c.sample.cond_group_size = 1
  c.sample.uncond_group_size = 4
  c.sample.group_t_range = (0.0, 1.0)  # group attention only while t is inside (1 = noise)
  c.sample.group_blocks = -1           # ... and only in the first k blocks (-1 = all)
  c.sample.seed = 0

  c.mesh = common.get_config().mesh   # data parallel over the local devices by default
  c.mesh.shape = (-1, 1, 1)
  return c
