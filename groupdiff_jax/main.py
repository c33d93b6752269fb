"""Train entry point.

  python -m groupdiff_jax.main --config=configs/sit_xl.py --workdir=DIR [--config.optim.lr=3e-4]

Multi-host (TPU pods, GPU clusters): every host runs the same command; pass --distributed
(Cloud TPU needs no other flag; elsewhere set --coordinator, --num_processes, --process_id or the
SLURM/OpenMPI environment that jax.distributed.initialize detects).

Exit status 143 (128 + SIGTERM): stopped by a preemption signal after saving a checkpoint; the
same command resumes. Schedulers retry on it (launch/gpu_slurm.sbatch requeues the job).
"""
import sys

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli

config_flags.DEFINE_config_file('config', None, 'A config file from configs/.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
cli.define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS
EXIT_PREEMPTED = 143


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors caused by the config, the data or the workdir: one line, no traceback."""
  from groupdiff_jax import checkpoint, layout, sharding, train  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.retrieval import neighbor_file  # pylint: disable=import-outside-toplevel
  return (layout.LayoutError, sit.ModelConfigError, sharding.MeshError,
          checkpoint.CheckpointError, train.WorkdirError, train.TrainingDiverged,
          neighbor_file.NeighborFileError, ValueError)


def main(argv):
  del argv
  cli.initialize_distributed(saves_on_sigterm=True)  # train.py saves at the agreed step
  from groupdiff_jax import train  # pylint: disable=import-outside-toplevel
  result = train.train(FLAGS.config, FLAGS.workdir)
  if result['step'] < FLAGS.config.total_steps:  # stopped by SIGTERM, checkpoint saved
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  cli.run(main, dirs=('workdir',), user_errors=user_errors)
