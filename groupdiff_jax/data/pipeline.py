"""The training input pipeline: grouped GroupDiff batches served through a Grain MapDataset.

Global step s of the infinite stream belongs to epoch e = s // steps_per_epoch; the epoch's plan
(grouping.plan_epoch, seeded with (config.seed, e)) gives the global batch's image ids in layout
order: conditional groups, then unconditional groups, members contiguous. The batch is emitted in
the train step's shard order (`order`, layout.shard_order: batch row r is plan row order[r], so
every batch shard holds whole groups). Every process computes the same cheap plan and reads only
`rows`: the batch rows its own devices hold in the global batch (sharding.batch_rows), in
increasing order and not necessarily contiguous, since a topology-ordered mesh may place a
process's devices anywhere along the batch axis.

Grain sees a flat infinite MapDataset of per-process elements, k -> (step k // B_local, slot
k % B_local) with B_local = len(rows), batched by B_local; so its iterator state is just the next step index, and
get_state()/set_state() restore the exact next batch (also across epoch boundaries, since the
plans are a pure function of (seed, epoch)).
"""
import threading
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from groupdiff_jax.data import grouping, sources
from groupdiff_jax.layout import BatchLayout

DEFAULT_PREFETCH_BATCHES = 4


def _ensure_flags_parsed() -> None:
  # Grain's reader threads read absl flags; outside absl.app.run they would raise
  # UnparsedFlagAccessError (toolchain_notes.md). Marking parsed keeps every flag's default.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _Planner:
  """Epoch plans, computed on demand and shared by grain's reader threads."""

  def __init__(self, source: sources.DataSource, layout: BatchLayout, *, mode: str,
               threshold: float, seed: int, order: np.ndarray):
    if mode not in grouping.MODES:
      raise ValueError(f'unknown group.neighbors mode {mode!r}; known: '
                       f'{", ".join(grouping.MODES)}')
    self._nbr_ids, self._nbr_sims = source.neighbors
    if self._nbr_ids.shape[0] != len(source):
      raise ValueError(f'neighbour lists cover {self._nbr_ids.shape[0]} images, the source '
                       f'has {len(source)}')
    self._layout, self.mode, self._threshold, self._seed = layout, mode, threshold, seed
    self._order = order
    # Class labels of every image: only the 'class' grouping mode reads them.
    self._labels = np.asarray(source.labels) if mode == 'class' else None
    self._pool = getattr(source, 'valid_ids', None)  # None: every id may be drawn
    self._lock = threading.Lock()
    self._plans: dict[int, grouping.EpochPlan] = {}
    self.steps_per_epoch: int | None = None
    # Epoch 0 fixes the epoch length for good, so step -> (epoch, step in epoch) never changes
    # and a resumed run needs only the plan of the epoch it resumes in.
    self.steps_per_epoch = self.plan(0).steps

  def plan(self, epoch: int) -> grouping.EpochPlan:
    with self._lock:  # one thread plans, the others wait for the same plan
      plan = self._plans.pop(epoch, None)
      if plan is None:
        # Epoch 0 is always planned with steps=None (how it set the epoch length): asking for
        # a different number of groups would draw other anchors, so a recomputed (evicted)
        # epoch 0 would differ from the first one.
        plan = grouping.plan_epoch(
            self._nbr_ids, self._nbr_sims, self._layout, mode=self.mode,
            threshold=self._threshold, seed=self._seed, epoch=epoch,
            steps=None if epoch == 0 else self.steps_per_epoch, labels=self._labels,
            pool=self._pool)
      self._plans[epoch] = plan  # re-inserted last: the dict's order is least recently used
      while len(self._plans) > 2:  # threads straddle at most one epoch boundary
        del self._plans[next(iter(self._plans))]
      return plan

  def global_ids(self, step: int) -> np.ndarray:
    """The ids of global batch `step` in shard order."""
    epoch, within = divmod(step, self.steps_per_epoch)
    return self.plan(epoch).batches[within][self._order]


class _ReadElement:
  """Flat element index -> one image of this process's rows of the global batch."""

  def __init__(self, source: sources.DataSource, planner: _Planner, rows: np.ndarray):
    self._source, self._planner = source, planner
    self._rows, self._local_batch = rows, len(rows)
    read = getattr(source, 'read', None)  # a per-step draw where the source has one
    self._read = read if read is not None else lambda image_id, step: source[image_id]

  def __call__(self, index: int, _: Any) -> dict[str, np.ndarray]:
    step, slot = divmod(int(index), self._local_batch)
    image_id = int(self._planner.global_ids(step)[self._rows[slot]])
    image, label = self._read(image_id, step)
    return {'image': np.asarray(image, np.float32), 'label': np.int32(label)}


class _ReadBatch:
  """Step index -> this process's whole batch, for sources with a vectorised `read_batch`."""

  def __init__(self, source: sources.DataSource, planner: _Planner, rows: np.ndarray):
    self._source, self._planner, self._rows = source, planner, rows

  def __call__(self, step: int, _: Any) -> dict[str, np.ndarray]:
    ids = self._planner.global_ids(int(step))[self._rows]
    images, labels = self._source.read_batch(ids, int(step))
    return {'image': np.asarray(images, np.float32), 'label': np.asarray(labels, np.int32)}


