"""Offline sampling: a checkpoint's EMA weights -> class-balanced images in `.npz` shards.

  python -m groupdiff_jax.sample --config=configs/sample_sit_xl.py --config.ckpt=DIR --workdir=OUT
  python -m groupdiff_jax.sample merge OUT        # (or --merge --workdir=OUT) -> OUT/samples.npz

`ckpt` is a trainer workdir (newest step, or --config.step=N) or a groupdiff_jax.convert output;
the model comes from its metadata. Running the same command again resumes (finished shards are
skipped); a single-process run merges by itself at the end. Multi-host: the same command on every
host with --distributed; each process samples its own shards, then run `merge` once.
The machinery lives in groupdiff_jax/sampling/ (plan, checkpoint, shards, job).
"""
import sys

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'A sampling config, e.g. configs/sample_sit_xl.py',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory: manifest, shards, samples.npz.')
  flags.DEFINE_bool('merge', False, 'Only merge the finished shards of --workdir.')
  cli.define_distributed_flags()
  flags.mark_flag_as_required('workdir')


def user_errors() -> tuple[type[BaseException], ...]:
  from groupdiff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit, vae_weights  # pylint: disable=import-outside-toplevel
  return (checkpoint.CheckpointError, sit.ModelConfigError, vae_weights.VAEWeightsError)


def main(argv: list[str]) -> None:
  del argv
  from groupdiff_jax.sampling import job, shards  # pylint: disable=import-outside-toplevel
  if FLAGS.merge:
    path = shards.merge(FLAGS.workdir)
    print(f'wrote {path}', flush=True)
    return
  if FLAGS.config is None:
    raise cli.UserError('--config is required (e.g. --config=configs/sample_sit_xl.py)')
  cli.initialize_distributed()
  job.run(FLAGS.config, FLAGS.workdir)


def _merge_subcommand(argv: list[str]) -> list[str]:
  """`sample merge OUT` -> `sample --merge --workdir=OUT` (absl takes no positional arguments)."""
  if len(argv) >= 3 and argv[1] == 'merge':
    return [argv[0], '--merge', f'--workdir={argv[2]}', *argv[3:]]
  return argv


if __name__ == '__main__':
  define_flags()
  sys.argv = _merge_subcommand(sys.argv)
  cli.run(main, dirs=('workdir',), user_errors=user_errors)
