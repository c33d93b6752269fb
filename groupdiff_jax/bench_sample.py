"""Sampling-throughput benchmark of the offline sampling job's jitted sampler.

  python -m groupdiff_jax.bench_sample --config=configs/sample_sit_xl.py --model=SiT-XL/2

times one batch trajectory at the config's settings (default: the paper's, SDE 250 steps, CFG
interval [0.25, 0.75], unconditional groups of 4, bf16) on random weights and prints images/s,
image-forwards/s (the skipped unconditional passes outside the interval are not counted as work)
and seconds per 1,000 images. --torch also runs a plain PyTorch eager Euler-Maruyama sampler over
an equivalent torch model (groupdiff_jax/sampling/torch_reference.py) side by side and prints the
ratio. A CPU-sized run:

  python -m groupdiff_jax.bench_sample --config=configs/sample_sit_xl.py --model=SiT-d4h128n4/2 \
      --input_size=16 --batch=32 --config.sample.num_steps=50 --config.precision=float32 --torch
"""
import time

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'A sampling config (configs/sample_*.py).',
                                  lock_config=True)
  flags.DEFINE_string('model', 'SiT-XL/2', 'Model name (random weights).')
  flags.DEFINE_integer('input_size', 32, 'Latent side length.')
  flags.DEFINE_integer('channels', 4, 'Latent channels.')
  flags.DEFINE_integer('num_classes', 1000, 'Classes (the null class is one more).')
  flags.DEFINE_integer('batch', 256, 'Images per timed trajectory (rounded to whole groups).')
  flags.DEFINE_integer('reps', 1, 'Timed trajectories (after one compile + run).')
  flags.DEFINE_bool('torch', False, 'Also time the PyTorch eager reference and print the ratio.')
  flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads for the reference (0: default).')
  flags.mark_flags_as_required(['config'])


def _time_torch(cfg, s, batch: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.sampling import torch_reference  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  model = torch_reference.TorchSiT(cfg.depth, cfg.hidden, cfg.heads, cfg.patch, cfg.input_size,
                                   cfg.in_channels, cfg.num_classes,
                                   max(cfg.max_group_size, 1)).eval()
  noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
  labels = torch.arange(batch) // max(s.cond_group_size, s.uncond_group_size) % cfg.num_classes
  t0 = time.perf_counter()
  torch_reference.sample_sde(
      model, noise, labels, num_steps=s.num_steps, cfg_scale=s.cfg_scale,
      guidance_low=s.guidance_low, guidance_high=s.guidance_high, cond_group=s.cond_group_size,
      uncond_group=s.uncond_group_size, null_label=cfg.num_classes,
      guided_channels=s.guided_channels, last_step_size=s.last_step_size)
  return time.perf_counter() - t0


def torch_threads() -> int:
  import torch  # pylint: disable=import-outside-toplevel
  return torch.get_num_threads()


def main(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.sampling import job, throughput  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  job.check_settings(config)
  _, depth, hidden, heads, patch = sit.parse_name(FLAGS.model)
  group = job.eval_group_size(config.sample)
  cfg = sit.SiTConfig(depth=depth, hidden=hidden, heads=heads, patch=patch,
                      input_size=FLAGS.input_size, in_channels=FLAGS.channels,
                      num_classes=FLAGS.num_classes, max_group_size=max(4, group),
                      dtype=config.precision, attention=config.attention)
  s = config.sample
  cond, uncond = throughput.forwards_per_image(s)
  dev = jax.devices()[0]
  print(f'backend {jax.default_backend()} | {jax.local_device_count()} x {dev.device_kind} | '
        f'{FLAGS.model} {FLAGS.input_size}x{FLAGS.input_size}x{FLAGS.channels} | '
        f'{config.precision} | {s.sampler} {s.num_steps} steps, cfg {s.cfg_scale} in '
        f'[{s.guidance_low}, {s.guidance_high}], groups {s.cond_group_size}/{s.uncond_group_size} '
        f'| {cond} + {uncond} image-forwards per image', flush=True)
  timed = throughput.time_jax(cfg, config, FLAGS.batch, FLAGS.reps)
  rows = [dict(throughput.report('jax (jit)', timed['batch'], timed['s/batch'], cond + uncond),
               **{'compile s': timed['compile s']})]
  if FLAGS.torch:
    secs = _time_torch(cfg, s, timed['batch'])
    rows.append(dict(throughput.report(f'torch eager ({torch_threads()} threads)', timed['batch'],
                                       secs, cond + uncond),
                     **{'compile s': 0.0}))
  progress.print_table(rows, '.4g')
  if FLAGS.torch:
    print(f'jax / torch throughput: {rows[0]["img/s"] / rows[1]["img/s"]:.2f}x', flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=())
