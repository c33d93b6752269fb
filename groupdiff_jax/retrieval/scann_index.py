"""ScaNN backend: tree partitioning + anisotropic asymmetric hashing + exact float32 reorder.

Memory: the index is built on the training sample only and the rest of the database is then
upserted shard by shard, so no full float32 copy of the database exists outside ScaNN's own. At
ImageNet size and width 1024 the whole neighbours run peaks at 10.9 GiB this way; a bulk build
holds ours, ScaNN's and its build transient at once and peaked at 16.3 GiB (BENCHMARKS.md).

Parameters follow ScaNN's rules of thumb (docs/algorithms.md), derived from n and tuned on
realistic 1024-d synthetic data (BENCHMARKS.md, "Neighbour index"); every one can be overridden by
a config key of the same name. scann is imported lazily: it is a Linux-only wheel and only this
backend needs it.
"""
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from groupdiff_jax import progress
from groupdiff_jax.retrieval.embedding_store import EmbeddingSet

# Keys a config may override; None means "derive from n" (see derive_params).
PARAM_KEYS = ('num_leaves', 'leaves_to_search', 'training_sample_size', 'training_iterations',
              'min_partition_size', 'quantize_centroids', 'dims_per_block',
              'residual_quantization', 'anisotropic_threshold', 'hash_type',
              'reorder', 'reorder_dtype', 'soar_lambda', 'num_threads', 'seed', 'kmeans_init',
              'upsert_batch', 'reserve', 'spherical')


