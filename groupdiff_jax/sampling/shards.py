"""The sampling job's output directory: a manifest, `.npz` shards, and the merged `samples.npz`.

  OUT/manifest.json                    the run's identity (checkpoint, step, model, sampler
                                       settings, seed, plan) and every shard's id range
  OUT/shard_00000_0000000-0001024.npz  images uint8 [n, H, W, C], labels int32 [n], ids int64 [n]
                                       (the kept images of ids [start, end))
  OUT/samples.npz                      `merge`: arr_0 uint8 [N, H, W, C], arr_1 labels, what the
                                       ADM evaluator reads; OUT/samples_grid.png the first images

Each shard is written to a temporary name and renamed, so a shard file that exists is complete:
a killed job restarted with the same command skips those and redoes the rest. A directory whose
manifest records another run (or that holds shards without a manifest) is refused untouched.
"""
import json
import os
import re

import numpy as np

from groupdiff_jax import image_grid
from groupdiff_jax.cli import UserError
from groupdiff_jax.sampling.plan import Plan

MANIFEST = 'manifest.json'
MERGED = 'samples.npz'
GRID = 'samples_grid.png'
_SHARD = re.compile(r'shard_(\d{5})_(\d{7})-(\d{7})\.npz$')


def shard_name(k: int, start: int, end: int) -> str:
  return f'shard_{k:05d}_{start:07d}-{end:07d}.npz'


def _atomic_write(path: str, write) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def manifest(run: dict, plan: Plan) -> dict:
  shards = [dict(zip(('shard', 'start', 'end'), (k, *plan.shard_range(k))),
                 file=shard_name(k, *plan.shard_range(k)))
            for k in range(plan.num_shards)]
  return {'run': run, 'shards': shards}


def read_manifest(out: str) -> dict | None:
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def prepare(out: str, content: dict, *, write: bool) -> None:
  """Accepts `out` for this run (writing the manifest when `write`) or refuses another run's."""
  existing = read_manifest(out)
  if existing is not None:
    if existing != json.loads(json.dumps(content)):
      diff = sorted(k for k in set(existing.get('run', {})) | set(content['run'])
                    if existing.get('run', {}).get(k) != content['run'].get(k))
      raise UserError(f'{out} holds the shards of another sampling run (differs in: '
                      f'{", ".join(diff) or "shard layout"}); use a new --workdir, or rerun with '
                      'the settings in its manifest.json to resume it')
    return
  strays = [n for n in os.listdir(out) if _SHARD.match(n)] if os.path.isdir(out) else []
  if strays:
    raise UserError(f'{out} holds {len(strays)} shard files but no {MANIFEST}: they belong to an '
                    'unknown run; use a new --workdir')
  if write:
    os.makedirs(out, exist_ok=True)
    _atomic_write(os.path.join(out, MANIFEST),
                  lambda f: f.write(json.dumps(content, indent=1).encode()))


def finished(out: str, plan: Plan) -> set[int]:
  return {k for k in range(plan.num_shards)
          if os.path.isfile(os.path.join(out, shard_name(k, *plan.shard_range(k))))}


def write_shard(out: str, k: int, start: int, end: int, images: np.ndarray, labels: np.ndarray,
                ids: np.ndarray) -> str:
  path = os.path.join(out, shard_name(k, start, end))
  _atomic_write(path, lambda f: np.savez(f, images=images, labels=labels, ids=ids))
  return path


def merge(out: str, *, grid_images: int = 64) -> str:
  """Concatenates every shard (checking each id appears once) into OUT/samples.npz + a grid whose
  rows hold whole groups."""
  content = read_manifest(out)
  if content is None:
    raise UserError(f'{out} has no {MANIFEST}: not a sampling job directory')
  missing = [s['file'] for s in content['shards']
             if not os.path.isfile(os.path.join(out, s['file']))]
  if missing:
    raise UserError(f'{out}: {len(missing)} of {len(content["shards"])} shards are not written '
                    f'yet (first: {missing[0]}); finish the run with the same command first')
  images, labels, ids = [], [], []
  for s in content['shards']:
    with np.load(os.path.join(out, s['file'])) as z:
      images.append(z['images'])
      labels.append(z['labels'])
      ids.append(z['ids'])
  images, labels, ids = np.concatenate(images), np.concatenate(labels), np.concatenate(ids)
  expected = content['run']['num_samples']
  if len(ids) != expected or len(np.unique(ids)) != len(ids):
    raise UserError(f'{out}: the shards hold {len(ids)} images ({len(np.unique(ids))} distinct '
                    f'ids), expected {expected}; the directory was modified')
  path = os.path.join(out, MERGED)
  _atomic_write(path, lambda f: np.savez(f, arr_0=images, arr_1=labels))
  if grid_images:
    first = images[:grid_images].astype(np.float32) / 127.5 - 1.0  # back to [-1, 1] for the grid
    group = content['run'].get('group_size', 1)
    image_grid.save_grid(first, os.path.join(out, GRID), columns=group * max(1, 8 // group),
                         scale=max(1, 128 // images.shape[1]))
  return path
