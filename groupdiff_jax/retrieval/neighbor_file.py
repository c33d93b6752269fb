"""The neighbour file: each image's top-K nearest neighbours in an embedding space.

A directory holding
  ids.npy    int32   [n, K]  neighbour image ids, most similar first, the image itself excluded
  sims.npy   float16 [n, K]  cosine similarities matching ids
  header.json              {"format": "groupdiff-neighbors/1", "dataset": str, "encoder": str,
                            "n": int, "k": int, "index": {...}, "recall": {...}}
Plain .npy files so any tool (numpy, memmap) can read them; the data pipeline memory-maps them.
"""
import json
import os
from typing import Any

import numpy as np

FORMAT = 'groupdiff-neighbors/1'


class NeighborFileError(ValueError):
  pass


def write_neighbors(directory: str, ids: np.ndarray, sims: np.ndarray,
                    header: dict[str, Any]) -> None:
  """Writes the three files; header.json last, so its presence marks a complete file."""
  ids = np.asarray(ids)
  sims = np.asarray(sims)
  if ids.ndim != 2 or ids.shape != sims.shape:
    raise NeighborFileError(f'ids {ids.shape} and sims {sims.shape} must be equal 2-D shapes')
  os.makedirs(directory, exist_ok=True)
  np.save(os.path.join(directory, 'ids.npy'), ids.astype(np.int32))
  np.save(os.path.join(directory, 'sims.npy'), sims.astype(np.float16))
  full = dict(header, format=FORMAT, n=int(ids.shape[0]), k=int(ids.shape[1]))
  tmp = os.path.join(directory, 'header.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(full, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, 'header.json'))


def read_header(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'header.json')
  if not os.path.exists(path):
    raise NeighborFileError(f'no neighbour file at {directory} (missing header.json)')
  with open(path) as f:
    header = json.load(f)
  if header.get('format') != FORMAT:
    raise NeighborFileError(f'{path}: format {header.get("format")!r}, expected {FORMAT!r}')
  return header


def read_neighbors(directory: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Returns (ids, sims, header) with ids/sims memory-mapped read-only."""
  header = read_header(directory)
  ids = np.load(os.path.join(directory, 'ids.npy'), mmap_mode='r')
  sims = np.load(os.path.join(directory, 'sims.npy'), mmap_mode='r')
  expect = (header['n'], header['k'])
  if ids.shape != expect or sims.shape != expect:
    raise NeighborFileError(
        f'{directory}: ids {ids.shape} / sims {sims.shape} do not match header n,k={expect}')
  return ids, sims, header