def derive_params(n: int, k: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Index parameters for n points and k results; `overrides` (non-None values) win."""
  # ~1.5 sqrt(n) leaves (1,698 at ImageNet size): with fewer, larger leaves the leaf scans
  # dominate (1,132 leaves searched 2537 q/s against 4611 for 1,700, at equal recall).
  leaves = max(2, min(n // 20, round(1.5 * math.sqrt(n))))
  params = {
      'num_leaves': leaves,
      # ~1.6% of the leaves, at least 24 (27 at ImageNet size). Embeddings shaped like real ones
      # (synthetic.py 'realistic': overlapping Zipf-sized classes) need ~20-24 leaves for
      # recall@100 >= 0.95 at 128k and at 400k rows, where the well-separated clustered data was
      # at 1.0 from 6 on; the old 0.65% (8-11 leaves) gave recall@100 0.90-0.93 (BENCHMARKS.md).
      # SOAR spilling reached equal recall with fewer leaves but cost more to build than it saved.
      'leaves_to_search': max(24, round(leaves / 64)),
      # k-means cost is sample x leaves x dim per iteration; 100k samples train ~1k leaves well.
      'training_sample_size': min(n, 100_000),
      'training_iterations': 6,
      # ScaNN re-splits leaves smaller than this with an entropy-seeded RNG, which makes builds
      # (and so the neighbour file) differ between runs; 1 disables that and keeps them identical.
      'min_partition_size': 1,
      'dims_per_block': 2,
      'anisotropic_threshold': 0.2,
      'hash_type': 'lut16',
      # Residual AH (ScaNN's default under a tree) makes a transient float32 copy of the whole
      # database while building: ~+5 GB at ImageNet size with width 1024, past the 16 GB budget.
      # Without it recall is unchanged here: the exact reorder repairs the coarser AH ranking.
      'residual_quantization': False,
      # Exact rescoring of the AH candidates: this is what makes the returned sims exact.
      'reorder': max(200, 2 * (k + 1)),
      'reorder_dtype': 'float32',
      'soar_lambda': None,
      'quantize_centroids': False,
      'num_threads': os.cpu_count() or 1,
      'seed': 1,
      'kmeans_init': 'kmeans++',   # random | kmeans++
      # Spherical k-means (unit centroids): points are then assigned to leaves by the same
      # dot product that ranks leaves for a query. With plain k-means, points are assigned by L2
      # (which favours small-norm centroids) but queries rank leaves by dot product (which
      # favours large norms): a cluster left without a centroid of its own ends up in leaves no
      # query of it searches (1,281,167 clustered points: recall@16 0.958 even at 80 leaves).
      'spherical': True,
      'upsert_batch': 1024,
      'reserve': True,
  }
  for key, value in (overrides or {}).items():
    if key not in params:
      raise KeyError(f'unknown ScaNN parameter {key!r}; known: {", ".join(PARAM_KEYS)}')
    if value is not None:
      params[key] = value
  params['leaves_to_search'] = min(params['leaves_to_search'], params['num_leaves'])
  return params


def _sample_ids(n: int, size: int, seed: int) -> np.ndarray:
  """Sorted random ids the trees and codebooks are trained on (image ids may be ordered by
  class, so the first rows are not a sample)."""
  if size >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def _config(sample: np.ndarray, k: int, p: dict[str, Any]) -> str:
  import scann  # pylint: disable=import-outside-toplevel  (lazy: optional Linux-only wheel)
  reorder_types = {'float32': scann.scann_ops_pybind.scann_builder.ReorderType.FLOAT32,
                   'bfloat16': scann.scann_ops_pybind.scann_builder.ReorderType.BFLOAT16,
                   'int8': scann.scann_ops_pybind.scann_builder.ReorderType.INT8}
  builder = scann.scann_ops_pybind.builder(sample, k + 1, 'dot_product')
  builder = builder.tree(
      num_leaves=p['num_leaves'], num_leaves_to_search=p['leaves_to_search'],
      training_sample_size=p['training_sample_size'],
      training_iterations=p['training_iterations'],
      min_partition_size=p['min_partition_size'], soar_lambda=p['soar_lambda'],
      quantize_centroids=p['quantize_centroids'], random_init=p['kmeans_init'] == 'random',
      spherical=p['spherical'])
  builder = builder.score_ah(p['dims_per_block'],
                             anisotropic_quantization_threshold=p['anisotropic_threshold'],
                             training_sample_size=p['training_sample_size'],
                             hash_type=p['hash_type'],
                             residual_quantization=p['residual_quantization'])
  builder = builder.reorder(p['reorder'], quantize=reorder_types[p['reorder_dtype']])
  # The builder does not expose the partitioner's k-means seed: pin it in the text config, so
  # the seed is explicit (recorded in the header) and can be varied.
  return builder.create_config().replace(
      'partitioning {', f'partitioning {{\n clustering_seed: {p["seed"]}', 1)


class Index:
  """A ScaNN searcher and the image id of each of its internal rows."""

  def __init__(self, searcher, row_ids: np.ndarray):
    self.searcher, self.row_ids = searcher, row_ids

  def search(self, queries: np.ndarray, k: int, params: dict[str, Any]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(image ids [q, k], dot products [q, k]) best first, searched with all threads."""
    # The raw pybind call: the wrapper would map each result to its docid in Python.
    idx, dist = self.searcher.searcher.search_batched(
        queries, k, params['reorder'], params['leaves_to_search'], True, 256)
    return self.row_ids[idx], dist


def build(emb: EmbeddingSet, k: int, params: dict[str, Any],
          log: Callable[[str], None] | None = print) -> Index:
  """Trains on a random sample of `emb`, then upserts every other row shard by shard."""
  import scann  # pylint: disable=import-outside-toplevel
  p = params
  sample = _sample_ids(emb.n, p['training_sample_size'], p['seed'])
  rows = emb.take(sample)
  searcher = scann.scann_ops_pybind.create_searcher(
      rows, _config(rows, k, p), p['num_threads'], docids=sample.tolist())
  searcher.set_num_threads(p['num_threads'])
  del rows
  if p['reserve']:  # grow storage once: vector doubling while upserting would peak at ~3x
    searcher.reserve(emb.n)
  in_sample = np.zeros(emb.n, bool)
  in_sample[sample] = True
  added = progress.Progress('scann: add', emb.n - len(sample), unit='rows',
                            log=log or (lambda line: None))
  for start, block in emb.unit_blocks():
    ids = np.arange(start, start + len(block))
    new = ~in_sample[ids]
    if new.any():
      searcher.upsert(ids[new].tolist(), np.ascontiguousarray(block[new]),
                      batch_size=p['upsert_batch'])
      added.update(int(new.sum()))
  return Index(searcher, np.asarray(searcher.docids, np.int32))


def drop_self(ids: np.ndarray, sims: np.ndarray, first_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
  """[q, K+1] results of queries first_id.. -> [q, K] without each query's own id.

  The query is usually first, but exact duplicates tie with it, and an approximate search may
  miss it; rows that lack it lose their last (least similar) entry instead.
  """
  q, k1 = ids.shape
  is_self = ids == (first_id + np.arange(q))[:, None]
  missing = ~is_self.any(axis=1)
  is_self[missing, k1 - 1] = True
  is_self &= np.cumsum(is_self, axis=1) == 1  # one column per row, even if the id repeats
  keep = ~is_self
  return ids[keep].reshape(q, k1 - 1), sims[keep].reshape(q, k1 - 1)


def search_all(index: Index, blocks: Iterable[tuple[int, np.ndarray]], n: int, k: int,
               params: dict[str, Any], log: Callable[[str], None] | None = print
               ) -> tuple[np.ndarray, np.ndarray]:
  """Top k of every id, itself excluded; `blocks` yields (start id, unit-norm float32 rows).

  Each block asks for k+1 results and drops the query's own id right away (drop_self), so no
  [n, k+1] intermediate is ever held.
  """
  ids = np.empty((n, k), np.int32)
  sims = np.empty((n, k), np.float16)  # the file's precision; halves the largest output array
  done = progress.Progress('scann: query', n, unit='queries', log=log or (lambda line: None))
  for start, rows in blocks:
    idx, dist = index.search(rows, k + 1, params)
    if idx.shape[1] < k + 1:  # fewer candidates than asked: too few leaves searched
      raise RuntimeError(f'ScaNN returned {idx.shape[1]} < {k + 1} results; raise '
                         'leaves_to_search or reorder')
    stop = start + len(rows)
    ids[start:stop], sims[start:stop] = drop_self(idx, dist, start)
    done.update(len(rows))
  return ids, sims
