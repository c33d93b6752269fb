"""Sample quality of generated images: FID, sFID, Inception Score, precision and recall.

  python -m groupdiff_jax.evaluate --samples=OUT/samples.npz --ref=VIRTUAL_imagenet256.npz \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth

--samples: an `.npz` with `arr_0` uint8 [N, H, W, 3] (the sampling job's merged file) or a
directory of shards. --ref: an `.npz` of reference images and/or statistics (mu/sigma,
mu_s/sigma_s: the ADM reference batches). Prints a table and writes JSON (--out). See
docs/evaluation.md.
"""
from absl import flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('samples', None, 'Samples: .npz (arr_0 uint8 NHWC) or a shard directory.')
  flags.DEFINE_string('ref', None, 'Reference .npz: images (arr_0) and/or statistics (mu, sigma).')
  flags.DEFINE_string('inception_weights', None,
                      "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz of it).")
  flags.DEFINE_enum('protocol', 'adm', ['adm', 'pytorch_fid'],
                    'Resize/scaling of the images: the ADM evaluator (paper numbers) or pytorch-fid.')
  flags.DEFINE_integer('batch_size', 256, 'Images per step, over all devices.')
  flags.DEFINE_string('out', None, 'JSON output (default: next to --samples).')
  flags.mark_flags_as_required(['samples', 'ref'])


def main(argv):
  del argv
  from groupdiff_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  inputs = evaluator.check_inputs(FLAGS.samples, FLAGS.ref, FLAGS.inception_weights)
  out = FLAGS.out or evaluator.default_output(FLAGS.samples)
  result = evaluator.compute(inputs, protocol=FLAGS.protocol, batch_size=FLAGS.batch_size)
  result.update(samples=FLAGS.samples, ref=FLAGS.ref)
  print(evaluator.table(result), flush=True)
  evaluator.write_json(out, result)
  progress.say(f'wrote {out}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=())  # bad input (files, weights) raises cli.UserError: one line
