"""Clustered synthetic embeddings for the scale benchmark and tests, written as embedding shards.

Each point is   x = normalise(g*m + a*c_k + b*U_k z / sqrt(r) + s*e / sqrt(d))
  m    one shared unit direction (real image embeddings have a positive baseline similarity),
  c_k  the unit centre of its cluster k (uniform over `num_clusters`),
  U_k  a random d x r basis per cluster, z ~ N(0, I_r): within-cluster variation of low intrinsic
       dimension, so that "nearest neighbours" are meaningfully nearer than the rest of the cluster
       (isotropic noise alone makes every cluster member equidistant, unlike real embeddings),
  e    isotropic noise, N(0, I_d).
Defaults give top-1 neighbour similarities around 0.75 and random pairs around 0.1, in the range of
DINOv2 features on ImageNet. Generated in chunks (one per shard) from per-chunk seeds, so memory is
bounded by a shard and the output is independent of anything but the arguments.
"""
import numpy as np

from groupdiff_jax.retrieval import embedding_store


def cluster_params(num_clusters: int, dim: int, rank: int, seed: int) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng([seed, 0])
  mean = rng.standard_normal(dim).astype(np.float32)
  mean /= np.linalg.norm(mean)
  centres = rng.standard_normal((num_clusters, dim)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  bases = (rng.standard_normal((num_clusters, rank, dim)) / np.sqrt(dim)).astype(np.float32)
  return mean, centres, bases


def generate_chunk(start: int, count: int, params: tuple[np.ndarray, ...], *, seed: int,
                   weights: tuple[float, float, float, float]) -> np.ndarray:
  """Rows [start, start+count) as unit-norm float32; depends only on (start, seed, params)."""
  mean, centres, bases = params
  g, a, b, s = weights
  num_clusters, rank, dim = bases.shape
  rng = np.random.default_rng([seed, 1, start])
  labels = rng.integers(0, num_clusters, count)
  z = rng.standard_normal((count, rank), dtype=np.float32)
  x = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(s / np.sqrt(dim))
  x += g * mean + a * centres[labels]
  order = np.argsort(labels, kind='stable')
  bounds = np.searchsorted(labels[order], np.arange(num_clusters + 1))
  for k in range(num_clusters):  # one small matmul per cluster present in the chunk
    rows = order[bounds[k]:bounds[k + 1]]
    if len(rows):
      x[rows] += (b / np.sqrt(rank)) * (z[rows] @ bases[k])
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_clustered(directory: str, n: int, dim: int = 1024, *, num_clusters: int = 1000,
                    rank: int = 16, seed: int = 0, shard_size: int = 65536,
                    weights: tuple[float, float, float, float] = (0.3, 0.65, 0.6, 0.4),
                    dtype: str = 'float16', log=print) -> dict:
  """Writes n clustered embeddings as shards + manifest into `directory`; resumable."""
  manifest = embedding_store.plan_manifest(
      dataset=f'synthetic-clustered-n{n}-d{dim}-c{num_clusters}-r{rank}-seed{seed}',
      encoder='synthetic', n=n, dim=dim, shard_size=shard_size, dtype=dtype,
      ids='row index of the generator (groupdiff_jax.retrieval.synthetic)',
      source={'kind': 'synthetic', 'num_clusters': num_clusters, 'rank': rank, 'seed': seed,
              'weights': list(weights)})
  try:
    old = embedding_store.read_manifest(directory)
    if old['dataset'] != manifest['dataset'] or old['shards'] != manifest['shards']:
      raise ValueError(f'{directory} holds other embeddings ({old["dataset"]})')
  except embedding_store.InputError:
    pass
  embedding_store.write_manifest(directory, manifest)
  params = cluster_params(num_clusters, dim, rank, seed)
  for i, shard in enumerate(manifest['shards']):
    if embedding_store.shard_done(directory, shard, dim):
      continue
    rows = generate_chunk(shard['start'], shard['count'], params, seed=seed, weights=weights)
    embedding_store.write_shard(directory, shard, rows, dtype)
    if log and (i + 1) % 5 == 0:
      log(f'synthetic: {i + 1}/{len(manifest["shards"])} shards written')
  return manifest
