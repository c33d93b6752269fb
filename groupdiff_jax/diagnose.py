"""The cross-sample attention score S_cross of a checkpoint, per layer and per timestep.

  python -m groupdiff_jax.diagnose --ckpt=WORKDIR_OR_CONVERTED_DIR [--group_size=4 --num_steps=25]

Runs the model (EMA weights when present) along its own Euler ODE trajectory from noise on
`num_groups` groups of `group_size` images, reads the attention mass between the images of each
group from every block at every step, and writes OUT/s_cross.csv (layer, step, t, s_cross) and
OUT/s_cross.png (heat map, layers x timesteps). Definition and aggregation: docs/evaluation.md.
"""
import os

import numpy as np
from absl import flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('ckpt', None, 'A trainer workdir or a converted checkpoint directory.')
  flags.DEFINE_string('out', None, 'Output directory (default: CKPT/s_cross).')
  flags.DEFINE_integer('group_size', 4, 'Images per group (2 .. the model\'s max_group_size).')
  flags.DEFINE_integer('num_groups', 8, 'Groups per step (S_cross averages over all images).')
  flags.DEFINE_integer('num_steps', 25, 'Euler steps from t = 1 (noise) to 0: the timesteps.')
  flags.DEFINE_enum('branch', 'uncond', ['uncond', 'cond'],
                    'uncond: null labels (where GroupDiff-l groups images); cond: one class per '
                    'group.')
  flags.DEFINE_integer('seed', 0, 'Noise, labels and sample-embedding ids.')
  flags.mark_flags_as_required(['ckpt'])


def user_errors() -> tuple[type[BaseException], ...]:
  from groupdiff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  return (checkpoint.CheckpointError,)


def locate(path: str):
  """The checkpoint (the sampling job's loader): newest step, its metadata; UserError if absent."""
  from groupdiff_jax.diffusion import registry  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.sampling import weights  # pylint: disable=import-outside-toplevel
  source = weights.locate(path, flag='--ckpt')
  if source.objective != registry.FLOW:
    raise cli.UserError(f'--ckpt={path}: a {source.objective} model; the S_cross trajectory is '
                        'the flow (velocity) ODE, so only flow checkpoints are supported')
  return source


def load_model(source):
  """The model in float32 on one device with the checkpoint's EMA weights (raw ones when the
  checkpoint has no EMA)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from groupdiff_jax import sharding  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.sampling import weights  # pylint: disable=import-outside-toplevel
  cfg = weights.model_config(source, dtype='float32', attention='auto')
  mesh = sharding.make_mesh(('data',), (1,), jax.devices()[:1])
  graphdef, params = weights.restore(source, cfg, mesh, (), use_ema='ema' in source.items)
  return nnx.merge(graphdef, params)


def check_args(model_meta: dict, group_size: int, num_groups: int, num_steps: int) -> None:
  max_group = model_meta.get('max_group_size') or 0  # 0: no sample embedding, no limit
  if group_size < 2 or (max_group and group_size > max_group):
    raise cli.UserError(f'--group_size={group_size}: S_cross needs 2 <= group size <= the '
                        f'model\'s max_group_size ({max_group})')
  for name, value in (('num_groups', num_groups), ('num_steps', num_steps)):
    if value < 1:
      raise cli.UserError(f'--{name} must be >= 1')


def main(argv):
  del argv
  source = locate(FLAGS.ckpt)
  name = source.meta['model']['name']
  check_args(source.meta['model'], FLAGS.group_size, FLAGS.num_groups, FLAGS.num_steps)
  out = FLAGS.out or os.path.join(FLAGS.ckpt, 's_cross')
  model = load_model(source)
  from groupdiff_jax.evaluation import heatmap, s_cross  # pylint: disable=import-outside-toplevel
  n = FLAGS.group_size * FLAGS.num_groups
  if FLAGS.branch == 'uncond':
    labels = np.full(n, model.cfg.num_classes)
  else:
    rng = np.random.default_rng(FLAGS.seed)
    labels = np.repeat(rng.integers(0, model.cfg.num_classes, FLAGS.num_groups), FLAGS.group_size)
  progress.say(f'S_cross of {name} ({FLAGS.branch}, groups of {FLAGS.group_size}, '
               f'{FLAGS.num_groups} groups, {FLAGS.num_steps} steps)')
  scores, times = s_cross.measure(model, group_size=FLAGS.group_size,
                                  num_groups=FLAGS.num_groups, num_steps=FLAGS.num_steps,
                                  labels=labels, seed=FLAGS.seed)

  os.makedirs(out, exist_ok=True)
  csv_path, png_path = os.path.join(out, 's_cross.csv'), os.path.join(out, 's_cross.png')
  s_cross.write_csv(csv_path, scores, times)
  heatmap.save(png_path, scores, row_labels=[f'L{i + 1}' for i in range(len(scores))],
               col_labels=[f'{t:.2f}' for t in times],
               title=f'S_cross, {name}, M={FLAGS.group_size} (rows: layers, cols: t)')
  print(f'S_cross mean {scores.mean():.4f} | by layer (1..{len(scores)}): '
        + ' '.join(f'{v:.3f}' for v in scores.mean(axis=1)), flush=True)
  print('by t: ' + ' '.join(f'{t:.2f}:{v:.3f}' for t, v in zip(times, scores.mean(axis=0))),
        flush=True)
  progress.say(f'wrote {csv_path} and {png_path}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=('out',), user_errors=user_errors)
