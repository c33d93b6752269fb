"""Ahead-of-time fit check for a TPU slice, on a CPU host with libtpu (pip install -e '.[aot]').

  python -m groupdiff_jax.aot --config=configs/sit_xl.py --topology=v5p-128 [--mfu=0.4]

Compiles the train step and one sampling step (the sampler's guided model call) for the slice
and prints, per chip: memory against HBM, executed FLOPs per image against flops.py, collective
bytes by kind against the FSDP minimum, and the step time at the stated MFU. When the train step
does not fit, it compiles the proposals of compilation/fit.py (a mesh that shards every
parameter, remat) until one fits. Topology names: README "AOT fit check".
"""
import os

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'A config file from configs/.',
                                  lock_config=True)
  flags.DEFINE_string('topology', None, "A Cloud name (v5p-128, v5e-256, v4-8: v4/v5p count "
                      "TensorCores, v5e/v6e chips) or a libtpu grid (v5p:4x4x4, v5e:16x16).")
  flags.DEFINE_float('mfu', 0.4, 'Model FLOPs utilisation assumed for the step-time estimate.')
  flags.DEFINE_list('programs', ['train', 'sample'], 'Which programs to compile.')
  flags.DEFINE_integer('max_tries', 3, 'Proposals to compile when the train step does not fit.')
  flags.DEFINE_string('label', '', 'Row label of the Markdown summary (default: the topology).')
  flags.DEFINE_string('hlo_dir', '', 'Also write each optimized HLO text here (for a closer look).')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv) -> None:
  del argv
  from groupdiff_jax.compilation import aot_run, topology  # pylint: disable=import-outside-toplevel
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if not set(FLAGS.programs) <= {'train', 'sample'}:
    raise cli.UserError(f'--programs takes train and/or sample, got {",".join(FLAGS.programs)}')
  if not 0 < FLAGS.mfu <= 1:
    raise cli.UserError(f'--mfu must be in (0, 1], got {FLAGS.mfu}')
  slice_ = topology.parse(FLAGS.topology)
  if FLAGS.hlo_dir:
    os.makedirs(FLAGS.hlo_dir, exist_ok=True)
  if not topology.libtpu_available():
    raise cli.UserError('AOT compilation for TPU needs libtpu: pip install -e ".[aot]"')
  aot_run.run(FLAGS.config, slice_, programs=tuple(FLAGS.programs), mfu=FLAGS.mfu,
              max_tries=FLAGS.max_tries, label=FLAGS.label or slice_.libtpu_name,
              say=progress.say, hlo_dir=FLAGS.hlo_dir)


def user_errors() -> tuple[type[BaseException], ...]:
  from groupdiff_jax import layout, sharding  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.compilation import topology  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  return (layout.LayoutError, sit.ModelConfigError, sharding.MeshError, topology.TopologyError)


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=('hlo_dir',), user_errors=user_errors)
