"""A synthetic latents directory + neighbour file in the real formats (for benchmarks).

Random posterior moments in the encode job's ArrayRecord layout (data/latent_store.py) and
clustered pseudo-neighbours in the neighbour-file layout, with matching dataset names, so
`data.source='latents'` reads them exactly as it reads ImageNet's.
"""
import os
from collections.abc import Callable

import numpy as np

from groupdiff_jax import progress
from groupdiff_jax.data import latent_store, sources
from groupdiff_jax.retrieval import neighbor_file

DATASET = 'synthetic-latents'


def write(directory: str, n: int, *, latent_shape: tuple[int, int, int] = (32, 32, 4),
          num_classes: int = 1000, k: int = 100, shard_size: int = 16_384,
          dtype: str = 'float16', seed: int = 0,
          log: Callable[[str], None] = progress.say) -> tuple[str, str]:
  """Writes DIR/latents and DIR/neighbors (skipped when complete); returns both paths."""
  lat_dir, nbr_dir = os.path.join(directory, 'latents'), os.path.join(directory, 'neighbors')
  ids = f'synthetic ids 0..{n - 1}'
  if not _complete(lat_dir, n):
    manifest = latent_store.plan_manifest(
        dataset=DATASET, n=n, shard_size=shard_size, kind='moments', latent_shape=latent_shape,
        dtype=dtype, variants=1, ids=ids, id_list_sha1='', scaling_factor=0.18215,
        classes=[str(c) for c in range(num_classes)], resolution=8 * latent_shape[0])
    latent_store.write_manifest(lat_dir, manifest)
    rng = np.random.default_rng(seed)
    bar = progress.Progress('synthetic latents', n, unit='records', log=log)
    for shard in manifest['shards']:
      writer = latent_store.ShardWriter(lat_dir, shard, manifest)
      shape = (shard['count'], 1, *latent_shape)
      mean = rng.standard_normal(shape, np.float32).astype(dtype)
      std = rng.uniform(0.01, 0.1, shape).astype(dtype)
      labels = rng.integers(num_classes, size=shard['count'])
      for j in range(shard['count']):
        writer.add(shard['start'] + j, int(labels[j]), mean=mean[j], std=std[j])
      writer.close()
      bar.update(shard['count'])
    latent_store.finalize(lat_dir, manifest)
  if not os.path.exists(os.path.join(nbr_dir, 'header.json')):
    nbr_ids, sims = sources.cluster_neighbors(n, k, np.random.default_rng([seed, 1]))
    neighbor_file.write_neighbors(nbr_dir, nbr_ids, sims, {'dataset': DATASET, 'ids': ids,
                                                           'encoder': 'synthetic clusters'})
  return lat_dir, nbr_dir


def _complete(directory: str, n: int) -> bool:
  try:
    manifest = latent_store.read_manifest(directory)
  except latent_store.UserError:
    return False
  return bool(manifest.get('complete')) and manifest.get('n') == n
