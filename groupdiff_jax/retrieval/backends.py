"""Index backends by name: how the neighbours command finds each image's top K.

  scann  tree + anisotropic AH + exact float32 reorder (retrieval/scann_index.py): large n
  exact  blocked matmul + top-k in JAX (retrieval/exact.py): small n, and the recall oracle
  auto   exact up to `exact_max_n` images, scann above

Every backend returns (ids int32 [n, K], sims float32 [n, K]) with the image itself excluded and
rows sorted by decreasing cosine similarity; `params` derives the parameters it will use from n
and K and the config's overrides (they go into the file header).
"""
import dataclasses
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from groupdiff_jax import progress
from groupdiff_jax.retrieval import exact, scann_index
from groupdiff_jax.retrieval.embedding_store import EmbeddingSet

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Backend:
  params: Callable[[int, int, dict[str, Any]], dict[str, Any]]    # (n, K, overrides) -> params
  run: Callable[[EmbeddingSet, int, dict[str, Any], Log],
                tuple[np.ndarray, np.ndarray]]                    # (embeddings, K, params, log)


def _exact_params(n: int, k: int, overrides: dict[str, Any]) -> dict[str, Any]:
  del n, k
  return {'block': int(overrides.get('block') or 1024)}


def _exact_run(emb: EmbeddingSet, k: int, params: dict[str, Any], log: Log):
  db = emb.load_float32()
  log(f'exact: {db.shape[0]} x {db.shape[0]} similarities in blocks of {params["block"]}')
  return exact.exact_topk(db, k, block=params['block'])


def _scann_params(n: int, k: int, overrides: dict[str, Any]) -> dict[str, Any]:
  return scann_index.derive_params(n, k, overrides)


def _scann_run(emb: EmbeddingSet, k: int, params: dict[str, Any], log: Log):
  log(f'scann: building index over {emb.n} x {emb.dim}: {params}')
  t0 = time.time()
  index = scann_index.build(emb, k, params, log)
  log(f'scann: index built in {progress.duration(time.time() - t0)} (RSS peak so far '
      f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB)')
  return scann_index.search_all(index, emb.unit_blocks(), emb.n, k, params, log)


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
