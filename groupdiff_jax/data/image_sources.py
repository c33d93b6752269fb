"""Image datasets the offline jobs (embed, encode) read, by kind, with stable ids and labels.

  folder  every image file under a directory (recursively); ids = positions in the list of
          relative POSIX paths sorted by code point (the list is saved as image_ids.txt).
          Labels: one sub-folder per class, label = index of the top-level folder name among
          the sorted class names (saved in the manifest); images directly under the root have
          no label (-1), which embedding allows and encoding refuses.
  tfds    a prepared TFDS dataset read with tfds.data_source(..., download=False), ids = record
          index in the split, label = the `label_key` feature. Without TensorFlow installed only
          images stored as uint8 Tensor features ([H, W, 3] or [H, W, 1], e.g.
          Tensor(dtype=uint8, encoding='zlib')) decode; tfds.features.Image needs TensorFlow.
Every job that reads the same source sees the same ids, so latents, embeddings and neighbour
lists line up by id. An image that cannot be read raises `UnreadableImage`: jobs skip it, count
it and list it in their manifest (`ImageSource.try_read`).
"""
import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from groupdiff_jax.retrieval.errors import InputError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm')
NO_LABEL = -1


class UnreadableImage(Exception):
  """One image of the dataset could not be decoded (corrupt, truncated, not an image)."""


def default_config(kind: str = 'folder') -> ml_collections.ConfigDict:
  """The `config.data` block every offline job shares."""
  c = ml_collections.ConfigDict()
  c.kind = kind             # folder | tfds
  c.name = ''               # dataset name for manifests/headers; '' = folder:<abs path> or
                            # tfds:<name>/<split>. Jobs whose outputs must line up need the same.
  c.path = ''               # folder: root directory (one sub-folder per class)
  c.tfds_name = ''          # tfds: dataset name, e.g. 'imagenet2012' (prepared, offline)
  c.split = 'train'
  c.data_dir = ''           # tfds: data_dir ('' = the TFDS default)
  c.image_key = 'image'
  c.label_key = 'label'
  return c


@dataclasses.dataclass
class ImageSource:
  name: str                                  # dataset name recorded in manifests and headers
  size: int
  read: Callable[[int], tuple[Image.Image | np.ndarray, int]]  # id -> (image, label)
  ids: str                                   # what an id means (goes into the manifest)
  info: dict[str, Any]                       # source details for the manifest
  id_list: list[str] | None = None           # folder: relative path of each id
  classes: list[str] | None = None           # class names, label i = classes[i]
  labelled: bool = True                      # every image has a label in [0, len(classes))

  @property
  def id_list_sha1(self) -> str:
    """A fingerprint of the id order ('' for tfds, whose order is the record order)."""
    if self.id_list is None:
      return ''
    return hashlib.sha1('\n'.join(self.id_list).encode()).hexdigest()

  def describe(self, i: int) -> str:
    return self.id_list[i] if self.id_list is not None else f'record {i}'

  def try_read(self, i: int) -> tuple[Image.Image | np.ndarray | None, int, str]:
    """(image, label, '') or (None, label, why) for an image that cannot be read."""
    try:
      image, label = self.read(i)
      return image, label, ''
    except InputError:
      raise  # a configuration problem (missing feature, ...): the whole job must stop
    except Exception as e:  # pylint: disable=broad-except  (PIL/tfds raise many types)
      cause = e.__cause__ if isinstance(e, UnreadableImage) and e.__cause__ else e
      return None, NO_LABEL, f'{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ""}'


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
  classes = sorted({f.split('/', 1)[0] for f in files if '/' in f})
  index = {c: i for i, c in enumerate(classes)}
  labels = [index[f.split('/', 1)[0]] if '/' in f else NO_LABEL for f in files]

  def read(i: int) -> tuple[Image.Image, int]:
    try:
      with Image.open(os.path.join(root, files[i])) as im:
        return im.convert('RGB'), labels[i]  # a new, loaded image that outlives the closed file
    except Exception as e:  # pylint: disable=broad-except
      raise UnreadableImage(files[i]) from e
  return ImageSource(
      name=config.name or f'folder:{os.path.abspath(root)}', size=len(files), read=read,
      ids='id i = line i of image_ids.txt = the i-th image file under the root, relative POSIX '
          'paths sorted by code point',
      info={'kind': 'folder', 'path': os.path.abspath(root)}, id_list=files, classes=classes,
      labelled=NO_LABEL not in labels)


def tfds_source(config) -> ImageSource:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel  (heavy import)
  try:
    source = tfds.data_source(config.tfds_name, split=config.split,
                              data_dir=config.data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many types; report one line)
    raise InputError(f'tfds {config.tfds_name!r} split {config.split!r}: '
                     f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
  image_key, label_key = config.image_key, config.get('label_key', 'label')
  features = getattr(getattr(source, 'dataset_info', None), 'features', None) or {}
  label_feature = features[label_key] if label_key in features else None
  classes = list(getattr(label_feature, 'names', None) or []) or None

  def read(i: int) -> tuple[np.ndarray, int]:
    example = source[i]
    if image_key not in example:
      raise InputError(f'tfds {config.tfds_name}: no feature {image_key!r} (has {sorted(example)})')
    image = np.asarray(example[image_key])
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise InputError(f'tfds {config.tfds_name}: feature {image_key!r} is {image.dtype} '
                       f'{image.shape}, expected uint8 [H, W(, C)] (an undecoded Image feature '
                       'needs TensorFlow; store images as uint8 Tensor features)')
    return image, int(example[label_key]) if label_key in example else NO_LABEL
  return ImageSource(
      name=config.name or f'tfds:{config.tfds_name}/{config.split}', size=len(source), read=read,
      ids=f'id i = record i of tfds.data_source({config.tfds_name!r}, split={config.split!r})',
      info={'kind': 'tfds', 'tfds_name': config.tfds_name, 'split': config.split,
            'image_key': image_key, 'label_key': label_key},
      classes=classes, labelled=label_feature is not None)


SOURCES: dict[str, Callable[[Any], ImageSource]] = {
    'folder': folder_source,
    'tfds': tfds_source,
}


def open_source(config) -> ImageSource:
  if config.kind not in SOURCES:
    raise InputError(f'data.kind {config.kind!r} unknown; choose from {", ".join(SOURCES)}')
  return SOURCES[config.kind](config)


# --- what every offline job over an image source does with its workdir --------------------------

def refuse_other_job(workdir: str, old: dict[str, Any] | None, new: dict[str, Any],
                     identity: tuple[str, ...], what: str) -> None:
  """A job's workdir holds nothing yet (old is None) or this same job (resume), never another
  job's output: the first manifest field of `identity` that differs is named."""
  if old is None:
    return
  diff = [k for k in identity if old.get(k) != new.get(k)]
  if diff:
    raise InputError(f'{workdir} holds {what} of another job (differs in {", ".join(diff)}: '
                     f'{old.get(diff[0])!r} vs {new.get(diff[0])!r}); use another workdir')


def write_id_list(workdir: str, source: ImageSource) -> None:
  """WORKDIR/image_ids.txt (line i = the relative path of id i) for a folder source, atomically."""
  if source.id_list is None:
    return
  path = os.path.join(workdir, 'image_ids.txt')
  with open(path + '.tmp', 'w') as f:
    f.write('\n'.join(source.id_list) + '\n')
  os.replace(path + '.tmp', path)
