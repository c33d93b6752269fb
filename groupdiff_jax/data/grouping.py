"""Per-epoch group planning from neighbour lists (the JAX port of the official `create_epoch_plan`).

How the N-1 partners of an anchor are picked (config.group.neighbors), a registry by name:
  'greedy'    the official code: the nearest still-unused neighbours among the top K.
  'threshold' the paper: N-1 drawn at random among the unused top-K neighbours whose cosine
              similarity to the anchor is >= config.group.threshold.
  'class'     the official `--query_sim class` ablation: partners from the anchor's class. The
              official code takes the first unused ones in metadata order; here the class is in a
              fresh random order every epoch, so which class-mates join is random too.
  'random'    the ablation without similarity: partners uniformly at random among unused ids.
All share one sequential loop over the anchors: a mode is a picker that, given the anchor and
which ids are still unused, returns up to N-1 partners. The neighbour modes precompute every
anchor's candidate row at once in numpy; the class and random modes are queues (a shuffled list
per class, or one for all) from which partners are popped, so a whole epoch is O(n).

Everything is pure numpy and deterministic given its `rng`, so every process of a multi-host job
computes the same plan without communication.
"""
import dataclasses
from collections.abc import Callable
from typing import Protocol

import numpy as np

from groupdiff_jax.layout import BatchLayout

ANCHOR_SURPLUS = 1.5


