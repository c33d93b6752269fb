"""How a global GroupDiff batch is laid out: conditional groups first, then unconditional groups.

Every group's members are contiguous along the batch axis, so group attention is a reshape
(B*M, T, D) -> (B, M*T, D). The data pipeline emits images in this order with their true labels;
the train step replaces the labels of the unconditional part with the null class.
"""
import dataclasses

import ml_collections


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
