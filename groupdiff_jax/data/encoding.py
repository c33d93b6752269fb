"""The encode job: images -> ADM centre crop -> SD-VAE posterior -> latent shards.

Every process of a (multi-host) job loads the VAE replicated over its own devices and encodes a
disjoint set of shards (shard i belongs to process i mod P); process 0 writes the manifest and,
after a barrier, marks it complete. Host threads decode and crop the next batch while the
devices encode this one. Rerunning the same command resumes: finished shards are skipped, a
partial one (only ever under a temporary name) is redone.
"""
import concurrent.futures
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from groupdiff_jax import progress
from groupdiff_jax.cli import UserError
from groupdiff_jax.data import image_sources, latent_store
from groupdiff_jax.retrieval import preprocess

# Manifest fields that must agree for a rerun to resume rather than mix two jobs.
_IDENTITY = ('dataset', 'n', 'ids', 'id_list_sha1', 'kind', 'latent_shape', 'dtype', 'variants',
             'shard_size', 'resolution', 'crop', 'vae', 'seed')


def center_crop_adm(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
  """ADM's center_crop_arr (guided-diffusion, used by DiT/SiT/GroupDiff): halve with a BOX filter
  while the short side is >= 2 * size, resize the short side to `size` with BICUBIC (each side
  rounded), then take the central size x size pixels. uint8 [size, size, 3]."""
  image = preprocess.to_pil(image)
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def _vae_description(vae_dir: str) -> str:
  return os.path.basename(os.path.normpath(os.path.abspath(vae_dir)))


def plan(config: ml_collections.ConfigDict, source: image_sources.ImageSource,
         latent_shape: tuple[int, int, int], scaling_factor: float) -> dict[str, Any]:
  return latent_store.plan_manifest(
      dataset=source.name, n=source.size, shard_size=config.shard_size, kind=config.store,
      latent_shape=latent_shape, dtype=config.dtype, variants=2 if config.flip else 1,
      ids=source.ids, id_list_sha1=source.id_list_sha1, source=source.info,
      classes=source.classes, resolution=config.resolution, crop='adm_center_crop',
      vae=_vae_description(config.vae_dir), vae_dir=os.path.abspath(config.vae_dir),
      scaling_factor=scaling_factor, seed=config.seed if config.store == 'sample' else None,
      compute_dtype=config.compute_dtype)


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not workdir:
    raise UserError('--workdir is not set')
  if not config.vae_dir:
    raise UserError('config.vae_dir is not set (a diffusers AutoencoderKL folder, e.g. a '
                    'snapshot of stabilityai/sd-vae-ft-ema)')
  if config.store not in latent_store.KINDS:
    raise UserError(f'config.store={config.store!r}; choose from {", ".join(latent_store.KINDS)}')


def run(config: ml_collections.ConfigDict, workdir: str,
        log: Callable[[str], None] = progress.say, *, process_index: int | None = None,
        process_count: int | None = None) -> dict[str, Any]:
  """Encodes the configured dataset into workdir; returns the manifest (complete on process 0).

  process_index/process_count default to JAX's (tests pass them to play the processes of a
  multi-host job one after the other, the others first)."""
  from groupdiff_jax.models import vae as vae_lib, vae_weights  # pylint: disable=import-outside-toplevel
  _check_config(config, workdir)
  source = image_sources.open_source(config.data)
  if not source.labelled:
    first = next((p for p in source.id_list or [] if '/' not in p), None)
    raise UserError(f'{source.name}: the encode job needs a label for every image ('
                    + (f'{first!r} is not inside a class folder)' if first else
                       f'no {config.data.label_key!r} feature)'))
  try:
    vae = vae_lib.load(config.vae_dir, mesh=vae_lib.default_mesh(jax.local_devices()),
                       dtype=config.compute_dtype)
  except vae_weights.VAEWeightsError as e:
    raise UserError(f'config.vae_dir: {e}') from None
  factor = vae.cfg.downsample_factor
  if config.resolution % factor:
    raise UserError(f'config.resolution={config.resolution} is not a multiple of the VAE\'s '
                    f'downsampling factor {factor}')
  side = config.resolution // factor
  manifest = plan(config, source, (side, side, vae.cfg.latent_channels), vae.scaling_factor)
  old = latent_store.read_manifest(workdir) if os.path.exists(
      os.path.join(workdir, latent_store.MANIFEST)) else None
  image_sources.refuse_other_job(workdir, old, manifest, _IDENTITY, 'latents')
  pid = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  os.makedirs(workdir, exist_ok=True)  # every process writes its shards, maybe before process 0
  if pid == 0:
    latent_store.write_manifest(workdir, manifest)
    image_sources.write_id_list(workdir, source)

  shards = manifest['shards']
  mine = shards[pid::count]
  todo = [s for s in mine if not latent_store.shard_done(workdir, s, source.name)]
  ndev = len(jax.local_devices())
  bsz = -(-config.batch_size // ndev) * ndev  # one compiled shape; every device gets equal rows
  log(f'encode: {source.name}: {source.size} images -> {len(shards)} shards '
      f'({len(mine) - len(todo)} of this process\'s {len(mine)} already done), '
      f'{config.resolution}px -> latents {manifest["latent_shape"]} {config.store} '
      f'{manifest["dtype"]}{" + flip copies" if config.flip else ""}, batch {bsz} over {ndev} '
      f'devices' + (f', process {pid} of {count}' if count > 1 else ''))
  bar = progress.Progress('encode', sum(s['count'] for s in todo), unit='images', log=log,
                          every_s=config.log_every_s)
  encoder = _Encoder(vae, config, source, bsz)
  with concurrent.futures.ThreadPoolExecutor(max(1, config.num_workers)) as pool:
    for shard in todo:
      encoder.encode_shard(workdir, shard, manifest, pool, bar)
  if jax.process_count() > 1:  # all shards on disk before process 0 declares the set complete
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('groupdiff_jax.encode: shards written')
  if pid == 0:
    manifest = latent_store.finalize(workdir, manifest)
    log(f'encode: done, {manifest["num_records"]} latents in {len(shards)} shards in {workdir} '
        f'({progress.duration(bar.seconds)} this run), {len(manifest["failed"])} unreadable '
        'images skipped' + ''.join(f'\n  skipped id {f["id"]} ({f["image"]}): {f["error"]}'
                                   for f in manifest['failed'][:10]))
  return manifest


class _Encoder:
  """Host preprocessing and the VAE call for one shard at a time."""

  def __init__(self, vae, config: ml_collections.ConfigDict,
               source: image_sources.ImageSource, batch_size: int):
    self.vae, self.config, self.source, self.bsz = vae, config, source, batch_size
    self.res = config.resolution

  def _prepare(self, i: int) -> tuple[np.ndarray | None, int, str]:
    image, label, why = self.source.try_read(i)
    if image is None:
      return None, label, why
    try:
      return center_crop_adm(image, self.res), label, ''
    except (ValueError, OSError) as e:  # decoding can also fail lazily, inside the resize
      return None, label, f'{type(e).__name__}: {e}'

  def _moments(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [B, R, R, 3] -> (mean, std) float32 [B, V, h, w, c] (V = 2 with flip copies)."""
    views = [crops, crops[:, :, ::-1]] if self.config.flip else [crops]
    x = np.concatenate(views).astype(np.float32) / 127.5 - 1.0  # [-1, 1] as in ADM/DiT
    mean, logvar = self.vae.moments(x)
    mean, std = np.asarray(mean), np.exp(0.5 * np.asarray(logvar))
    b = len(crops)
    return (np.stack([mean[v * b:(v + 1) * b] for v in range(len(views))], axis=1),
            np.stack([std[v * b:(v + 1) * b] for v in range(len(views))], axis=1))

  def encode_shard(self, workdir: str, shard: dict[str, Any], manifest: dict[str, Any],
                   pool: concurrent.futures.Executor, bar: progress.Progress) -> None:
    ids = range(shard['start'], shard['start'] + shard['count'])
    batches = [ids[j:j + self.bsz] for j in range(0, len(ids), self.bsz)]
    writer = latent_store.ShardWriter(workdir, shard, manifest)
    blank = np.zeros((self.res, self.res, 3), np.uint8)
    pending = [pool.submit(self._prepare, i) for i in batches[0]]
    for bi, batch in enumerate(batches):
      results = [f.result() for f in pending]
      if bi + 1 < len(batches):  # decode the next batch while the devices run this one
        pending = [pool.submit(self._prepare, i) for i in batches[bi + 1]]
      crops = np.stack([blank if r[0] is None else r[0] for r in results] +
                       [blank] * (self.bsz - len(results)))
      mean, std = self._moments(crops)
      for j, (image_id, (crop, label, why)) in enumerate(zip(batch, results)):
        if crop is None:
          writer.skip(image_id, self.source.describe(image_id), why)
        elif manifest['kind'] == 'moments':
          writer.add(image_id, label, mean=mean[j], std=std[j])
        else:  # one fixed posterior sample per image and view (the official GroupDiff cache)
          eps = np.random.default_rng([self.config.seed, image_id]).standard_normal(
              mean[j].shape, np.float32)
          writer.add(image_id, label,
                     latent=(mean[j] + std[j] * eps) * manifest['scaling_factor'])
      bar.update(len(batch))
    writer.close()
