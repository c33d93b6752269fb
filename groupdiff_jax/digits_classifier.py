"""Trains the digits classifier whose feature space judges digit samples (class accuracy and
Fréchet distance; see groupdiff_jax/evaluation/digits_classifier.py and docs/evaluation.md).

  python -m groupdiff_jax.digits_classifier --out=workdirs/digits_classifier [--image_size=16]

Prints the held-out accuracy (20% of load_digits, stratified) and writes OUT/weights.npz and
OUT/info.json.
"""
import time

from absl import flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('out', None, 'Output directory for weights.npz and info.json.')
  flags.DEFINE_integer('image_size', 16, 'Side length the digits are resized to (the demo: 16).')
  flags.DEFINE_integer('seed', 0, 'Initialisation, split and augmentation.')
  flags.DEFINE_integer('epochs', 60, 'Passes over the 80% training split.')
  flags.mark_flags_as_required(['out'])


def main(argv):
  del argv
  if FLAGS.image_size < 8 or FLAGS.epochs < 1:
    raise cli.UserError('--image_size must be >= 8 and --epochs >= 1')
  from groupdiff_jax.evaluation import digits_classifier  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  classifier = digits_classifier.train(FLAGS.image_size, seed=FLAGS.seed, epochs=FLAGS.epochs)
  digits_classifier.save(classifier, FLAGS.out)
  progress.say(f'digits classifier ({FLAGS.image_size}x{FLAGS.image_size}, seed {FLAGS.seed}): '
               f'held-out accuracy {classifier.held_out_accuracy:.4f} | trained in '
               f'{progress.duration(time.perf_counter() - t0)} | wrote {FLAGS.out}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=('out',))
