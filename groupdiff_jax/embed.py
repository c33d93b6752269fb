"""Embeds every image of a dataset with DINOv2 or CLIP into L2-normalised float16 shards.

  python -m groupdiff_jax.embed --config=configs/embed_dinov2_folder.py \
      --config.model_dir=/models/dinov2-large --config.data.path=/data/imagenet/train \
      --workdir=/data/emb/imagenet_dinov2_l

Writes WORKDIR/manifest.json + embeddings-XXXXX-of-YYYYY.npy (retrieval/embedding_store.py), and
image_ids.txt for a folder source. Images come from the shared source layer
(data/image_sources.py), so ids match the encode job's. An unreadable image is skipped: it is
listed in the manifest's "failed" and its row is a random unit vector (seeded by its id) that
keeps the id space whole; the trainer never draws it, since the latents lack it. Batches are
sharded over the process's devices (a 1-D 'data' mesh); the encoder's own preprocessing is
applied (host: resize + centre crop in PIL threads; device: normalisation). Rerunning the same
command resumes: finished shards are skipped.

Multi-host: the same command on every host with --distributed. Process p embeds shards p, p + P,
... on its own devices (no collective in the loop); process 0 writes the manifest, the others
list their unreadable images in failed-process-<p>.json, which process 0 merges into the
manifest after a barrier at the end.
"""
import glob
import json
import concurrent.futures
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from groupdiff_jax import cli, progress
from groupdiff_jax.data import image_sources
from groupdiff_jax.models import encoders
from groupdiff_jax.retrieval import embedding_store, preprocess
from groupdiff_jax.retrieval.errors import InputError

# Manifest fields that must agree for a rerun to resume rather than mix two jobs.
_IDENTITY = ('dataset', 'encoder', 'n', 'dim', 'dtype', 'shard_size', 'ids', 'id_list_sha1',
             'preprocess')


def make_embed_fn(encoder: encoders.Encoder, spec: encoders.Preprocess, mesh: Mesh):
  """jit(state, uint8 [B, H, W, 3]) -> unit-norm float32 [B, D]; B sharded over mesh 'data'."""
  batch, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def embed(state, images):
    e = encoder.apply(state, preprocess.normalise(images, spec)).astype(jnp.float32)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return jax.jit(embed, in_shardings=(replicated, batch), out_shardings=batch), batch, replicated


def _plan(config, source: image_sources.ImageSource, encoder: encoders.Encoder,
          spec: encoders.Preprocess) -> dict[str, Any]:
  id_sha = source.id_list_sha1
  return embedding_store.plan_manifest(
      dataset=source.name, encoder=f'{encoder.kind}:{encoder.name}', n=source.size,
      dim=encoder.embed_dim, shard_size=config.shard_size, ids=source.ids, source=source.info,
      id_list_sha1=id_sha, preprocess={'resize': spec.resize, 'crop': spec.crop,
                                       'mean': list(spec.mean), 'std': list(spec.std)},
      model_dir=os.path.abspath(config.model_dir), compute_dtype=config.dtype)


