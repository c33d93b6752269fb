"""Train-step benchmark on synthetic data, on whatever backend is present.

  python -m groupdiff_jax.bench --config=configs/sit_xl.py --group_sizes=1,4,16 [--mode=l|f]

For each group size N it builds the GroupDiff batch (mode 'l': conditional singles plus
unconditional groups of N, `group.uncond_fraction` of the batch; mode 'f': every image in groups
of N), times the jitted train step with device-resident data, and prints images/s, TFLOP/s per
device, MFU and peak memory. N=1 is the plain SiT baseline.
"""
import time

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress

config_flags.DEFINE_config_file('config', None, 'A config file from configs/.', lock_config=True)
flags.DEFINE_list('group_sizes', ['1', '4', '16'], 'Group sizes to time.')
flags.DEFINE_enum('mode', 'l', ['l', 'f'], "GroupDiff-l (uncond groups only) or -f (all).")
flags.DEFINE_integer('steps', 10, 'Timed steps per group size (after 2 warm-up steps).')
flags.register_validator('group_sizes', lambda v: all(s.isdigit() and int(s) > 0 for s in v),
                         message='--group_sizes takes positive integers, e.g. 1,4,16')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def peak_memory_gib(device, compiled) -> str:
  """Allocator peak where the backend reports it (GPU/TPU), else XLA's static estimate."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return f'{stats["peak_bytes_in_use"] / 2**30:.1f}'
  try:
    m = compiled.memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return f'~{total / 2**30:.1f} (XLA est.)'
  except Exception:  # pylint: disable=broad-except
    return 'n/a'


def bench_one(config, group_size: int, mode: str, steps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from groupdiff_jax import flops, sharding, train_step  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.group.uncond_size = group_size
    config.group.cond_size = group_size if mode == 'f' else 1
    config.model.max_group_size = max(config.model.max_group_size, group_size)
  mesh = sharding.mesh_from_config(config)
  trainer = train_step.build(config, mesh)
  layout, cfg = trainer.layout, trainer.model_cfg
  state = train_step.init_state(trainer, config.seed)
  step_fn = train_step.make_train_step(trainer, config)
  rng = np.random.default_rng(0)
  shape = (layout.global_batch, cfg.input_size, cfg.input_size, cfg.in_channels)
  batch = jax.device_put({'image': rng.standard_normal(shape, np.float32),
                          'label': rng.integers(0, cfg.num_classes, layout.global_batch,
                                                dtype=np.int32)}, trainer.batch_shardings)
  t0 = time.perf_counter()
  compiled = step_fn.compile(state, batch)  # timed on its own; the timed steps call it directly
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  secs = (time.perf_counter() - t0) / steps
  flop = flops.train_flops_per_batch(cfg, layout)
  peak = flops.peak_flops_per_device()
  tflops = flop / secs / mesh.size / 1e12
  return {'group': group_size, 'cond/uncond': f'{layout.num_cond}/{layout.num_uncond}',
          'img/s': layout.global_batch / secs, 'ms/step': 1e3 * secs,
          'TFLOP/s/dev': f'{tflops:.3g}',
          'MFU': f'{100 * tflops * 1e12 / peak:.1f}%' if peak else 'n/a',
          'peak GiB': peak_memory_gib(jax.devices()[0], compiled), 'compile s': compile_s}


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  print(f'backend {jax.default_backend()} | {jax.device_count()} x {dev.device_kind} | '
        f'model {FLAGS.config.model.name} | batch {FLAGS.config.data.global_batch} | '
        f'dtype {FLAGS.config.model.dtype} | attention {FLAGS.config.model.attention} | '
        f'mode GroupDiff-{FLAGS.mode}', flush=True)
  rows = []
  for n in FLAGS.group_sizes:  # each row as it is measured: a run cut short keeps what it had
    rows.append(bench_one(FLAGS.config, int(n), FLAGS.mode, FLAGS.steps))
    progress.print_row(rows[-1])
  progress.print_table(rows)


def user_errors() -> tuple[type[BaseException], ...]:
  from groupdiff_jax import layout, sharding  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  return (layout.LayoutError, sit.ModelConfigError, sharding.MeshError)


if __name__ == '__main__':
  cli.run(main, dirs=(), user_errors=user_errors)
