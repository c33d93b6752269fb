"""Image datasets the embed job reads, by kind, each with a stable id for every image.

  folder  every image file under a directory (recursively), ids = positions in the list of
          relative POSIX paths sorted by code point (the list is saved as image_ids.txt)
  tfds    a prepared TFDS dataset read with tfds.data_source(..., download=False), ids = record
          index in the split. Without TensorFlow installed only images stored as uint8 Tensor
          features ([H, W, 3] or [H, W, 1], e.g. Tensor(dtype=uint8, encoding='zlib')) decode;
          tfds.features.Image needs TensorFlow to decode.
Both give the ids the data pipeline uses for the same source, so neighbour ids index it directly.
"""
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from groupdiff_jax.retrieval.errors import InputError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm')


@dataclasses.dataclass
class ImageSource:
  name: str                                  # dataset name recorded in manifest and header
  size: int
  load: Callable[[int], Image.Image | np.ndarray]
  ids: str                                   # what an id means (goes into the manifest)
  info: dict[str, Any]                       # source details for the manifest
  id_list: list[str] | None = None           # folder: relative path of each id


def list_images(root: str) -> list[str]:
  """Relative POSIX paths of the image files under root, sorted by code point (stable ids)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for f in filenames:
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'):
        out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, '/'))
  return sorted(out)


def folder_source(config) -> ImageSource:
  root = config.path
  if not root or not os.path.isdir(root):
    raise InputError(f'data.path {root!r} is not a directory')
  files = list_images(root)
  if not files:
    raise InputError(f'{root}: no image files ({", ".join(IMAGE_EXTENSIONS)})')

  def load(i: int) -> Image.Image:
    with Image.open(os.path.join(root, files[i])) as im:
      return im.convert('RGB')  # a new, loaded image that outlives the closed file
  return ImageSource(
      name=config.name or f'folder:{os.path.abspath(root)}', size=len(files), load=load,
      ids='id i = line i of image_ids.txt = the i-th image file under the root, relative POSIX '
          'paths sorted by code point',
      info={'kind': 'folder', 'path': os.path.abspath(root)}, id_list=files)


def tfds_source(config) -> ImageSource:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy import)
  try:
    source = tfds.data_source(config.tfds_name, split=config.split,
                              data_dir=config.data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many types; report one line)
    raise InputError(f'tfds {config.tfds_name!r} split {config.split!r}: '
                     f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
  key = config.image_key

  def load(i: int) -> np.ndarray:
    example = source[i]
    if key not in example:
      raise InputError(f'tfds {config.tfds_name}: no feature {key!r} (has {sorted(example)})')
    image = np.asarray(example[key])
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise InputError(f'tfds {config.tfds_name}: feature {key!r} is {image.dtype} '
                       f'{image.shape}, expected uint8 [H, W(, C)] (an undecoded Image feature '
                       'needs TensorFlow; store images as uint8 Tensor features)')
    return image
  return ImageSource(
      name=config.name or f'tfds:{config.tfds_name}/{config.split}', size=len(source), load=load,
      ids=f'id i = record i of tfds.data_source({config.tfds_name!r}, split={config.split!r})',
      info={'kind': 'tfds', 'tfds_name': config.tfds_name, 'split': config.split,
            'image_key': key})


SOURCES: dict[str, Callable[[Any], ImageSource]] = {
    'folder': folder_source,
    'tfds': tfds_source,
}


def open_source(config) -> ImageSource:
  if config.kind not in SOURCES:
    raise InputError(f'data.kind {config.kind!r} unknown; choose from {", ".join(SOURCES)}')
  return SOURCES[config.kind](config)
