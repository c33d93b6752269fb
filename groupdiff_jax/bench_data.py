"""Throughput of the real-data path on this host: the latent pipeline and the encode job.

  python -m groupdiff_jax.bench_data --config=configs/sit_xl.py --workdir=/tmp/bench_data

1. Pipeline: writes (once) a synthetic latents set in the encode job's ArrayRecord format
   (--n rows of posterior moments, float16 [32, 32, 4] for sit_xl) with a clustered neighbour
   file, then times `data.source='latents'` as the trainer uses it: GroupDiff batches of the
   config's global batch from the epoch plan, a fresh posterior sample per image, for each
   --threads value (grain reader threads). Reports latents/s after --warmup batches.
2. Encode: --encode_images random JPEGs (500x375, ImageNet's typical size) encoded at
   --encode_resolution px by a tiny random SD-VAE; reports images/s for the host part alone
   (decode + ADM crop) and for the whole job (which overlaps host and device work).
Results go to WORKDIR/bench_data.json.
"""
import json
import os
import platform
import time

from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress


def bench_pipeline(config, workdir: str, n: int, threads: list[int], batches: int,
                   warmup: int) -> dict:
  from groupdiff_jax.data import pipeline, synthetic_latents  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.layout import layout_from_config  # pylint: disable=import-outside-toplevel
  side, channels = config.model.input_size, config.model.in_channels
  t0 = time.perf_counter()
  lat_dir, nbr_dir = synthetic_latents.write(os.path.join(workdir, 'synthetic'), n,
                                             latent_shape=(side, side, channels),
                                             num_classes=config.model.num_classes)
  progress.say(f'bench_data: synthetic set of {n} latents ready in {time.perf_counter() - t0:.0f}s')
  config.data.source, config.data.path, config.data.neighbors = 'latents', lat_dir, nbr_dir
  config.data.dataset = ''
  layout = layout_from_config(config)
  results = {}
  for count in threads:
    config.data.num_threads = count
    t0 = time.perf_counter()
    data = pipeline.make_train_data(config, layout)  # plans epoch 0 (not part of the rate)
    plan_s = time.perf_counter() - t0
    for _ in range(warmup):
      next(data)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(data)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latents = batches * batch['image'].shape[0]
    # CPU seconds of this process (all threads): on a shared host the wall rate is what the
    # scheduler left us; latents per CPU second is the cost, independent of other load.
    results[f'threads_{count}'] = {
        'latents_per_s': round(latents / seconds), 'latents_per_cpu_s': round(latents / cpu),
        'cpu_cores_used': round(cpu / seconds, 2), 'batches': batches,
        'seconds': round(seconds, 2), 'plan_epoch0_s': round(plan_s, 2)}
    progress.say(f'bench_data: pipeline, {count} reader thread(s): {latents / seconds:,.0f} '
                 f'latents/s wall, {latents / cpu:,.0f} per CPU second ({cpu / seconds:.2f} '
                 f'cores busy; {batches} batches of {batch["image"].shape[0]} x '
                 f'{tuple(batch["image"].shape[1:])}; epoch-0 plan {plan_s:.1f}s; load avg '
                 f'{os.getloadavg()[0]:.1f})')
  return results


def bench_encode(workdir: str, num_images: int, resolution: int) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.data import encoding, image_sources  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import vae, vae_weights  # pylint: disable=import-outside-toplevel
  root = os.path.join(workdir, 'encode_images')
  rng = np.random.default_rng(0)
  for i in range(num_images):
    path = os.path.join(root, f'class{i % 4}', f'{i:05d}.jpg')
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
  tiny = vae.VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
  vae_dir = vae_weights.save_diffusers(vae.create(tiny), os.path.join(workdir, 'tiny_vae'))

  source_config = image_sources.default_config('folder')
  source_config.path = root
  source = image_sources.open_source(source_config)
  t0 = time.perf_counter()
  for i in range(source.size):
    encoding.center_crop_adm(source.read(i)[0], resolution)
  host_rate = source.size / (time.perf_counter() - t0)

  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  config = config_dict.ConfigDict(dict(
      vae_dir=vae_dir, resolution=resolution, flip=False, store='moments', dtype='float16',
      compute_dtype='float32', seed=0, batch_size=64, shard_size=num_images, num_workers=2,
      log_every_s=30.0, data=source_config))
  out = os.path.join(workdir, 'encode_out')
  if os.path.exists(out):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(out)
  t0 = time.perf_counter()
  encoding.run(config, out, log=lambda line: None)
  total_rate = num_images / (time.perf_counter() - t0)
  progress.say(f'bench_data: encode {num_images} JPEGs 500x375 -> {resolution}px, tiny VAE '
               f'{tiny.block_out_channels}: host decode+crop {host_rate:.0f} images/s (1 thread), '
               f'whole job {total_rate:.0f} images/s (compile included)')
  return {'images': num_images, 'resolution': resolution, 'vae': list(tiny.block_out_channels),
          'host_decode_crop_per_s_1_thread': round(host_rate, 1),
          'job_images_per_s': round(total_rate, 1)}


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  os.makedirs(f.workdir, exist_ok=True)
  result = {'pipeline': bench_pipeline(f.config, f.workdir, f.n,
                                       [int(t) for t in f.threads], f.batches, f.warmup)}
  if f.encode_images:
    result['encode'] = bench_encode(f.workdir, f.encode_images, f.encode_resolution)
  result['machine'] = (f'{platform.machine()}, {os.cpu_count()} cores, load avg at end '
                       f'{os.getloadavg()[0]:.1f}')
  with open(os.path.join(f.workdir, 'bench_data.json'), 'w') as fh:
    json.dump(result, fh, indent=1)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'A training config (model shapes, batch).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', '/tmp/bench_data', 'The synthetic set and results go here.')
  flags.DEFINE_integer('n', 131_072, 'Rows of the synthetic latents set.')
  flags.DEFINE_list('threads', ['1', '2'], 'Grain reader thread counts to time.')
  flags.DEFINE_integer('batches', 100, 'Timed batches per thread count.')
  flags.DEFINE_integer('warmup', 5, 'Batches read before timing.')
  flags.DEFINE_integer('encode_images', 256, 'Images for the encode benchmark (0: skip).')
  flags.DEFINE_integer('encode_resolution', 256, 'Encode resolution.')
  flags.mark_flags_as_required(['config'])
  cli.run(main, dirs=())
