"""Encodes an image dataset into SD-VAE latent shards for `data.source='latents'`.

  python -m groupdiff_jax.encode --config=configs/encode_imagenet.py \
      --config.vae_dir=/models/sd-vae-ft-ema --workdir=/data/latents/imagenet256

Reads a TFDS dataset or a class-folder tree (data/image_sources.py, the same ids as the embed
job), applies ADM's centre crop, encodes with the Flax SD-VAE on every device and writes
ArrayRecord shards + manifest (data/latent_store.py). Multi-host: run the same command on every
host with --distributed; each process encodes a disjoint set of shards. Rerunning resumes.
"""
from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli


def main(argv: list[str]) -> None:
  del argv
  cli.initialize_distributed()
  from groupdiff_jax.data import encoding  # pylint: disable=import-outside-toplevel
  encoding.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'encode config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory that receives the latent shards.')
  cli.define_distributed_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main, dirs=('workdir',))
