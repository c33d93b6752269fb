"""Latent shards: what `groupdiff_jax.encode` writes and `data.source='latents'` reads.

A directory holding
  manifest.json        {"format": "groupdiff-latents/1", "dataset", "n", "ids", "id_list_sha1",
                        "kind": "moments" | "sample", "latent_shape": [H, W, C], "dtype",
                        "variants": 1 | 2 (2 = a horizontal-flip copy), "scaling_factor", "vae",
                        "crop", "resolution", "classes", "shards": [{"file", "start", "count"}],
                        "complete": bool, "failed": [{"id", "image", "error"}], ...}
  latents-00000-of-00026.array_record   one record per readable image of ids [start, start+count)
  latents-00000-of-00026.array_record.json   the shard's sidecar: records, failed ids, labels
  labels.npy           int32 [n], the label of every id (-1 for an unreadable image)
  image_ids.txt        folder sources: line i = relative path of image id i
Records are in id order with unreadable images left out, so record r of the whole set (shards
concatenated) is image id r + (number of failed ids below it). A record is the bytes of one
element of `record_dtype(...)`: id int64, label int32, then for kind 'moments' the posterior
`mean` and `std` of unscaled z, for kind 'sample' `latent` = scaling_factor * z; each
[variants, H, W, C] in `dtype`. ArrayRecord chunks hold one record each (random access).

A shard appears under its final name only when complete (temporary name, then rename), and its
sidecar is written after it; the manifest says "complete": true only after every shard is done.
"""
import json
import os
from typing import Any

import numpy as np

from groupdiff_jax.cli import UserError

FORMAT = 'groupdiff-latents/1'
MANIFEST = 'manifest.json'
LABELS = 'labels.npy'
# One record per chunk: a random read decodes just that record (the default groups 65536).
WRITER_OPTIONS = 'group_size:1,uncompressed'
KINDS = ('moments', 'sample')


def record_dtype(kind: str, latent_shape: tuple[int, ...], dtype: str, variants: int) -> np.dtype:
  """The fixed binary layout of one record."""
  shape = (int(variants), *map(int, latent_shape))
  arrays = ('mean', 'std') if kind == 'moments' else ('latent',)
  return np.dtype([('id', '<i8'), ('label', '<i4')] +
                  [(a, np.dtype(dtype).newbyteorder('<'), shape) for a in arrays])


def manifest_dtype(manifest: dict[str, Any]) -> np.dtype:
  return record_dtype(manifest['kind'], manifest['latent_shape'], manifest['dtype'],
                      manifest['variants'])


