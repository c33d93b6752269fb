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

  def batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of one batch of at most `batch_size` images."""
    n = len(images)
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.uint8)
    padded[:n] = images
    out = self._extract(self.state, jax.device_put(jnp.asarray(padded), self.images_sharding))
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  def run(self, batches: Iterable[np.ndarray], total: int, label: str) -> dict[str, np.ndarray]:
    """Features of every image in `batches` (each at most batch_size), with progress lines."""
    progress = progress_lib.Progress(label, total, unit='images')
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    first = True
    for images in batches:
      if first:  # the first call compiles: keep it out of the rate
        progress.pause()
      out = self.batch(images)
      if first:
        progress.resume()
        first = False
      for k, v in out.items():
        parts[k].append(v)
      progress.update(len(images))
    return {k: np.concatenate(v) for k, v in parts.items()}
