"""Index backends by name: how the neighbours command finds each image's top K.

  scann  tree + anisotropic AH + exact float32 reorder (retrieval/scann_index.py): large n
  exact  blocked matmul + top-k in JAX (retrieval/exact.py): small n, and the recall oracle
  auto   exact up to `exact_max_n` images, scann above

Every backend returns (ids int32 [n, K], sims float32 [n, K]) with the image itself excluded and
rows sorted by decreasing cosine similarity, plus the parameters it used (for the file header).
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from groupdiff_jax.retrieval import exact, scann_index
from groupdiff_jax.retrieval.embedding_store import EmbeddingSet

Log = Callable[[str], None]


class Handoff:
  """Passes the float32 database to a backend that may free it early (pop drops our reference)."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def pop(self) -> np.ndarray:
    array, self._array = self._array, None
    if array is None:
      raise RuntimeError('the database was already handed off')
    return array


@dataclasses.dataclass(frozen=True)
class Backend:
  params: Callable[[int, int, dict[str, Any]], dict[str, Any]]    # (n, K, overrides) -> params
  run: Callable[[EmbeddingSet, Handoff, int, dict[str, Any], Log],
                tuple[np.ndarray, np.ndarray]]                    # (set, float32 db, K, params)


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


def _exact_params(n: int, k: int, overrides: dict[str, Any]) -> dict[str, Any]:
  del n, k
  return {'block': int(overrides.get('block') or 1024)}


def _exact_run(emb: EmbeddingSet, handoff: Handoff, k: int, params: dict[str, Any], log: Log):
  del emb
  db = handoff.pop()
  log(f'exact: {db.shape[0]} x {db.shape[0]} similarities in blocks of {params["block"]}')
  return exact.exact_topk(db, k, block=params['block'])


def _scann_params(n: int, k: int, overrides: dict[str, Any]) -> dict[str, Any]:
  return scann_index.derive_params(n, k, overrides)


def _scann_run(emb: EmbeddingSet, handoff: Handoff, k: int, params: dict[str, Any], log: Log):
  db = handoff.pop()
  log(f'scann: building index over {db.shape[0]} x {db.shape[1]}: {params}')
  searcher = scann_index.build(db, k, params)
  # ScaNN holds its own copy; ours goes now and queries are re-read shard by shard (the same
  # unit-norm values), so the search phase holds one float32 copy of the database, not two.
  del db
  ids, sims = scann_index.search_all(searcher, emb.unit_blocks(), emb.n, k, params, log)
  del searcher
  return drop_self(ids, sims)


BACKENDS: dict[str, Backend] = {
    'exact': Backend(_exact_params, _exact_run),
    'scann': Backend(_scann_params, _scann_run),
}


def resolve(name: str, n: int, exact_max_n: int) -> str:
  if name == 'auto':
    return 'exact' if n <= exact_max_n else 'scann'
  if name not in BACKENDS:
    raise KeyError(name)
  return name
