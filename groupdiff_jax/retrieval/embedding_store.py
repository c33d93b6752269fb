"""Embedding shards: what `groupdiff_jax.embed` writes and `groupdiff_jax.neighbors` reads.

A directory holding
  manifest.json                      {"format": "groupdiff-embeddings/1", "dataset", "encoder",
                                      "n", "dim", "dtype", "shard_size", "ids", "source",
                                      "shards": [{"file", "start", "count"}, ...], ...}
  embeddings-00000-of-00042.npy      float16 [count, dim], L2-normalised rows
  ...
Row r of shard s is image id `shards[s].start + r`; the manifest's "ids" says what an id means
(the sorted file list or the TFDS record index). A shard file appears only when complete (written
to a temporary name, then renamed), so its presence is the resume marker.
"""
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from groupdiff_jax.retrieval.errors import InputError

FORMAT = 'groupdiff-embeddings/1'
MANIFEST = 'manifest.json'


def plan_manifest(*, dataset: str, encoder: str, n: int, dim: int, shard_size: int,
                  ids: str, dtype: str = 'float16', **extra: Any) -> dict[str, Any]:
  """A manifest for n rows split into shards of shard_size (the last one shorter)."""
  if n <= 0 or dim <= 0 or shard_size <= 0:
    raise InputError(f'embeddings need n, dim, shard_size > 0 (got {n}, {dim}, {shard_size})')
  num = -(-n // shard_size)
  shards = [{'file': f'embeddings-{i:05d}-of-{num:05d}.npy', 'start': i * shard_size,
             'count': min(shard_size, n - i * shard_size)} for i in range(num)]
  return dict(extra, format=FORMAT, dataset=dataset, encoder=encoder, n=n, dim=dim, dtype=dtype,
              shard_size=shard_size, ids=ids, shards=shards)


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise InputError(f'no embeddings at {directory!r}: {MANIFEST} is missing')
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise InputError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


def shard_done(directory: str, shard: dict[str, Any], dim: int) -> bool:
  """True when the shard file exists with the planned shape (a resumed job skips it)."""
  path = os.path.join(directory, shard['file'])
  if not os.path.exists(path):
    return False
  try:
    arr = np.load(path, mmap_mode='r')
  except ValueError:  # truncated/corrupt: redo it
    return False
  return arr.shape == (shard['count'], dim)


def write_shard(directory: str, shard: dict[str, Any], rows: np.ndarray,
                dtype: str = 'float16') -> None:
  """Atomically writes one shard: a reader never sees a partial file under the final name."""
  if rows.shape[0] != shard['count']:
    raise ValueError(f'{shard["file"]}: {rows.shape[0]} rows, planned {shard["count"]}')
  path = os.path.join(directory, shard['file'])
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:  # a file object: np.save would append '.npy' to a bare name
    np.save(f, np.asarray(rows, dtype=dtype))
  os.replace(tmp, path)


def l2_normalise(x: np.ndarray) -> np.ndarray:
  """float32 rows scaled to unit norm (stored float16 rows are unit only to ~1e-3)."""
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


class EmbeddingSet:
  """Validated read access to a complete embeddings directory (memory-mapped shards)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest = read_manifest(directory)
    m = self.manifest
    self.n, self.dim = int(m['n']), int(m['dim'])
    self.dataset, self.encoder = str(m['dataset']), str(m['encoder'])
    self._shards: list[tuple[int, np.ndarray]] = []
    expect_start = 0
    for shard in m['shards']:
      path = os.path.join(directory, shard['file'])
      if not os.path.exists(path):
        raise InputError(f'{path} is missing: the embed job has not finished (rerun it to resume)')
      try:
        arr = np.load(path, mmap_mode='r')
      except ValueError as e:
        raise InputError(f'{path}: unreadable .npy ({e})') from None
      if arr.ndim != 2 or arr.shape[1] != self.dim:
        raise InputError(f'{path}: shape {arr.shape}, but the manifest says width {self.dim}')
      if arr.shape[0] != shard['count'] or shard['start'] != expect_start:
        raise InputError(f'{path}: {arr.shape[0]} rows at start {shard["start"]}, but the manifest'
                         f' says {shard["count"]} rows at start {expect_start}')
      if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f'{path}: dtype {arr.dtype}, expected a float type')
      self._shards.append((expect_start, arr))
      expect_start += arr.shape[0]
    if expect_start != self.n:
      raise InputError(f'{directory}: shards hold {expect_start} rows, the manifest says '
                       f'n={self.n}')

  def blocks(self, block: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(start id, raw rows) in id order, at most `block` rows each, shard boundaries respected.

    Shards are read into ordinary memory one at a time rather than through the memmap: pages
    of a memmap count toward the process's resident set (and its peak) until the OS evicts them.
    """
    for (start, _), shard in zip(self._shards, self.manifest['shards']):
      arr = np.load(os.path.join(self.directory, shard['file']))
      for off in range(0, arr.shape[0], block):
        yield start + off, arr[off:off + block]
      del arr

  def unit_blocks(self, block: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(start id, unit-norm float32 rows): the same values load_float32 returns."""
    for start, raw in self.blocks(block):
      yield start, l2_normalise(raw)

  def take(self, ids: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows for arbitrary ids (the recall sample), read through the memmaps."""
    ids = np.asarray(ids)
    out = np.empty((len(ids), self.dim), np.float32)
    for start, arr in self._shards:
      sel = (ids >= start) & (ids < start + arr.shape[0])
      if sel.any():
        out[sel] = arr[ids[sel] - start]
    return l2_normalise(out)

  def fingerprint(self, rows: int = 1024) -> str:
    """A short hash of n, dim and `rows` evenly spaced rows (their stored bytes): cheap (no full
    pass), and different for other embeddings of the same size in practice."""
    h = hashlib.sha256(f'{self.n},{self.dim}'.encode())
    for i in np.unique(np.linspace(0, self.n - 1, min(rows, self.n)).astype(np.int64)):
      start, arr = next((s, a) for s, a in reversed(self._shards) if s <= i)
      h.update(np.ascontiguousarray(arr[i - start]).tobytes())
    return h.hexdigest()[:16]

  def check_values(self, block: int = 65536, tolerance: float = 1e-2) -> dict[str, Any]:
    """Raises InputError naming the first row with NaN/Inf or (near-)zero norm.

    Returns {'not_unit': rows whose stored norm is off 1 by more than `tolerance` (float16 unit
    rows are within ~1e-3), 'min_norm', 'max_norm'}: rows are normalised on reading anyway, but
    embeddings that were never normalised may come from a mistaken embed job.
    """
    out = {'not_unit': 0, 'min_norm': float('inf'), 'max_norm': 0.0}
    for _, _, norms in self._iter_checked(block):
      out['not_unit'] += int((np.abs(norms - 1) > tolerance).sum())
      out['min_norm'] = min(out['min_norm'], float(norms.min()))
      out['max_norm'] = max(out['max_norm'], float(norms.max()))
    return out

  def load_float32(self, block: int = 65536) -> np.ndarray:
    """All rows as one unit-norm float32 [n, dim] array, checking values on the way."""
    out = np.empty((self.n, self.dim), np.float32)
    for start, rows, _ in self._iter_checked(block):
      out[start:start + rows.shape[0]] = rows
    return out

  def _iter_checked(self, block: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start id, unit float32 rows, their stored norms), checking values on the way."""
    for start, raw in self.blocks(block):
      x = raw.astype(np.float32)
      finite = np.isfinite(x).all(axis=1)
      if not finite.all():
        bad = start + int(np.argmin(finite))
        raise InputError(f'{self.directory}: embedding of image id {bad} contains NaN/Inf')
      norms = np.linalg.norm(x, axis=1)
      if (norms < 1e-6).any():
        bad = start + int(np.argmax(norms < 1e-6))
        raise InputError(f'{self.directory}: embedding of image id {bad} has zero norm')
      yield start, x / norms[:, None], norms