@dataclasses.dataclass(frozen=True)
class Grouping:
  groups: np.ndarray  # int32 [G, N]: anchor first, then its partners (nearest first in greedy)
  rest: np.ndarray    # int32 [R]: pool ids in no group (failed/unused anchors included), shuffled
  num_anchors: int    # anchors tried before enough groups were formed (or the anchors ran out)
  num_failed: int     # of those, anchors with fewer than N-1 usable candidates
  partners_found: int = 0     # partners that are in their anchor's top-K list ...
  partner_sim_sum: float = 0.0  # ... and the sum of their cosine similarities to the anchor


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What a mode may use to build its picker for one call of form_groups."""
  anchors: np.ndarray   # anchor ids, in the order they are tried
  others: np.ndarray    # the other pool ids (the possible partners), shuffled
  nbr_ids: np.ndarray
  nbr_sims: np.ndarray
  labels: np.ndarray | None
  threshold: float
  rng: np.random.Generator


class Picker(Protocol):
  def partners(self, i: int, avail: np.ndarray, need: int) -> np.ndarray:
    """Up to `need` available partner ids for anchor number i (fewer: the anchor fails)."""

  def returned(self, anchor: int) -> None:
    """A failed anchor is an ordinary id again: it may be picked as a partner later."""


class _RowPicker:
  """Candidates are a fixed row per anchor (its top-K, in some order, some rows masked)."""

  def __init__(self, cand: np.ndarray, eligible: np.ndarray):
    self._cand, self._eligible = cand, eligible

  def partners(self, i: int, avail: np.ndarray, need: int) -> np.ndarray:
    row = self._cand[i][self._eligible[i]]
    return row[avail[row]][:need]

  def returned(self, anchor: int) -> None:
    del anchor  # it is available again, and the rows check availability


class _QueuePicker:
  """One shuffled queue of partner ids per key (the class, or a single key for all).

  Only this picker takes ids from its queues, so every id not yet popped is still available:
  popping needs no availability check. A failed anchor joins the end of its key's queue.
  """

  def __init__(self, others: np.ndarray, key_of: np.ndarray, anchor_keys: np.ndarray):
    order = np.argsort(key_of[others], kind='stable')  # `others` is shuffled: random per key
    self._ids = others[order]
    keys = key_of[self._ids]
    self._key_of, self._anchor_keys = key_of, anchor_keys
    self._pos = {int(k): int(p) for k, p in zip(*np.unique(keys, return_index=True))}
    self._end = {int(k): int(p) + int(c) for k, p, c in
                 zip(*np.unique(keys, return_index=True, return_counts=True))}
    self._spare: dict[int, list[int]] = {}

  def partners(self, i: int, avail: np.ndarray, need: int) -> np.ndarray:
    del avail
    key = int(self._anchor_keys[i])
    pos, end = self._pos.get(key, 0), self._end.get(key, 0)
    spare = self._spare.get(key, [])
    if end - pos + len(spare) < need:
      return np.zeros(0, np.int64)
    take = min(need, end - pos)
    self._pos[key] = pos + take
    out = self._ids[pos:pos + take]
    if take < need:
      out = np.concatenate([out, spare[:need - take]])
      del spare[:need - take]
    return out

  def returned(self, anchor: int) -> None:
    self._spare.setdefault(int(self._key_of[anchor]), []).append(anchor)


def _nearest(s: _Setup) -> Picker:
  cand = np.asarray(s.nbr_ids[s.anchors], np.int64)  # [A, K]: one gather from the memmap
  return _RowPicker(cand, np.ones(cand.shape, bool))


def _above_threshold(s: _Setup) -> Picker:
  cand = np.asarray(s.nbr_ids[s.anchors], np.int64)
  eligible = np.asarray(s.nbr_sims[s.anchors], np.float32) >= s.threshold
  # A random order per row, so "the first N-1 unused eligible" is a uniform random choice
  # among the unused eligible ones, without calling rng inside the loop.
  order = np.argsort(s.rng.random(cand.shape), axis=1)
  return _RowPicker(np.take_along_axis(cand, order, axis=1),
                    np.take_along_axis(eligible, order, axis=1))


def _same_class(s: _Setup) -> Picker:
  if s.labels is None:
    raise ValueError("group.neighbors='class' needs class labels, and this data source has none")
  labels = np.asarray(s.labels)
  return _QueuePicker(s.others, labels, labels[s.anchors])


def _uniform(s: _Setup) -> Picker:
  one_key = np.zeros(s.nbr_ids.shape[0], np.int64)
  return _QueuePicker(s.others, one_key, one_key[s.anchors])


MODES: dict[str, Callable[[_Setup], Picker]] = {
    'greedy': _nearest,
    'threshold': _above_threshold,
    'class': _same_class,
    'random': _uniform,
}


def _partner_similarity(groups: np.ndarray, nbr_ids: np.ndarray, nbr_sims: np.ndarray,
                        block: int = 4096) -> tuple[int, float]:
  """(partners found in their anchor's top-K row, sum of their similarities)."""
  found, total = 0, 0.0
  for start in range(0, len(groups), block):
    g = groups[start:start + block]
    rows = np.asarray(nbr_ids[g[:, 0]])
    hit = rows[:, :, None] == g[:, None, 1:]                     # [b, K, N-1]
    sims = np.asarray(nbr_sims[g[:, 0]], np.float32)[:, :, None]
    found += int(hit.any(axis=1).sum())
    total += float((hit * sims).sum())
  return found, total


def form_groups(nbr_ids: np.ndarray, nbr_sims: np.ndarray, pool: np.ndarray, *,
                group_size: int, num_groups: int, mode: str, threshold: float,
                rng: np.random.Generator, labels: np.ndarray | None = None,
                anchor_surplus: float = ANCHOR_SURPLUS) -> Grouping:
  """Forms up to `num_groups` groups of `group_size` from the ids in `pool` (any order).

  Anchors are the first ceil(anchor_surplus * num_groups) ids of a shuffle of `pool` (the
  official code tries 50% extra because some fail); they are never anyone's partner, except
  that an anchor which fails returns to the pool at once (as in the official code) and may
  then be picked by a later anchor. Ids outside `pool` are never used. `labels` (class ids of
  all images) is needed by the 'class' mode only.
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
  picker = MODES[mode](_Setup(anchors, pool[num_anchors:], nbr_ids, nbr_sims, labels,
                              threshold, rng))

  need = group_size - 1
  groups = np.empty((num_groups, group_size), np.int64)
  made = failed = tried = 0
  for i in range(num_anchors):
    if made == num_groups:
      break
    tried += 1
    ok = picker.partners(i, avail, need)
    if len(ok) == need:
      avail[ok] = False
      groups[made, 0] = anchors[i]
      groups[made, 1:] = ok
      made += 1
    else:
      avail[anchors[i]] = True  # a failed anchor becomes an ordinary sample again
      picker.returned(int(anchors[i]))
      failed += 1
  avail[anchors[tried:]] = True  # anchors never tried (enough groups already) go back too
  rest = rng.permutation(np.flatnonzero(avail))
  found, sim_sum = _partner_similarity(groups[:made], nbr_ids, nbr_sims)
  return Grouping(groups[:made].astype(np.int32), rest.astype(np.int32), tried, failed,
                  found, sim_sum)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  batches: np.ndarray  # int32 [steps, global_batch]: image ids in layout order
  num_anchors: int     # summed over the uncond and (if grouped) cond rounds
  num_failed: int
  num_groups: int      # groups formed
  num_repeated: int    # groups used twice because too few formed to fill `steps`
  num_partners: int = 0       # partners in the groups formed (groups x (N-1))
  partners_found: int = 0     # of those, in their anchor's top-K neighbour list
  partner_sim_sum: float = 0.0  # the summed cosine of the found ones

  @property
  def steps(self) -> int:
    return self.batches.shape[0]

  @property
  def mean_partner_sim(self) -> float:
    """Mean cosine of partner to anchor over the partners found in the anchor's top K (the
    neighbour file holds no other similarities; in class/random mode most are not there)."""
    return self.partner_sim_sum / self.partners_found if self.partners_found else float('nan')

  def summary(self, mode: str) -> str:
    """One line: what grouping did this epoch (printed by the trainer at startup)."""
    if not self.num_partners:
      return f'groups ({mode}): none (no grouped part in the batch)'
    found = self.partners_found / self.num_partners
    sim = (f'partner cosine {self.mean_partner_sim:.3f}' if self.partners_found
           else 'no partner in its anchor\'s top K')
    return (f'groups ({mode}): {self.num_groups} formed, {sim} ({100 * found:.0f}% of partners '
            f'in the top K), {self.num_failed} of {self.num_anchors} anchors failed, '
            f'{self.num_repeated} reused, {self.steps} steps')


def _take(groups: np.ndarray, count: int) -> tuple[np.ndarray, int]:
  """The first `count` groups; cycles through them when fewer were formed (a rare shortfall)."""
  if count == 0:
    return groups[:0], 0
  if len(groups) == 0:
    raise ValueError('no group could be formed from the neighbour lists: lower '
                     'group.threshold, use group.neighbors=greedy, or use a larger K')
  return np.resize(groups, (count, groups.shape[1])), max(0, count - len(groups))


def plan_epoch(nbr_ids: np.ndarray, nbr_sims: np.ndarray, layout: BatchLayout, *, mode: str,
               threshold: float, seed: int, epoch: int, steps: int | None = None,
               labels: np.ndarray | None = None,
               pool: np.ndarray | None = None) -> EpochPlan:
  """The id plan of one epoch: `steps` global batches laid out as `layout` prescribes.

  Unconditional groups are formed first (from the whole shuffled dataset), conditional groups
  (GroupDiff-f, cond_group_size > 1) from what is left; conditional singles are the rest.
  With steps=None the epoch is as long as the data allows (at most n // global_batch); a fixed
  `steps` (the pipeline passes epoch 0's) keeps the step -> epoch map fixed, and a later epoch
  that forms fewer groups reuses some of them (counted in num_repeated).
  `pool` limits the ids drawn (default all n; latents leave unreadable images out).
  """
  n = nbr_ids.shape[0] if pool is None else len(pool)
  b = layout.global_batch
  max_steps = n // b
  if max_steps == 0:
    raise ValueError(f'the dataset ({n} images) is smaller than one global batch ({b})')
  rng = np.random.default_rng([seed, epoch])
  ask = max_steps if steps is None else steps
  kw = dict(mode=mode, threshold=threshold, rng=rng, labels=labels)

  # Uncond groups first (from the whole shuffled dataset), then cond groups from what is left;
  # singles (a group size of 1) come last from the remaining shuffled ids, so nothing overlaps.
  grouped = {}
  rest = rng.permutation(n if pool is None else np.asarray(pool))
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
                   sum(g.num_failed for g in stats), sum(len(g.groups) for g in stats), repeated,
                   sum(g.groups.shape[0] * (g.groups.shape[1] - 1) for g in stats),
                   sum(g.partners_found for g in stats), sum(g.partner_sim_sum for g in stats))
