"""Encode ImageNet (TFDS imagenet2012, train) into SD-VAE latents at 256 px for the trainer.

  python -m groupdiff_jax.encode --config=configs/encode_imagenet.py \
      --config.vae_dir=/models/sd-vae-ft-ema --workdir=/data/latents/imagenet256

vae_dir is a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors),
e.g. a snapshot of stabilityai/sd-vae-ft-ema. imagenet2012 must be prepared in the TFDS
data_dir (manual_dir download). A folder with one sub-folder per class works too:
  --config.data.kind=folder --config.data.path=/data/imagenet/train
512 px: --config.resolution=512 (64x64x4 latents). Rerunning the command resumes.
"""
import ml_collections

from groupdiff_jax.data import image_sources


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.vae_dir = ''
  c.resolution = 256        # ADM centre crop side; latents are resolution / 8
  c.flip = False            # also store the latent of the horizontally flipped image
  c.store = 'moments'       # moments: posterior mean + std (a fresh sample every step)
                            # sample: one fixed posterior sample x 0.18215 (the official cache)
  c.dtype = 'float16'       # storage dtype of the stored arrays
  c.compute_dtype = 'float32'  # VAE compute dtype ('bfloat16' is faster on TPU/GPU)
  c.seed = 0                # store='sample': the posterior draw
  c.batch_size = 64         # per process, rounded up to a multiple of its device count
  c.shard_size = 10_000     # images per shard (the unit of resumption and of multi-host split)
  c.num_workers = 8         # host threads decoding and cropping images
  c.log_every_s = 30.0      # progress line period

  c.data = image_sources.default_config('tfds')
  c.data.tfds_name = 'imagenet2012'
  return c
