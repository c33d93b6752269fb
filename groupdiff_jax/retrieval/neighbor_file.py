"""The neighbour file: each image's top-K nearest neighbours in an embedding space.

A directory holding
  ids.npy    int32   [n, K]  neighbour image ids, most similar first, the image itself excluded
  sims.npy   float16 [n, K]  cosine similarities matching ids
  header.json              {"format": "groupdiff-neighbors/1", "dataset": str, "encoder": str,
                            "n": int, "k": int, "index": {...}, "recall": {...}}
Plain .npy files so any tool (numpy, memmap) can read them; the data pipeline memory-maps them.
header.json is the completion marker: a directory without it holds no (complete) neighbour file.
"""
import glob
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

FORMAT = 'groupdiff-neighbors/1'


class NeighborFileError(ValueError):
  pass


def write_neighbors(directory: str, ids: np.ndarray, sims: np.ndarray,
                    header: dict[str, Any]) -> None:
  """Writes the three files so that a header never sits beside a half-written array.

  Everything is written into a temporary directory inside `directory` first. Then an old
  header.json is removed (the directory now reads as incomplete), the arrays are renamed into
  place, and the header is renamed last. A crash at any point leaves either the old complete
  file, or no header; the temporary directory of a crashed write is removed by the next one.
  """
  ids = np.asarray(ids)
  sims = np.asarray(sims)
  if ids.ndim != 2 or ids.shape != sims.shape:
    raise NeighborFileError(f'ids {ids.shape} and sims {sims.shape} must be equal 2-D shapes')
  os.makedirs(directory, exist_ok=True)
  for stale in glob.glob(os.path.join(directory, '.writing-*')):
    shutil.rmtree(stale, ignore_errors=True)
  tmp = tempfile.mkdtemp(prefix='.writing-', dir=directory)
  try:
    np.save(os.path.join(tmp, 'ids.npy'), ids.astype(np.int32))
    np.save(os.path.join(tmp, 'sims.npy'), sims.astype(np.float16))
    full = dict(header, format=FORMAT, n=int(ids.shape[0]), k=int(ids.shape[1]))
    with open(os.path.join(tmp, 'header.json'), 'w') as f:
      json.dump(full, f, indent=1, sort_keys=True)
    if os.path.exists(os.path.join(directory, 'header.json')):
      os.remove(os.path.join(directory, 'header.json'))
    for name in ('ids.npy', 'sims.npy', 'header.json'):  # the header last
      os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


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
