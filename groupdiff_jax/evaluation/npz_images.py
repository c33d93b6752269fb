"""Image `.npz` files for evaluation: checked up front, then read batch by batch.

A source is one `.npz` (the ADM layout: `arr_0` uint8 [N, H, W, 3]; the sampling job's shards store
the same array as `images`) or a directory of such files (the sampling job's `shard_*.npz` when
present, otherwise every `*.npz`, in name order). Arrays are streamed from the zip member, so a
50,000-image file is never held in memory whole.
"""
import dataclasses
import glob
import os
import zipfile
from collections.abc import Iterator

import numpy as np

from groupdiff_jax.cli import UserError

IMAGE_KEYS = ('arr_0', 'images')   # ADM / `sample merge` layout; the sampling job's shards
STAT_KEYS = ('mu', 'sigma')        # ADM reference batches (FID); mu_s / sigma_s for sFID


@dataclasses.dataclass(frozen=True)
class ImageFile:
  path: str
  key: str
  shape: tuple[int, ...]


def _members(path: str) -> list[str]:
  try:
    with zipfile.ZipFile(path) as zf:
      return [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f'{path}: not a readable .npz file ({e})') from e


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of the .npy stream `f`, leaving it at the first data byte."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  return np.lib.format.read_array_header_2_0(f)


def has_images(path: str) -> bool:
  return any(k in _members(path) for k in IMAGE_KEYS)


def check_file(path: str) -> ImageFile:
  """Checks that `path` holds uint8 NHWC RGB images; raises UserError naming what is wrong."""
  keys = _members(path)
  key = next((k for k in IMAGE_KEYS if k in keys), None)
  if key is None:
    raise UserError(f'{path}: no image array (expected {" or ".join(IMAGE_KEYS)}; the file '
                    f'holds {", ".join(keys) or "nothing"})')
  with zipfile.ZipFile(path) as zf, zf.open(f'{key}.npy') as f:
    shape, _, dtype = _read_header(f)
  if len(shape) != 4 or shape[-1] != 3:
    hint = ' (it looks NCHW: transpose to NHWC)' if len(shape) == 4 and shape[1] == 3 else ''
    raise UserError(f'{path}: {key} has shape {tuple(shape)}; expected uint8 [N, H, W, 3] RGB '
                    f'images{hint}')
  if dtype != np.uint8:
    raise UserError(f'{path}: {key} is {dtype}; expected uint8 images in [0, 255] (convert with '
                    'np.clip(np.round(x), 0, 255).astype(np.uint8))')
  if shape[0] == 0:
    raise UserError(f'{path}: {key} holds no images')
  return ImageFile(path, key, tuple(int(s) for s in shape))


def list_files(path: str) -> list[str]:
  """The `.npz` files a --samples/--ref path names (a file or a directory of shards)."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, 'shard_*.npz'))) or sorted(
        glob.glob(os.path.join(path, '*.npz')))
    if not files:
      raise UserError(f'{path}: the directory holds no .npz files')
    return files
  if not os.path.exists(path):
    raise UserError(f'{path}: no such file or directory')
  return [path]


class ImageSource:
  """All images of one file or shard directory, validated on construction."""

  def __init__(self, path: str):
    self.path = path
    self.files = [check_file(f) for f in list_files(path)]
    sizes = {f.shape[1:] for f in self.files}
    if len(sizes) > 1:
      raise UserError(f'{path}: the shards hold images of different sizes {sorted(sizes)}')
    self.image_shape = self.files[0].shape[1:]

  def __len__(self) -> int:
    return sum(f.shape[0] for f in self.files)

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [<= batch_size, H, W, 3] batches in file order (a batch may span files)."""
    pending: list[np.ndarray] = []
    count = 0
    for f in self.files:
      for chunk in _stream(f, batch_size):
        pending.append(chunk)
        count += len(chunk)
        while count >= batch_size:
          joined = np.concatenate(pending)
          yield joined[:batch_size]
          pending, count = [joined[batch_size:]], count - batch_size
    if count:
      yield np.concatenate(pending)


def _stream(f: ImageFile, batch_size: int) -> Iterator[np.ndarray]:
  per_image = int(np.prod(f.shape[1:]))
  with zipfile.ZipFile(f.path) as zf, zf.open(f'{f.key}.npy') as member:
    _, fortran, _ = _read_header(member)
    if fortran:  # rare (np.asfortranarray input): read whole rather than stream
      yield from np.array_split(np.load(f.path)[f.key], max(1, f.shape[0] // batch_size))
      return
    for start in range(0, f.shape[0], batch_size):
      n = min(batch_size, f.shape[0] - start)
      data = member.read(n * per_image)
      if len(data) != n * per_image:
        raise UserError(f'{f.path}: {f.key} is truncated (ends before image {start + n})')
      yield np.frombuffer(data, np.uint8).reshape((n,) + f.shape[1:])


def read_statistics(path: str) -> dict[str, np.ndarray] | None:
  """mu/sigma (and mu_s/sigma_s when present) of a reference `.npz`, or None if it has none."""
  if os.path.isdir(path) or not path.endswith('.npz'):
    return None
  keys = _members(path)
  if not all(k in keys for k in STAT_KEYS):
    return None
  with np.load(path) as data:
    stats = {k: np.asarray(data[k], np.float64) for k in ('mu', 'sigma', 'mu_s', 'sigma_s')
             if k in data.files}
  mu, sigma = stats['mu'], stats['sigma']
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(f'{path}: mu {mu.shape} / sigma {sigma.shape} are not a mean vector and its '
                    'covariance matrix')
  return stats