def run(config: ml_collections.ConfigDict, workdir: str,
        log: Callable[[str], None] = progress.say) -> dict[str, Any]:
  """Embeds the configured dataset into workdir; returns the manifest."""
  if not workdir:
    raise InputError('--workdir is not set')
  if not config.model_dir:
    raise InputError('config.model_dir is not set (a Hugging Face DINOv2/CLIP folder)')
  source = image_sources.open_source(config.data)
  try:
    encoder = encoders.load_encoder(config.model_dir, kind=config.encoder_kind or None,
                                    dtype=jnp.dtype(config.dtype))
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise InputError(f'encoder {config.model_dir}: {e}') from None
  spec = encoder.preprocess
  if config.resize or config.crop:  # e.g. DINOv2 at 448 px: position embeddings interpolate
    spec = encoders.Preprocess(config.resize or spec.resize, config.crop or spec.crop,
                               spec.mean, spec.std)
  manifest = _plan(config, source, encoder, spec)
  old = embedding_store.read_manifest(workdir) if os.path.exists(
      os.path.join(workdir, embedding_store.MANIFEST)) else None
  image_sources.refuse_other_job(workdir, old, manifest, _IDENTITY, 'embeddings')
  # Failed images of finished shards (also those a killed multi-process run left in side files).
  previous = (list(old.get('failed', [])) if old else []) + _read_side_files(workdir)
  pid, count = jax.process_index(), jax.process_count()
  os.makedirs(workdir, exist_ok=True)  # a process's shards may come before process 0's manifest
  if pid == 0:
    image_sources.write_id_list(workdir, source)

  mesh = Mesh(np.array(jax.local_devices()), ('data',))
  fn, batch_sharding, replicated = make_embed_fn(encoder, spec, mesh)
  state = jax.device_put(encoder.state, replicated)
  ndev = mesh.devices.size
  bsz = -(-config.batch_size // ndev) * ndev  # every device gets the same number of rows

  shards = manifest['shards']
  mine = shards[pid::count]
  todo = [s for s in mine if not embedding_store.shard_done(workdir, s, manifest['dim'])]
  total = sum(s['count'] for s in todo)
  log(f'embed: {source.name}: {source.size} images -> {len(shards)} shards of '
      f'{config.shard_size} ({len(mine) - len(todo)} of this process\'s {len(mine)} already '
      f'done), encoder {manifest["encoder"]} dim {manifest["dim"]}, batch {bsz} over {ndev} '
      'devices' + (f', process {pid} of {count}' if count > 1 else ''))

  # Failed images of this process's finished shards are kept (redone shards list theirs again).
  # Process 0's manifest also keeps the other processes' until their lists replace them at the
  # end; until then each of those is in its side file, so a killed job loses none.
  mine_files, todo_files = {s['file'] for s in mine}, {s['file'] for s in todo}
  failed = [f for f in _unique(previous) if _shard_of(shards, f['id']) in mine_files - todo_files]
  others = [f for f in _unique(previous) if _shard_of(shards, f['id']) not in mine_files]

  def report() -> None:
    manifest['failed'] = sorted(failed + (others if pid == 0 else []), key=lambda f: f['id'])
    if pid == 0:
      embedding_store.write_manifest(workdir, manifest)
    else:
      _write_json(_side_file(workdir, pid), sorted(failed, key=lambda f: f['id']))
  report()

  def prepare(i: int) -> np.ndarray | None:
    image, _, why = source.try_read(i)
    if image is None:
      failed.append({'id': i, 'image': source.describe(i), 'error': why})
      return None
    try:
      return preprocess.resize_and_crop(image, spec)
    except ValueError as e:  # e.g. smaller than the crop after resizing: unusable like a corrupt one
      failed.append({'id': i, 'image': source.describe(i), 'error': f'ValueError: {e}'})
      return None

  bar = progress.Progress('embed', total, unit='images', every_s=config.log_every_s, log=log)
  blank = np.zeros((spec.crop, spec.crop, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(max(1, config.num_workers)) as pool:
    for shard in todo:
      ids = range(shard['start'], shard['start'] + shard['count'])
      batches = [ids[j:j + bsz] for j in range(0, len(ids), bsz)]
      out = np.empty((len(ids), manifest['dim']), np.float32)
      pending = [pool.submit(prepare, i) for i in batches[0]]
      for bi, batch in enumerate(batches):
        results = [f.result() for f in pending]
        if bi + 1 < len(batches):  # decode the next batch while the devices run this one
          pending = [pool.submit(prepare, i) for i in batches[bi + 1]]
        images = np.stack([blank if r is None else r for r in results])
        if len(images) < bsz:
          images = np.concatenate([images, np.zeros((bsz - len(images),) + images.shape[1:],
                                                    np.uint8)])
        emb = np.array(fn(state, jax.device_put(images, batch_sharding)))[:len(batch)]
        for j, r in enumerate(results):
          if r is None:  # a placeholder that keeps the id space whole (see the module docstring)
            emb[j] = placeholder_row(batch.start + j, manifest['dim'])
        row = batch.start - shard['start']
        out[row:row + len(batch)] = emb
        bar.update(len(batch), extra=f'shard {shards.index(shard) + 1}/{len(shards)}')
      embedding_store.write_shard(workdir, shard, out, manifest['dtype'])
      report()
  if count > 1:  # every shard and side file on disk before process 0 merges them
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('groupdiff_jax.embed: shards written')
    if pid != 0:
      return manifest
    manifest['failed'] = sorted(_unique(failed + _read_side_files(workdir)),
                                key=lambda f: f['id'])
    embedding_store.write_manifest(workdir, manifest)
  for path in glob.glob(_side_file(workdir, '*')):  # all in the manifest now
    os.remove(path)
  log(f'embed: done, {len(shards)} shards in {workdir} ({progress.duration(bar.seconds)} this '
      f'run), {len(manifest.get("failed", failed))} unreadable images skipped')
  return manifest


def placeholder_row(image_id: int, dim: int) -> np.ndarray:
  """A random unit vector seeded by the id: unlike any real embedding, never NaN or zero."""
  x = np.random.default_rng([image_id, 7]).standard_normal(dim)
  return (x / np.linalg.norm(x)).astype(np.float32)


def _side_file(workdir: str, pid: int | str) -> str:
  return os.path.join(workdir, f'failed-process-{pid}.json')


def _read_side_files(workdir: str) -> list[dict[str, Any]]:
  out = []
  for path in sorted(glob.glob(_side_file(workdir, '*'))):
    with open(path) as f:
      out.extend(json.load(f))
  return out


def _write_json(path: str, value: Any) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f)
  os.replace(path + '.tmp', path)


def _unique(failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One entry per image id (the last one listed)."""
  return list({f['id']: f for f in failed}.values())


def _shard_of(shards: list[dict[str, Any]], image_id: int) -> str:
  return next(s['file'] for s in shards if s['start'] <= image_id < s['start'] + s['count'])


def main(argv: list[str]) -> None:
  del argv
  cli.initialize_distributed()
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags are defined only when run as a program: importing this module (tests, other
  # commands that also define --config) must not register them.
  config_flags.DEFINE_config_file('config', None, 'embed config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory that receives the embedding shards.')
  cli.define_distributed_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main, dirs=('workdir',))