def plan_manifest(*, dataset: str, n: int, shard_size: int, kind: str,
                  latent_shape: tuple[int, ...], dtype: str, variants: int,
                  **extra: Any) -> dict[str, Any]:
  """A (not yet complete) manifest for ids 0..n-1 split into shards of shard_size."""
  if n <= 0 or shard_size <= 0:
    raise UserError(f'latents need n, shard_size > 0 (got {n}, {shard_size})')
  if kind not in KINDS:
    raise UserError(f'latent kind {kind!r} unknown; choose from {", ".join(KINDS)}')
  num = -(-n // shard_size)
  shards = [{'file': f'latents-{i:05d}-of-{num:05d}.array_record', 'start': i * shard_size,
             'count': min(shard_size, n - i * shard_size)} for i in range(num)]
  return dict(extra, format=FORMAT, dataset=dataset, n=n, kind=kind,
              latent_shape=list(latent_shape), dtype=str(np.dtype(dtype)), variants=variants,
              shard_size=shard_size, shards=shards, complete=False, failed=[])


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  _write_json(os.path.join(directory, MANIFEST), manifest)


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise UserError(f'no latents at {directory!r}: {MANIFEST} is missing (write them with '
                    'python -m groupdiff_jax.encode)')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: unreadable ({e})') from None
  if manifest.get('format') != FORMAT:
    raise UserError(f'{path}: format {manifest.get("format")!r}, expected {FORMAT!r}')
  return manifest


def sidecar_path(directory: str, shard: dict[str, Any]) -> str:
  return os.path.join(directory, shard['file'] + '.json')


class ShardWriter:
  """Writes one shard under a temporary name; `close()` renames it and writes the sidecar."""

  def __init__(self, directory: str, shard: dict[str, Any], manifest: dict[str, Any]):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    self._directory, self._shard, self._manifest = directory, shard, manifest
    self._dtype = manifest_dtype(manifest)
    self._path = os.path.join(directory, shard['file'])
    self._tmp = self._path + '.tmp'
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self._labels = np.full(shard['count'], -1, np.int32)
    self._failed: list[dict[str, Any]] = []
    self._next = shard['start']  # ids must arrive in order

  def _advance(self, image_id: int) -> None:
    if not self._next <= image_id < self._shard['start'] + self._shard['count']:
      raise ValueError(f'{self._shard["file"]}: id {image_id} out of order (next {self._next})')
    self._next = image_id + 1

  def add(self, image_id: int, label: int, **arrays: np.ndarray) -> None:
    """One readable image: arrays are `mean`/`std` or `latent`, each [variants, H, W, C]."""
    self._advance(image_id)
    rec = np.zeros((), self._dtype)
    rec['id'], rec['label'] = image_id, label
    for name, value in arrays.items():
      rec[name] = value
    self._writer.write(rec.tobytes())
    self._labels[image_id - self._shard['start']] = label

  def skip(self, image_id: int, image: str, error: str) -> None:
    """An unreadable image: no record, listed in the sidecar."""
    self._advance(image_id)
    self._failed.append({'id': int(image_id), 'image': image, 'error': error})

  def close(self) -> None:
    if self._next != self._shard['start'] + self._shard['count']:
      raise ValueError(f'{self._shard["file"]}: closed at id {self._next}, planned up to '
                       f'{self._shard["start"] + self._shard["count"]}')
    self._writer.close()
    os.replace(self._tmp, self._path)
    _write_json(sidecar_path(self._directory, self._shard), {
        'dataset': self._manifest['dataset'], 'file': self._shard['file'],
        'start': self._shard['start'], 'count': self._shard['count'],
        'records': self._shard['count'] - len(self._failed), 'failed': self._failed,
        'labels': self._labels.tolist()})


def _open_reader(path: str):
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  # Random access: no read-ahead (what grain's ArrayRecord source does too).
  return ArrayRecordReader(path, options='readahead_buffer_size:0', file_reader_buffer_size=32768)


def _num_records(path: str) -> int:
  reader = _open_reader(path)
  try:
    return reader.num_records()  # a truncated file opens with 0 records (its footer is gone)
  finally:
    reader.close()


def read_sidecar(directory: str, shard: dict[str, Any]) -> dict[str, Any] | None:
  try:
    with open(sidecar_path(directory, shard)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def shard_done(directory: str, shard: dict[str, Any], dataset: str) -> bool:
  """True when the shard and its sidecar exist and agree (a resumed job skips it)."""
  side = read_sidecar(directory, shard)
  path = os.path.join(directory, shard['file'])
  if side is None or side.get('dataset') != dataset or not os.path.exists(path):
    return False
  try:
    return _num_records(path) == side['records']
  except Exception:  # pylint: disable=broad-except  (an unreadable file is redone)
    return False


def finalize(directory: str, manifest: dict[str, Any]) -> dict[str, Any]:
  """Collects the sidecars into labels.npy and the manifest's failed list; marks it complete."""
  labels = np.full(manifest['n'], -1, np.int32)
  failed = []
  for shard in manifest['shards']:
    side = read_sidecar(directory, shard)
    if side is None:
      raise UserError(f'{directory}: shard {shard["file"]} is not finished; rerun the encode job')
    labels[shard['start']:shard['start'] + shard['count']] = side['labels']
    failed += side['failed']
  tmp = os.path.join(directory, LABELS + '.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, labels)
  os.replace(tmp, os.path.join(directory, LABELS))
  manifest = dict(manifest, failed=failed, complete=True,
                  num_records=int(manifest['n']) - len(failed))
  write_manifest(directory, manifest)
  return manifest


class LatentSet:
  """Validated random access to a complete latents directory (no copy in memory).

  Opening checks the manifest, every shard (present, readable, record count = its sidecar's)
  and the labels; any problem is a one-line UserError naming the file and what to do.
  """

  def __init__(self, directory: str):
    self.directory = directory
    m = self.manifest = read_manifest(directory)
    if not m.get('complete'):
      raise UserError(f'{directory}: the encode job has not finished (rerun it to resume)')
    self.n, self.dataset = int(m['n']), str(m['dataset'])
    self.dtype = manifest_dtype(m)
    # One reader per shard, opened here once (not in the pipeline's reader threads) and shared
    # by them; record r of the set is record r - starts[s] of shard s.
    self._readers, counts = [], []
    for shard in m['shards']:
      path = os.path.join(directory, shard['file'])
      if not os.path.exists(path):
        raise UserError(f'{path} is missing; rerun the encode job to rewrite it')
      side = read_sidecar(directory, shard)
      if side is None:
        raise UserError(f'{path}: its sidecar {os.path.basename(sidecar_path(directory, shard))} '
                        'is missing or unreadable; rerun the encode job')
      if side.get('dataset') != self.dataset:
        raise UserError(f'{path} belongs to dataset {side.get("dataset")!r}, the manifest to '
                        f'{self.dataset!r}; do not mix encode outputs')
      try:
        reader = _open_reader(path)
        records = reader.num_records()  # a truncated file opens with 0 records
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'{path}: unreadable ArrayRecord file ({type(e).__name__}; truncated?); '
                        'delete it and rerun the encode job') from None
      if records != side['records']:
        raise UserError(f'{path}: {records} records, {side["records"]} expected (truncated?); '
                        'delete it and rerun the encode job')
      self._readers.append(reader)
      counts.append(records)
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.failed_ids = np.array(sorted(f['id'] for f in m.get('failed', [])), np.int64)
    if self._starts[-1] != self.n - len(self.failed_ids):
      raise UserError(f'{directory}: {self._starts[-1]} records for n={self.n} images with '
                      f'{len(self.failed_ids)} unreadable; the shards are not this manifest\'s')
    try:
      self.labels = np.load(os.path.join(directory, LABELS))
    except (OSError, ValueError) as e:
      raise UserError(f'{directory}: {LABELS} unreadable ({e}); rerun the encode job') from None
    if self.labels.shape != (self.n,):
      raise UserError(f'{directory}: {LABELS} has shape {self.labels.shape}, expected ({self.n},)')
    valid = np.ones(self.n, bool)
    valid[self.failed_ids] = False
    self.valid_ids = np.flatnonzero(valid)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return tuple(self.manifest['latent_shape'])

  def records(self, image_ids: np.ndarray) -> np.ndarray:
    """The decoded records of readable ids, in their order: a structured array (fields id,
    label, mean/std or latent). One read call per shard touched."""
    ids = np.asarray(image_ids, np.int64).reshape(-1)
    rows = ids if not len(self.failed_ids) else ids - np.searchsorted(self.failed_ids, ids)
    shard = np.searchsorted(self._starts, rows, side='right') - 1
    chunks: list[bytes] = [b''] * len(ids)
    for s in np.unique(shard):
      where = np.flatnonzero(shard == s)
      for k, data in zip(where, self._readers[s].read((rows[where] - self._starts[s]).tolist())):
        chunks[k] = data
    recs = np.frombuffer(b''.join(chunks), self.dtype)
    if not np.array_equal(recs['id'], ids):
      raise ValueError(f'{self.directory}: records hold other ids than asked for (unreadable '
                       'ids disagree with the manifest)')
    return recs

  def __getitem__(self, image_id: int) -> np.void:
    """The decoded record of one readable image id."""
    return self.records(np.array([image_id]))[0]
