"""Per-epoch group planning from neighbour lists (the JAX port of the official `create_epoch_plan`).

Two ways of picking the N-1 partners of an anchor (config.group.neighbors):
  'greedy'    the official code: the nearest still-unused neighbours among the top-K.
  'threshold' the paper: N-1 drawn at random among the unused top-K neighbours whose cosine
              similarity to the anchor is >= config.group.threshold.
Both share one sequential loop: a mode only decides the candidate order (nearest first, or a
random order) and which candidates are eligible (all, or those above the threshold). The order
and eligibility are computed for all anchors at once in numpy; only "which candidates are still
unused" has to be sequential, and that loop runs over the anchors only (~50k on ImageNet).

Everything is pure numpy and deterministic given its `rng`, so every process of a multi-host job
computes the same plan without communication.
"""
import dataclasses

import numpy as np

from groupdiff_jax.layout import BatchLayout

MODES = ('greedy', 'threshold')
ANCHOR_SURPLUS = 1.5


@dataclasses.dataclass(frozen=True)
class Grouping:
  groups: np.ndarray  # int32 [G, N]: anchor first, then its partners (nearest first in greedy)
  rest: np.ndarray    # int32 [R]: pool ids in no group (failed/unused anchors included), shuffled
  num_anchors: int    # anchors tried before enough groups were formed (or the anchors ran out)
  num_failed: int     # of those, anchors with fewer than N-1 usable candidates


def form_groups(nbr_ids: np.ndarray, nbr_sims: np.ndarray, pool: np.ndarray, *,
                group_size: int, num_groups: int, mode: str, threshold: float,
                rng: np.random.Generator, anchor_surplus: float = ANCHOR_SURPLUS) -> Grouping:
  """Forms up to `num_groups` groups of `group_size` from the ids in `pool` (any order).

  Anchors are the first ceil(anchor_surplus * num_groups) ids of a shuffle of `pool` (the
  official code tries 50% extra because some fail); they are never anyone's partner, except
  that an anchor which fails returns to the pool at once (as in the official code) and may
  then be picked by a later anchor. Ids outside `pool` are never used.
  """
  if mode not in MODES:
    raise ValueError(f'unknown group.neighbors mode {mode!r}; known: {", ".join(MODES)}')
  n = nbr_ids.shape[0]
  pool = rng.permutation(np.asarray(pool, np.int64))
  if group_size < 2 or num_groups <= 0:
    return Grouping(np.zeros((0, max(group_size, 1)), np.int32), pool.astype(np.int32), 0, 0)

  num_anchors = min(int(np.ceil(anchor_surplus * num_groups)), len(pool))
  anchors = pool[:num_anchors]
  avail = np.zeros(n, bool)
  avail[pool[num_anchors:]] = True

  # Candidate rows of all anchors at once (one gather from the memory-mapped file).
  cand = np.asarray(nbr_ids[anchors], np.int64)                 # [A, K]
  if mode == 'greedy':
    eligible = np.ones(cand.shape, bool)
  else:
    eligible = np.asarray(nbr_sims[anchors], np.float32) >= threshold
    # A random order per row, so "the first N-1 unused eligible" is a uniform random choice
    # among the unused eligible ones, without calling rng inside the loop.
    order = np.argsort(rng.random(cand.shape), axis=1)
    cand = np.take_along_axis(cand, order, axis=1)
    eligible = np.take_along_axis(eligible, order, axis=1)

  need = group_size - 1
  groups = np.empty((num_groups, group_size), np.int64)
  made = failed = tried = 0
  for i in range(num_anchors):
    if made == num_groups:
      break
    tried += 1
    row = cand[i][eligible[i]]
    ok = row[avail[row]][:need]
    if len(ok) == need:
      avail[ok] = False
      groups[made, 0] = anchors[i]
      groups[made, 1:] = ok
      made += 1
    else:
      avail[anchors[i]] = True  # a failed anchor becomes an ordinary sample again
      failed += 1
  avail[anchors[tried:]] = True  # anchors never tried (enough groups already) go back too
  rest = rng.permutation(np.flatnonzero(avail))
  return Grouping(groups[:made].astype(np.int32), rest.astype(np.int32), tried, failed)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  batches: np.ndarray  # int32 [steps, global_batch]: image ids in layout order
  num_anchors: int     # summed over the uncond and (if grouped) cond rounds
  num_failed: int
  num_groups: int      # groups formed
  num_repeated: int    # groups used twice because too few formed to fill `steps`

  @property
  def steps(self) -> int:
    return self.batches.shape[0]


