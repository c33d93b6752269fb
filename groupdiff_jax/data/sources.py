"""Random-access training sources, looked up by name (config.data.source) in `SOURCES`.

A source is what the pipeline reads from:
  len(src)            number of images
  src[i]              (image float32 [H, W, C], label int)
  src.neighbors       (ids int32 [n, K], sims [n, K]): each image's top-K neighbours, most similar
                      first, itself excluded (the retrieval.neighbor_file layout)
  src.image_shape     (H, W, C)
  src.labels          int [n]: every image's class (read once, by the 'class' grouping mode)
  src.read(i, step)   optional: image i as drawn at training step `step` (a source with per-step
                      randomness, e.g. a fresh posterior sample of stored latents)
  src.read_batch(ids, step)  optional: (images [B, H, W, C], labels [B]) of many ids at once,
                      as `read` draws them (the pipeline then reads one batch per step)
  src.valid_ids       optional: the ids grouping may draw (default all; unreadable images out)
`__getitem__` is called from grain's reader threads, so it must not open files: everything is
loaded or memory-mapped once in `__init__` (np.load inside grain's threads crashed Python 3.11.7).
"""
from collections.abc import Callable
from typing import Protocol

import ml_collections
import numpy as np

from groupdiff_jax.data import digits, latent_source

DEFAULT_K = digits.DEFAULT_K  # neighbours per image kept for grouping (config.data.neighbors_k)
DEFAULT_SYNTHETIC_SIZE = 65_536  # images in the synthetic set (config.data.synthetic_size)


class DataSource(Protocol):
  image_shape: tuple[int, int, int]
  neighbors: tuple[np.ndarray, np.ndarray]
  labels: np.ndarray

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class SyntheticSource:
  """Random normal images and random labels, deterministic in (seed, index) and (seed).

  Its pseudo neighbour structure: a seeded shuffle of the ids cut into clusters of K+1, and
  each id's neighbours are the other K members of its cluster (the tail cluster wraps around).
  So neighbourhoods are mostly mutual, like real data, and groups always form.
  """

  def __init__(self, num_examples: int, image_shape: tuple[int, int, int], num_classes: int,
               seed: int, k: int = DEFAULT_K):
    if not 0 < k < num_examples:
      raise ValueError(f'synthetic source: need 0 < K={k} < n={num_examples}')
    self.image_shape = tuple(image_shape)
    self._n, self._seed = num_examples, seed
    self.neighbors = cluster_neighbors(num_examples, k, np.random.default_rng([seed, 1]))
    self.labels = np.random.default_rng([seed, 2]).integers(
        num_classes, size=num_examples).astype(np.int32)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f'synthetic index {index} out of range [0, {self._n})')
    rng = np.random.default_rng([self._seed, 0, index])  # per-index: order/thread independent
    return rng.standard_normal(self.image_shape, dtype=np.float32), int(self.labels[index])

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  workdir: str | None = None) -> 'SyntheticSource':
    del workdir  # nothing to cache
    size, channels = config.model.input_size, config.model.in_channels
    return cls(config.data.get('synthetic_size', DEFAULT_SYNTHETIC_SIZE),
               (size, size, channels), config.model.num_classes, config.seed,
               config.data.get('neighbors_k', DEFAULT_K))


def cluster_neighbors(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  perm = rng.permutation(n)
  pos = np.empty(n, np.int64)
  pos[perm] = np.arange(n)                                  # where each id sits in the shuffle
  start = (pos // (k + 1)) * (k + 1)
  offsets = np.arange(k + 1)
  members = perm[(start[:, None] + offsets) % n]           # [n, K+1], the id itself included
  not_self = offsets[None, :] != (pos - start)[:, None]
  ids = members[not_self].reshape(n, k)
  ids = np.take_along_axis(ids, np.argsort(rng.random((n, k)), axis=1), axis=1)
  sims = -np.sort(-rng.uniform(0.5, 1.0, (n, k)), axis=1)  # decreasing, like a real top-K
  return ids.astype(np.int32), sims.astype(np.float16)


SOURCES: dict[str, Callable[[ml_collections.ConfigDict, str | None], DataSource]] = {
    'synthetic': SyntheticSource.from_config,
    'digits': digits.DigitsSource.from_config,
    'latents': latent_source.LatentSource.from_config,
}


def make_source(config: ml_collections.ConfigDict, workdir: str | None = None) -> DataSource:
  """Builds the source named by config.data.source; `workdir` holds caches (digits neighbours)."""
  name = config.data.source
  if name not in SOURCES:
    raise ValueError(f'unknown data.source {name!r}; known: {", ".join(sorted(SOURCES))}')
  return SOURCES[name](config, workdir)
