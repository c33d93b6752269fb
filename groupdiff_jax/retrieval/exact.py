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


@functools.partial(jax.jit, static_argnames=('k',))
def _merge_block_topk(best_sims, best_ids, queries, block, block_start, query_ids, k: int):
  sims = queries @ block.T                                      # [q, b]
  cols = block_start + jnp.arange(block.shape[0])
  sims = jnp.where(cols[None, :] == query_ids[:, None], -jnp.inf, sims)
  all_sims = jnp.concatenate([best_sims, sims], axis=1)
  all_ids = jnp.concatenate([best_ids, jnp.broadcast_to(cols, sims.shape).astype(jnp.int32)], 1)
  top_sims, pos = jax.lax.top_k(all_sims, k)
  return top_sims, jnp.take_along_axis(all_ids, pos, axis=1)


def exact_topk_streamed(queries: np.ndarray, query_ids: np.ndarray, blocks, k: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k of a few queries against a database too big to hold twice in memory.

  `blocks` yields (start id, unit-norm float32 rows) covering the database in id order; each block
  is scored and merged into a running top-k, so memory is one block plus [q, k]. Query ids are
  excluded as in exact_topk. Returns (ids int32 [q, k], sims float32 [q, k]), best first.
  """
  q = jnp.asarray(queries, jnp.float32)
  qid = jnp.asarray(query_ids, jnp.int32)
  best_sims = jnp.full((q.shape[0], k), -jnp.inf, jnp.float32)
  best_ids = jnp.full((q.shape[0], k), -1, jnp.int32)
  for start, block in blocks:
    best_sims, best_ids = _merge_block_topk(best_sims, best_ids, q, jnp.asarray(block, jnp.float32),
                                            jnp.int32(start), qid, k)
  return np.asarray(best_ids), np.asarray(best_sims)