def _take(groups: np.ndarray, count: int) -> tuple[np.ndarray, int]:
  """The first `count` groups; cycles through them when fewer were formed (a rare shortfall)."""
  if count == 0:
    return groups[:0], 0
  if len(groups) == 0:
    raise ValueError('no group could be formed from the neighbour lists: lower '
                     'group.threshold, use group.neighbors=greedy, or use a larger K')
  return np.resize(groups, (count, groups.shape[1])), max(0, count - len(groups))


def plan_epoch(nbr_ids: np.ndarray, nbr_sims: np.ndarray, layout: BatchLayout, *, mode: str,
               threshold: float, seed: int, epoch: int, steps: int | None = None) -> EpochPlan:
  """The id plan of one epoch: `steps` global batches laid out as `layout` prescribes.

  Unconditional groups are formed first (from the whole shuffled dataset), conditional groups
  (GroupDiff-f, cond_group_size > 1) from what is left; conditional singles are the rest.
  With steps=None the epoch is as long as the data allows (at most n // global_batch); a fixed
  `steps` (the pipeline passes epoch 0's) keeps the step -> epoch map fixed, and a later epoch
  that forms fewer groups reuses some of them (counted in num_repeated).
  """
  n = nbr_ids.shape[0]
  b = layout.global_batch
  max_steps = n // b
  if max_steps == 0:
    raise ValueError(f'the dataset ({n} images) is smaller than one global batch ({b})')
  rng = np.random.default_rng([seed, epoch])
  ask = max_steps if steps is None else steps
  kw = dict(mode=mode, threshold=threshold, rng=rng)

  # Uncond groups first (from the whole shuffled dataset), then cond groups from what is left;
  # singles (a group size of 1) come last from the remaining shuffled ids, so nothing overlaps.
  grouped = {}
  rest = rng.permutation(n)
  for part, size, per_step in (('uncond', layout.uncond_group_size, layout.num_uncond_groups),
                               ('cond', layout.cond_group_size, layout.num_cond_groups)):
    if size > 1:
      grouped[part] = form_groups(nbr_ids, nbr_sims, rest, group_size=size,
                                  num_groups=ask * per_step, **kw)
      rest = grouped[part].rest
  if steps is None:  # as many whole steps as the groups formed allow
    steps = ask
    for part, per_step in (('uncond', layout.num_uncond_groups), ('cond', layout.num_cond_groups)):
      if part in grouped and per_step:
        steps = min(steps, len(grouped[part].groups) // per_step)
    if steps == 0:
      raise ValueError('too few groups formed for one batch: lower group.threshold, use '
                       'group.neighbors=greedy, or use a larger K')

  parts, repeated = {}, 0
  for part, size, count in (('uncond', layout.uncond_group_size, layout.num_uncond),
                            ('cond', layout.cond_group_size, layout.num_cond)):
    if part in grouped:
      parts[part], r = _take(grouped[part].groups, steps * (count // size))
      repeated += r
    else:
      parts[part], rest = rest[:steps * count], rest[steps * count:]
  batches = np.concatenate([parts['cond'].reshape(steps, layout.num_cond),
                            parts['uncond'].reshape(steps, layout.num_uncond)], axis=1)
  stats = grouped.values()
  return EpochPlan(batches.astype(np.int32), sum(g.num_anchors for g in stats),
                   sum(g.num_failed for g in stats), sum(len(g.groups) for g in stats), repeated)
