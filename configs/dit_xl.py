"""DiT-XL/2 + GroupDiff-l (N=4) with DiT's DDPM objective: integer t in [0, 1000), eps + learned
variance (8 output channels), eps-MSE + VLB loss; ImageNet-256 SD-VAE latents, global batch 256,
the official GroupDiff optimiser, 800K steps (the paper's Table 1 budget):

  python -m groupdiff_jax.main --config=configs/dit_xl.py --workdir=DIR \
      --config.data.path=/data/latents/imagenet256 \
      --config.data.neighbors=/data/neighbors/imagenet_dinov2_l

Fine-tune from the official DiT-XL/2 weights (docs/dit.md): convert them once with
`python -m groupdiff_jax.convert --kind=dit ...`, then add --config.init_from=CONVERTED.
The end-of-run grid and configs/sample_dit_xl.py sample as the released GroupDiff-DiT
checkpoint: DDPM 250 respaced steps, CFG 1.65 on all 4 eps channels for every t, conditional
groups of 1, unconditional groups of 4. Table 1 rows: configs/dit_xl_table1.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import sit_xl  # pylint: disable=wrong-import-position


def get_config():
  c = sit_xl.get_config()
  c.total_steps = 800_000
  c.model.name = 'DiT-XL/2'
  c.model.learn_sigma = True          # the variance channels the DDPM loss trains
  c.model.time_convention = 'noise_at_1'  # t fed raw: integer steps, as DiT
  c.transport.objective = 'ddpm'
  c.sample.sampler = 'ddpm'
  c.sample.num_steps = 250
  c.sample.cfg_scale = 1.65
  c.sample.guidance_low = 0.0         # guidance for 0 <= t <= 1000: every step
  c.sample.guidance_high = 1.0
  c.sample.guided_channels = 0        # all eps channels (GroupDiff-DiT; DiT's legacy used 3)
  c.sample.cond_group_size = 1
  c.sample.uncond_group_size = 4
  return c
