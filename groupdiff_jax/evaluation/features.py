"""Inception features of many images: fixed-size batches sharded over a 1-D 'batch' mesh.

The network is replicated; each batch (padded to the fixed size, so one compilation serves a
whole file) is split across the devices along the batch axis. Progress lines come from
`progress.Progress`.
"""
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from groupdiff_jax import progress as progress_lib
from groupdiff_jax import sharding
from groupdiff_jax.evaluation import inception as inception_lib
from groupdiff_jax.evaluation import preprocess as preprocess_lib

OUTPUTS = ('pool', 'spatial', 'logits', 'logits_unbiased')


def batch_mesh(devices=None) -> Mesh:
  return sharding.make_mesh(('batch',), (-1,), devices)


class FeatureExtractor:
  """images uint8 [N, H, W, 3] -> {name: float32 numpy array} for the names in OUTPUTS."""

  def __init__(self, model: inception_lib.InceptionV3, *, protocol: str = 'adm',
               batch_size: int = 256, mesh: Mesh | None = None):
    if protocol not in preprocess_lib.PROTOCOLS:
      raise ValueError(f'unknown protocol {protocol!r}; known: {preprocess_lib.PROTOCOLS}')
    self.mesh = mesh or batch_mesh()
    devices = self.mesh.devices.size
    self.batch_size = -(-max(batch_size, 1) // devices) * devices  # a multiple of the devices
    self.images_sharding = NamedSharding(self.mesh, P('batch'))
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, NamedSharding(self.mesh, P()))

    def extract(state, images):
      out = nnx.merge(graphdef, state)(preprocess_lib.preprocess(images, protocol))
      return {k: out[k] for k in OUTPUTS}

    self._extract = jax.jit(extract, out_shardings=self.images_sharding)
    self._cache: dict[tuple[int, ...], jax.stages.Compiled] = {}

  def _compiled(self, image_shape: tuple[int, ...]):
    """The extraction compiled ahead of time for one image size (kept out of progress rates)."""
    if image_shape not in self._cache:
      spec = jax.ShapeDtypeStruct((self.batch_size,) + image_shape, jnp.uint8,
                                  sharding=self.images_sharding)
      self._cache[image_shape] = self._extract.lower(self.state, spec).compile()
    return self._cache[image_shape]

  def batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of one batch of at most `batch_size` images."""
    n = len(images)
    if n > self.batch_size:
      raise ValueError(f'{n} images exceed the batch size {self.batch_size}')
    compiled = self._compiled(tuple(images.shape[1:]))
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.uint8)
    padded[:n] = images
    out = compiled(self.state, jax.device_put(padded, self.images_sharding))
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of any number of images (in batches, no progress lines)."""
    parts = [self.batch(images[i:i + self.batch_size])
             for i in range(0, len(images), self.batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}

  def run(self, batches: Iterable[np.ndarray], total: int, label: str) -> dict[str, np.ndarray]:
    """Features of every image in `batches` (each at most batch_size), with progress lines."""
    progress = progress_lib.Progress(label, total, unit='images')
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    for images in batches:
      progress.pause()  # compiling for a new image size does not count towards the rate
      self._compiled(tuple(images.shape[1:]))
      progress.resume()
      for k, v in self.batch(images).items():
        parts[k].append(v)
      progress.update(len(images))
    return {k: np.concatenate(v) for k, v in parts.items()}
