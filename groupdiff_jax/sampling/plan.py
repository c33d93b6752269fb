"""What an offline sampling job draws: image ids, their labels and keys, and the shards.

Every generated image has an id i = 0, 1, 2, ... and everything about it is a pure function of
(seed, i): its group g = i // G (G = max(cond, uncond) group size, the official eval group), its
class g % num_classes (classes cycle, as the official eval), its initial noise and all later
random draws (from the typed key fold_in(key(seed), i)). So the images do not depend on the
batch size, the device count or how many hosts share the work.

Class balance: `num_samples / num_classes` images per class. When G does not divide that count,
`round_groups` generates whole groups (ceil(per_class / G) per class) and keeps the first
`per_class` images of each class in id order, as the official eval does (52,000 drawn for
50,000 with groups of 4); the extra images are never written.

Shards are consecutive id ranges of `shard_size` images (a multiple of G, so a group never spans
two shards); shard k belongs to process k % process_count.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax.cli import UserError


@dataclasses.dataclass(frozen=True)
class Plan:
  num_samples: int
  num_classes: int
  group_size: int       # G: the images of a group share a class and a batch
  shard_size: int
  seed: int
  round_groups: bool = True

  def __post_init__(self):
    if self.num_samples <= 0 or self.num_samples % self.num_classes:
      raise UserError(f'num_samples={self.num_samples} must be a positive multiple of the '
                      f'checkpoint\'s {self.num_classes} classes (class-balanced sampling)')
    if not self.round_groups and self.per_class % self.group_size:
      raise UserError(
          f'groups of {self.group_size} do not divide the {self.per_class} images per class; '
          f'choose num_samples with a multiple of {self.group_size} per class, or set '
          '--config.round_groups=True (whole groups, first per-class images kept, as the '
          'official eval)')
    if self.shard_size <= 0 or self.shard_size % self.group_size:
      raise UserError(f'shard_size={self.shard_size} must be a positive multiple of the group '
                      f'size {self.group_size} (a group never spans two shards)')

  @property
  def per_class(self) -> int:
    return self.num_samples // self.num_classes

  @property
  def groups_per_class(self) -> int:
    return math.ceil(self.per_class / self.group_size)

  @property
  def num_generated(self) -> int:
    """Ids drawn: whole groups, so >= num_samples when G does not divide the per-class count."""
    return self.groups_per_class * self.group_size * self.num_classes

  @property
  def num_shards(self) -> int:
    return math.ceil(self.num_generated / self.shard_size)

  def shard_range(self, k: int) -> tuple[int, int]:
    start = k * self.shard_size
    return start, min(start + self.shard_size, self.num_generated)

  def shards_of(self, process_index: int, process_count: int) -> list[int]:
    return list(range(process_index, self.num_shards, process_count))

  def labels(self, ids: np.ndarray) -> np.ndarray:
    return ((np.asarray(ids) // self.group_size) % self.num_classes).astype(np.int32)

  def kept(self, ids: np.ndarray) -> np.ndarray:
    """True for the ids written out: the first per_class images of each class, in id order."""
    ids = np.asarray(ids)
    rank = ids // self.group_size // self.num_classes  # which group of its class
    return (ids < self.num_generated) & (rank * self.group_size + ids % self.group_size
                                         < self.per_class)

  def num_kept(self, start: int, end: int) -> int:
    return int(self.kept(np.arange(start, end)).sum())


def image_keys(seed: int, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(noise keys, sampler keys), one typed key each per id: functions of (seed, id) only."""
  base = jax.random.key(seed)
  per_id = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
  return (jax.vmap(lambda k: jax.random.fold_in(k, 0))(per_id),
          jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_id))


def initial_noise(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
