"""How a global GroupDiff batch is laid out over the batch shards of the mesh.

Layout order (`BatchLayout`, the grouping plan's order): conditional groups first, then
unconditional groups, every group's members contiguous. The batch the model sees is in *shard
order* (`shard_order`): layout rows permuted so that each of the S batch shards (S equal, contiguous
blocks of rows, one per device along the batch axes) holds whole groups, with no padding. E.g. 232
conditional singles + 24 unconditional images in groups of 4 over 64 shards of 4 rows: 6 shards
hold one unconditional group, 58 hold 4 singles. The data pipeline emits rows in shard order with
their true labels; the train step draws times and sample ids in layout order, permutes them the
same way, and replaces the labels of the unconditional rows with the null class. One model pass
covers the whole batch: its `Groups` (the shard-ordered segments) tell group attention where the
groups are.
"""
import dataclasses
from typing import Sequence

import ml_collections
import numpy as np

from groupdiff_jax.models.group_attention import Groups


class LayoutError(ValueError):
  """A batch/group configuration that cannot be laid out."""


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  global_batch: int
  cond_group_size: int
  uncond_group_size: int
  num_cond: int    # conditional images (a multiple of cond_group_size)
  num_uncond: int  # unconditional images (a multiple of uncond_group_size)

  @property
  def num_cond_groups(self) -> int:
    return self.num_cond // self.cond_group_size

  @property
  def num_uncond_groups(self) -> int:
    return self.num_uncond // self.uncond_group_size

  @property
  def max_group_size(self) -> int:
    return max(self.cond_group_size, self.uncond_group_size)


def make_layout(global_batch: int, cond_size: int, uncond_size: int,
                uncond_fraction: float) -> BatchLayout:
  """Splits `global_batch` into conditional and unconditional groups of static size."""
  if global_batch <= 0:
    raise LayoutError(f'global batch must be positive, got {global_batch}')
  for name, size in (('cond', cond_size), ('uncond', uncond_size)):
    if size < 1:
      raise LayoutError(f'{name} group size must be >= 1, got {size}')
  if not 0.0 <= uncond_fraction <= 1.0:
    raise LayoutError(f'uncond_fraction must be in [0, 1], got {uncond_fraction}')
  num_uncond = int(round(uncond_fraction * global_batch / uncond_size)) * uncond_size
  if uncond_fraction > 0 and num_uncond == 0:
    num_uncond = uncond_size  # keep at least one unconditional group when asked for any
  num_cond = global_batch - num_uncond
  if num_cond < 0 or num_cond % cond_size:
    raise LayoutError(
        f'group size does not divide the batch: {global_batch} images minus {num_uncond} '
        f'unconditional leaves {num_cond}, not a multiple of cond group size {cond_size}')
  if global_batch % uncond_size and uncond_fraction == 1.0:
    raise LayoutError(f'group size {uncond_size} does not divide the batch {global_batch}')
  return BatchLayout(global_batch, cond_size, uncond_size, num_cond, num_uncond)


def layout_from_config(config: ml_collections.ConfigDict) -> BatchLayout:
  return make_layout(config.data.global_batch, config.group.cond_size, config.group.uncond_size,
                     config.group.uncond_fraction)


def describe_split(layout: BatchLayout, uncond_fraction: float) -> tuple[str, str | None]:
  """The effective conditional/unconditional split as a sentence, and a warning when it is
  further from the requested fraction than rounding to whole groups explains (half a group)."""
  requested = uncond_fraction * layout.global_batch
  share = layout.num_uncond / layout.global_batch
  line = (f'{layout.num_cond} cond (groups of {layout.cond_group_size}) + {layout.num_uncond} '
          f'uncond (groups of {layout.uncond_group_size}) = {100 * share:.1f}% unconditional '
          f'(requested {100 * uncond_fraction:.1f}% = {requested:g} images)')
  warning = None
  if abs(layout.num_uncond - requested) > layout.uncond_group_size / 2:
    warning = (f'warning: the unconditional share is {layout.num_uncond}/{layout.global_batch} '
               f'= {100 * share:.1f}%, not the requested {100 * uncond_fraction:.1f}%: '
               f'{requested:g} images do not make whole groups of {layout.uncond_group_size}; '
               f'choose data.global_batch or group.uncond_size to fit')
  return line, warning


def _uncond_per_shard(layout: BatchLayout, shards: int) -> list[int]:
  """Unconditional groups of each shard such that every shard fills with whole groups; the
  fullest shards first (few distinct shard structures). LayoutError when there is no such split.
  """
  rows, mc, mu = layout.global_batch // shards, layout.cond_group_size, layout.uncond_group_size
  counts = [b for b in range(rows // mu, -1, -1) if (rows - b * mu) % mc == 0]
  total = layout.num_uncond_groups
  # reachable[s]: the unconditional group totals that s shards can hold (conditional rows fill
  # the rest, and their total then matches too, since both fill the batch exactly).
  reachable = [{0}]
  for _ in range(shards):
    reachable.append({g + b for g in reachable[-1] for b in counts if g + b <= total})
  if total not in reachable[shards]:
    raise LayoutError(
        f'{layout.num_cond} conditional images (groups of {mc}) and {layout.num_uncond} '
        f'unconditional (groups of {mu}) do not split into {shards} batch shards of {rows} '
        f'whole groups; change data.global_batch, the group sizes or the mesh')
  per_shard, left = [], total
  for s in range(shards - 1, -1, -1):
    b = next(b for b in counts if b <= left and left - b in reachable[s])
    per_shard.append(b)
    left -= b
  return per_shard


def shard_order(layout: BatchLayout, shards: int) -> tuple[np.ndarray, Groups]:
  """(order, groups) for a batch split into `shards` blocks of rows: row r of the batch is layout
  row order[r] (conditional rows are < num_cond), and `groups` is the batch's static structure,
  each shard's conditional groups, then its unconditional groups. One shard: the layout order."""
  if shards < 1 or layout.global_batch % shards:
    raise LayoutError(f'global batch {layout.global_batch} does not split into {shards} batch '
                      f'shards; choose a batch that is a multiple of the batch shards')
  rows, mc, mu = layout.global_batch // shards, layout.cond_group_size, layout.uncond_group_size
  order, segments, cond, uncond = [], [], 0, layout.num_cond
  for b in _uncond_per_shard(layout, shards):
    n_cond = rows - b * mu
    order += list(range(cond, cond + n_cond)) + list(range(uncond, uncond + b * mu))
    segments += [(n_cond, mc), (b * mu, mu)]
    cond, uncond = cond + n_cond, uncond + b * mu
  return np.asarray(order, np.int64), Groups(tuple(segments))


def shard_order_for_mesh(layout: BatchLayout,
                         shard_counts: Sequence[int]) -> tuple[np.ndarray, Groups, int]:
  """`shard_order` for the first of `shard_counts` (the mesh's batch shard counts, largest
  first; group_attention.batch_shard_counts) whose shards can hold whole groups: (order,
  groups, shards). With fewer shards than the mesh has, group attention runs on that many."""
  for shards in shard_counts:
    try:
      return (*shard_order(layout, shards), shards)
    except LayoutError:
      continue
  return (*shard_order(layout, 1), 1)