class TrainData:
  """An infinite iterator of this process's batches {'image': [B_local,H,W,C], 'label': [B_local]}.

  Labels are the true labels for the whole batch; the train step nulls the unconditional part.
  """

  def __init__(self, source: sources.DataSource, layout: BatchLayout, planner: _Planner, *,
               source_name: str, seed: int, rows: np.ndarray, read_options: grain.ReadOptions):
    self.source, self.layout, self._planner = source, layout, planner
    self.rows = rows
    self.local_batch = len(rows)
    if hasattr(source, 'read_batch'):  # one element per step, read in one vectorised call
      self.dataset = (grain.MapDataset.range(1).repeat()
                      .map_with_index(_ReadBatch(source, planner, rows)))
    else:
      # range(B_local).repeat() is infinite and passes the global element index to the map.
      self.dataset = (grain.MapDataset.range(self.local_batch).repeat()
                      .map_with_index(_ReadElement(source, planner, rows))
                      .batch(self.local_batch, drop_remainder=True))
    # Either way the iterator's index is the step: get_state()/set_state() mean the same.
    self._read_options = read_options
    self._iter: grain.DatasetIterator | None = None
    self._fingerprint = {'source': source_name, 'num_examples': len(source),
                         'global_batch': layout.global_batch, 'seed': seed,
                         'steps_per_epoch': planner.steps_per_epoch}

  def _iterator(self) -> grain.DatasetIterator:
    if self._iter is None:  # created lazily: set_state before the first batch wastes no reads
      _ensure_flags_parsed()
      self._iter = iter(self.dataset.to_iter_dataset(self._read_options))
    return self._iter

  def __iter__(self) -> 'TrainData':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator())

  def get_state(self) -> dict[str, Any]:
    """{'grain': {'next_index': next step}, 'source', 'num_examples', 'global_batch', 'seed',
    'steps_per_epoch'}: JSON-serialisable; the extra keys guard set_state against another
    pipeline. The state does not depend on the process count."""
    return {'grain': self._iterator().get_state(), **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    diff = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if diff:
      raise ValueError(f'data state is from another pipeline (batch, groups, source or seed '
                       f'changed since the checkpoint?); (saved, current): {diff}')
    self._iterator().set_state(state['grain'])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.source.image_shape)

  @property
  def steps_per_epoch(self) -> int:
    return self._planner.steps_per_epoch

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {'image': jax.ShapeDtypeStruct((self.local_batch, *self.image_shape), np.float32),
            'label': jax.ShapeDtypeStruct((self.local_batch,), np.int32)}

  def global_ids(self, step: int) -> np.ndarray:
    """The image ids of global batch `step` (all processes), in shard order."""
    return np.array(self._planner.global_ids(step))

  def epoch_stats(self, epoch: int) -> dict[str, int | float]:
    """Planning statistics of an epoch (anchors tried/failed, groups formed/reused, partners)."""
    p = self._planner.plan(epoch)
    return {'steps': p.steps, 'num_anchors': p.num_anchors, 'num_failed': p.num_failed,
            'num_groups': p.num_groups, 'num_repeated': p.num_repeated,
            'num_partners': p.num_partners, 'partners_found': p.partners_found,
            'mean_partner_sim': p.mean_partner_sim}

  def summary(self) -> str:
    """One line for the trainer's startup: the source and epoch 0's grouping statistics (the
    batch split is on the line before it, layout.describe_split)."""
    return (f'data: {self._fingerprint["source"]}, {len(self.source)} images | epoch 0 '
            f'{self._planner.plan(0).summary(self._planner.mode)}')


def make_train_data(config: ml_collections.ConfigDict, layout: BatchLayout, *,
                    workdir: str | None = None, rows: Sequence[int] | None = None,
                    order: Sequence[int] | None = None) -> TrainData:
  """The training stream of one process: rows `rows` (default: all) of every global batch in
  shard order `order` (the train step's `Trainer.order`; default: layout order). `rows` are e.g.
  sharding.batch_rows of the batch sharding (see module docstring)."""
  rows = np.arange(layout.global_batch) if rows is None else np.asarray(rows, np.int64)
  order = np.arange(layout.global_batch) if order is None else np.asarray(order, np.int64)
  if sorted(order.tolist()) != list(range(layout.global_batch)):
    raise ValueError(f'order must be a permutation of the {layout.global_batch} batch rows')
  if (rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0) or rows[0] < 0
      or rows[-1] >= layout.global_batch):
    raise ValueError(f'rows must be increasing row indices in [0, {layout.global_batch}), '
                     f'got {rows.tolist()}')
  source = sources.make_source(config, workdir)
  planner = _Planner(source, layout, mode=config.group.neighbors,
                     threshold=config.group.threshold, seed=config.seed, order=order)
  read_options = grain.ReadOptions(
      num_threads=config.data.num_threads,
      prefetch_buffer_size=config.data.get('prefetch_batches', DEFAULT_PREFETCH_BATCHES))
  return TrainData(source, layout, planner, source_name=config.data.source, seed=config.seed,
                   rows=rows, read_options=read_options)
