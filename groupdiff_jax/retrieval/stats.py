"""Numbers the neighbours command reports: recall against exact search, grouping statistics."""
from typing import Any

import numpy as np

from groupdiff_jax.retrieval import exact
from groupdiff_jax.retrieval.embedding_store import EmbeddingSet

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def recall_sample(n: int, num_queries: int, seed: int) -> np.ndarray:
  """Sorted ids of the random recall queries (a fixed seed: reruns measure the same sample)."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=min(n, num_queries), replace=False))


def exact_truth(emb: EmbeddingSet, k: int, num_queries: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(query ids, their exact top-k ids): the reference recall is measured against.

  Independent of the index, so the neighbours command runs it in a thread while ScaNN builds
  (the build is mostly single-threaded and releases the GIL).
  """
  qids = recall_sample(emb.n, num_queries, seed)
  # Small blocks: this runs beside the index build, whose memory peak it adds to.
  true_ids, _ = exact.exact_topk_streamed(emb.take(qids), qids, emb.unit_blocks(16384), k)
  return qids, true_ids


def recall(ids: np.ndarray, truth: tuple[np.ndarray, np.ndarray], seed: int,
           at: tuple[int, ...] = (16,)) -> dict[str, Any]:
  """recall@k (and @a for a in `at`, a < k) of `ids` [n, k] against exact_truth's sample.

  recall@a = |approx top-a  intersect  exact top-a| / a, averaged over the sampled queries.
  """
  qids, true_ids = truth
  k = true_ids.shape[1]
  found = np.asarray(ids[qids])
  out: dict[str, Any] = {'num_queries': int(len(qids)), 'seed': seed}
  for a in sorted({a for a in at if a < k} | {k}):
    hits = [len(np.intersect1d(found[i, :a], true_ids[i, :a])) for i in range(len(qids))]
    out[f'at_{a}'] = float(np.mean(hits) / a)
  return out


def grouping(sims: np.ndarray, group_size: int, threshold: float) -> dict[str, Any]:
  """How well images can form groups of `group_size` from neighbours above `threshold`.

  share_groupable: the share of images whose (group_size-1)-th neighbour is >= threshold, i.e.
  that have at least group_size-1 neighbours above it. Percentiles of the similarity at a few
  ranks describe the distribution.
  """
  n, k = sims.shape
  out: dict[str, Any] = {'group_size': group_size, 'threshold': threshold}
  if 2 <= group_size <= k + 1:
    out['share_groupable'] = float(np.mean(sims[:, group_size - 2] >= threshold))
  ranks = sorted({1, max(1, group_size - 1), min(16, k), k})
  out['percentiles'] = list(PERCENTILES)
  out['similarity_at_rank'] = {
      str(r): [round(float(v), 4) for v in np.percentile(np.asarray(sims[:, r - 1], np.float32),
                                                         PERCENTILES)] for r in ranks}
  rows = np.linspace(0, n - 1, min(n, 100_000)).astype(int)  # all ranks, on a row sample
  out['similarity_all'] = [round(float(v), 4) for v in
                           np.percentile(np.asarray(sims[rows], np.float32), PERCENTILES)]
  return out


def format_grouping(g: dict[str, Any]) -> list[str]:
  lines = []
  if 'share_groupable' in g:
    lines.append(f'grouping: {100 * g["share_groupable"]:.1f}% of images have >= '
                 f'{g["group_size"] - 1} neighbours with cosine >= {g["threshold"]} '
                 f'(group size {g["group_size"]})')
  head = ' '.join(f'{"p" + str(p):>7}' for p in PERCENTILES)
  lines.append(f'similarity percentiles   {head}')
  for r, vals in g['similarity_at_rank'].items():
    lines.append(f'  neighbour rank {int(r):>4}    ' + ' '.join(f'{v:7.3f}' for v in vals))
  lines.append('  all ranks              ' + ' '.join(f'{v:7.3f}' for v in g['similarity_all']))
  return lines
