"""A small-scale reproduction of GroupDiff's claim on the embedded digits (docs/reproduction.md).

  python -m groupdiff_jax.reproduce --config=configs/reproduce_digits.py --workdir=DIR

Trains every arm (baseline / GroupDiff-l N=4 with similarity groups / with random groups) with
every seed at equal training compute, scores each run's samples in the digits classifier's
feature space, and writes DIR/results.json (every run, and mean/std per arm) and DIR/results.png
(a dot plot). Rerunning with the same DIR skips finished runs and resumes an interrupted one.
"""
import os

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'configs/reproduce_digits.py', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory: one workdir per run, results.*')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # pylint: disable-next=import-outside-toplevel
  from groupdiff_jax.evaluation import dot_plot, reproduction
  config = FLAGS.config
  arms, seeds = list(config.reproduce.arms), list(config.reproduce.seeds)
  unknown = [a for a in arms if a not in reproduction.ARMS]
  if unknown or not seeds:
    raise cli.UserError(f'--config.reproduce.arms: unknown {unknown} (known: '
                        f'{", ".join(reproduction.ARMS)}) or no seeds')
  os.makedirs(FLAGS.workdir, exist_ok=True)
  results = reproduction.run_grid(config, FLAGS.workdir, arms, seeds)
  summary = reproduction.summarise(results, arms)
  reproduction.write_json(os.path.join(FLAGS.workdir, 'results.json'),
                          {'runs': results, 'summary': summary,
                           'steps': config.total_steps, 'global_batch': config.data.global_batch,
                           'model': config.model.name, 'eval_samples': config.eval.num_samples})
  panels = [(title, {a: [r[key] for r in results if r['arm'] == a and key in r] for a in arms})
            for key, title in (('eval/digits_fd', 'Frechet distance (lower is better)'),
                               ('eval/digits_accuracy', 'class accuracy (higher is better)'))]
  png = os.path.join(FLAGS.workdir, 'results.png')
  dot_plot.save(png, panels, title=f'{config.model.name}, {config.total_steps} steps x '
                f'{config.data.global_batch} images, seeds {seeds}: dots = runs, bar = mean +- std')
  print(reproduction.table(summary), flush=True)
  progress.say(f'wrote {os.path.join(FLAGS.workdir, "results.json")} and {png}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=('workdir',))
