"""Exact cosine top-K by blocked matmul in JAX: small datasets and the recall oracle for ScaNN."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('k',))
def _block_topk(queries, database, query_ids, k: int):
  sims = queries @ database.T                                   # [q, n]
  # Exclude each query itself: its own row id gets -inf.
  cols = jnp.arange(database.shape[0])[None, :]
  sims = jnp.where(cols == query_ids[:, None], -jnp.inf, sims)
  return jax.lax.top_k(sims, k)


def exact_topk(embeddings: np.ndarray, k: int, *, query_ids: np.ndarray | None = None,
               block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Top-k neighbours (self excluded) of `query_ids` (default: all rows) by dot product.

  `embeddings` should be L2-normalised, so the dot product is the cosine similarity.
  Returns (ids int32 [q, k], sims float32 [q, k]) sorted by decreasing similarity.
  """
  n = embeddings.shape[0]
  if k >= n:
    raise ValueError(f'K={k} must be smaller than the number of embeddings n={n}')
  database = jnp.asarray(embeddings, jnp.float32)
  query_ids = np.arange(n) if query_ids is None else np.asarray(query_ids)
  out_ids, out_sims = [], []
  for start in range(0, len(query_ids), block):
    qid = query_ids[start:start + block]
    pad = block - len(qid) if len(query_ids) > block else 0  # keep one compiled shape
    qid_p = np.pad(qid, (0, pad), mode='edge')
    sims, ids = _block_topk(database[qid_p], database, jnp.asarray(qid_p), k)
    out_ids.append(np.asarray(ids)[:len(qid)])
    out_sims.append(np.asarray(sims)[:len(qid)])
  return np.concatenate(out_ids).astype(np.int32), np.concatenate(out_sims)
