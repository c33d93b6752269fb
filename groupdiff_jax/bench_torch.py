"""This project against PyTorch (diffusers' DiT with group attention) on the same CPU.

  python -m groupdiff_jax.bench_torch

runs the cases of groupdiff_jax/benchmarking/vs_torch.py (train steps of SiT-S/2, forwards of
SiT-S/2 and SiT-B/2 at group sizes 1 and 4, the SDE sampler with CFG and groups of 4, one
layer's attention kernel forward and backward against torch's SDPA) in one
process, float32, the same number of threads for both, interleaved; prints a Markdown table of
median images/s, the ratio, compile times and the load average. --torch_compile adds a
torch.compile column (minutes of compilation on a small CPU); --cases=forward --batch=32 gives
the forwards at the issue's batch. A tiny smoke run:

  python -m groupdiff_jax.bench_torch --model=SiT-d2h32n2/2 --input_size=8 --batch=8 --reps=2 \
      --warmup=1 --sample_steps=4
"""
import os

from absl import flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list('cases', [], 'Case names (substrings) to run; empty: all.')
  flags.DEFINE_integer('reps', 5, 'Timed interleaved rounds per case (after the warm-up).')
  flags.DEFINE_integer('warmup', 3, 'Untimed calls of each side before the rounds (the first '
                       'calls fault in fresh memory until the allocator settles).')
  flags.DEFINE_integer('threads', 2, 'torch.set_num_threads; XLA runs its pool of one thread '
                       'per core, so match the core count (2 on the developer machine).')
  flags.DEFINE_bool('torch_compile', False, 'Also time torch.compile (slow to compile on CPU).')
  flags.DEFINE_string('model', '', 'Run every case on this model instead (smoke runs).')
  flags.DEFINE_integer('input_size', 0, 'Latent side for every case instead (0: the case\'s).')
  flags.DEFINE_integer('batch', 0, 'Batch for every case instead (0: the case\'s).')
  flags.DEFINE_integer('sample_steps', 0, 'SDE steps of the sampler case (0: 50).')


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.reps < 1 or FLAGS.threads < 1 or FLAGS.warmup < 0:
    raise cli.UserError('--reps and --threads must be >= 1, --warmup >= 0')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # a CPU comparison, whatever else is present
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.benchmarking import vs_torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(FLAGS.threads)
  cases = [vs_torch.shrink(c, FLAGS.model, FLAGS.input_size, FLAGS.batch, FLAGS.sample_steps)
           for c in vs_torch.CASES if not FLAGS.cases or any(n in c.name for n in FLAGS.cases)]
  if not cases:
    raise cli.UserError(f'--cases={",".join(FLAGS.cases)} matches none of: '
                        + '; '.join(c.name for c in vs_torch.CASES))
  base = vs_torch.base_config()
  progress.say(f'jax {jax.__version__} ({jax.default_backend()}) | torch {torch.__version__} | '
               f'torch {FLAGS.threads} threads, XLA one per core | {os.cpu_count()} cores | '
               f'float32 | {FLAGS.warmup} warm-up calls, {FLAGS.reps} interleaved rounds, '
               'medians | load average '
               + ' '.join(f'{v:.1f}' for v in os.getloadavg()))
  rows = vs_torch.run_cases(base, cases, FLAGS.reps, FLAGS.torch_compile, FLAGS.warmup)
  progress.print_table(rows, '.2f')
  progress.say('load average after: ' + ' '.join(f'{v:.1f}' for v in os.getloadavg()))


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=())
