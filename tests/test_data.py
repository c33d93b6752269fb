"""Data pipeline: sources, neighbour grouping and the Grain stream (CPU, a few seconds)."""
import json

import numpy as np
import pytest

from conftest import apply_overrides, load_config
from groupdiff_jax.data import grouping, pipeline, sources
from groupdiff_jax.layout import layout_from_config
from groupdiff_jax.retrieval import neighbor_file


def _config(source='digits', **overrides):
  """configs/common.py with tiny sizes; overrides use 'a.b' keys."""
  c = load_config('common')
  c.data.source = source
  c.data.global_batch = 32
  c.data.image_size = 16
  c.data.num_threads = 1
  c.group.uncond_fraction = 0.25  # 24 cond singles + 2 uncond groups of 4
  if source == 'digits':
    c.model.input_size, c.model.in_channels, c.model.num_classes = 16, 1, 10
  else:
    c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 4, 1000
    c.data.synthetic_size = 256   # 8 steps per epoch at batch 32
    c.data.neighbors_k = 8
  return apply_overrides(c, overrides)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data'))  # shared: the digits neighbour file is cached


def _make(config, workdir=None, **kw):
  return pipeline.make_train_data(config, layout_from_config(config), workdir=workdir, **kw)


def _take(data, count):
  return [next(data) for _ in range(count)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_digits_source(workdir):
  src = sources.make_source(_config(), workdir)
  assert len(src) == 1797
  image, label = src[5]
  assert image.shape == (16, 16, 1) and image.dtype == np.float32
  images = np.stack([src[i][0] for i in range(len(src))])
  labels = np.array([src[i][1] for i in range(len(src))])
  assert images.min() == -1.0 and 0.9 < images.max() <= 1.0
  assert set(labels.tolist()) == set(range(10))
  ids, sims, header = neighbor_file.read_neighbors(f'{workdir}/digits_neighbors')
  assert header['dataset'] == 'digits' and ids.shape == (1797, 100) == src.neighbors[0].shape
  assert not (ids == np.arange(1797)[:, None]).any()            # self excluded
  assert (np.diff(sims.astype(np.float32), axis=1) <= 1e-3).all()  # most similar first
  assert (labels[ids[:, :3]] == labels[:, None]).mean() > 0.95  # the feature space is sensible


def test_synthetic_source_is_deterministic():
  a, b = (sources.make_source(_config('synthetic')) for _ in range(2))
  assert len(a) == 256 and a[3][0].shape == (8, 8, 4) and 0 <= a[3][1] < 1000
  np.testing.assert_array_equal(a[17][0], b[17][0])
  assert not np.array_equal(a[17][0], a[18][0])
  ids, _ = a.neighbors
  assert ids.shape == (256, 8) and not (ids == np.arange(256)[:, None]).any()


def test_unknown_source_error():
  with pytest.raises(ValueError, match=r"unknown data.source 'nope'; known: digits, "
                     r'latents, synthetic$'):
    sources.make_source(_config('nope'))


@pytest.mark.parametrize('rows', [[], [3, 2], [0, 32], [[0, 1]]])
def test_rows_must_be_increasing_rows_of_the_batch(rows):
  with pytest.raises(ValueError, match=r'rows must be increasing row indices in \[0, 32\)'):
    _make(_config(), rows=rows)


def test_batch_layout_and_groups(workdir):
  config = _config()
  layout = layout_from_config(config)
  data = _make(config, workdir)
  src = data.source
  nbr_ids = np.asarray(src.neighbors[0])
  assert data.element_spec['image'].shape == (32, 16, 16, 1)
  seen = []
  for step, batch in enumerate(_take(data, 3)):
    assert batch['image'].shape == (32, 16, 16, 1) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
    ids = data.global_ids(step)
    seen.append(ids)
    # The batch holds exactly the planned images, in order, with their true labels.
    np.testing.assert_array_equal(batch['image'], np.stack([src[i][0] for i in ids]))
    np.testing.assert_array_equal(batch['label'], [src[i][1] for i in ids])
    groups = ids[layout.num_cond:].reshape(layout.num_uncond_groups, layout.uncond_group_size)
    for anchor, *members in groups:  # contiguous groups: anchor first, members in its top-K
      assert set(members) <= set(nbr_ids[anchor].tolist())
  seen = np.concatenate(seen)
  assert len(np.unique(seen)) == len(seen)  # no image twice within an epoch


def test_groupdiff_f_layout(workdir):
  config = _config(**{'group.cond_size': 4, 'data.global_batch': 64})
  layout = layout_from_config(config)
  data = _make(config, workdir)
  nbr_ids = np.asarray(data.source.neighbors[0])
  plan = data._planner.plan(0).batches  # all groups of the epoch
  assert plan.shape[1] == 64 and len(np.unique(plan)) == plan.size
  for anchor, *members in plan.reshape(-1, 4):
    assert set(members) <= set(nbr_ids[anchor].tolist())
  assert data.epoch_stats(0)['num_repeated'] == 0


def test_deterministic_and_seeded(workdir):
  # Same seed -> same batches, also with more reader threads (plans are shared across threads).
  _same(_take(_make(_config(), workdir), 3),
        _take(_make(_config(**{'data.num_threads': 3}), workdir), 3))
  other = _take(_make(_config(seed=1), workdir), 1)[0]
  assert not np.array_equal(other['image'], _take(_make(_config(), workdir), 1)[0]['image'])


def test_resume_across_epoch_boundary():
  config = _config('synthetic')
  data = _make(config)
  assert data.steps_per_epoch == 8
  _take(data, 6)
  state = json.loads(json.dumps(data.get_state()))  # JSON round trip, as a checkpoint would
  expected = _take(data, 5)                          # steps 6..10 cross into epoch 1
  resumed = _make(config)
  resumed.set_state(state)
  _same(_take(resumed, 5), expected)
  # Epochs use new plans, and every image appears once per epoch.
  e0, e1 = (np.concatenate([data.global_ids(s) for s in range(e * 8, e * 8 + 8)]) for e in (0, 1))
  assert sorted(e0) == sorted(e1) == list(range(256)) and not np.array_equal(e0, e1)
  data.global_ids(2 * 8)  # a third epoch evicts epoch 0's cached plan; recomputing matches
  np.testing.assert_array_equal(np.concatenate([data.global_ids(s) for s in range(8)]), e0)
  with pytest.raises(ValueError, match='another pipeline'):
    _make(_config('synthetic', seed=3)).set_state(state)


def test_replanned_epoch_zero_is_identical():
  # All-grouped batches: groups fail, so epoch 0 is shorter than n // B (6 of 8 steps) and the
  # epoch length is fixed by it; re-planning an evicted epoch 0 must give the same ids.
  data = _make(_config('synthetic', **{'group.uncond_fraction': 1.0}))
  assert data.steps_per_epoch < 256 // 32
  first = data.global_ids(0)
  data.global_ids(data.steps_per_epoch)
  data.global_ids(2 * data.steps_per_epoch)  # evicts epoch 0
  np.testing.assert_array_equal(data.global_ids(0), first)


@pytest.mark.parametrize('source', ['synthetic', 'digits'])
def test_any_row_subsets_read_the_planned_rows(source, workdir):
  # Processes read the (possibly non-contiguous) rows their devices hold: together they give
  # the single-process batch, row for row, whichever rows each one holds.
  config = _config(source)
  full = _take(_make(config, workdir), 2)
  perm = np.random.default_rng(0).permutation(32)
  subsets = [np.sort(perm[:8]), np.sort(perm[8:20]), np.sort(perm[20:])]
  parts = [_take(_make(config, workdir, rows=rows), 2) for rows in subsets]
  for step in range(2):
    for key in ('image', 'label'):
      merged = np.zeros_like(full[step][key])
      for rows, part in zip(subsets, parts):
        assert part[step][key].shape[0] == len(rows)
        merged[rows] = part[step][key]
      np.testing.assert_array_equal(merged, full[step][key])


def _digits_neighbors(workdir):
  ids, sims = sources.make_source(_config(), workdir).neighbors
  return np.asarray(ids), np.asarray(sims, np.float32)


def test_greedy_takes_nearest_unused(workdir):
  ids, sims = _digits_neighbors(workdir)
  g = grouping.form_groups(ids, sims, np.arange(len(ids)), group_size=4, num_groups=150,
                           mode='greedy', threshold=0.0, rng=np.random.default_rng(0),
                           anchor_surplus=1.0)
  assert g.num_failed == 0 and g.num_anchors == 150 and g.groups.shape == (150, 4)
  anchors = set(g.groups[:, 0].tolist())  # with surplus 1 and no failure: all anchors tried
  used = set()
  for anchor, *members in g.groups:  # replay: the nearest ids not an anchor and not yet used
    expect = [c for c in ids[anchor] if c not in anchors and c not in used][:3]
    assert members == expect
    used.update(members)
  assert sorted(np.concatenate([g.groups.ravel(), g.rest]).tolist()) == list(range(len(ids)))


def test_threshold_mode(workdir):
  ids, sims = _digits_neighbors(workdir)
  kw = dict(group_size=4, num_groups=150, rng=np.random.default_rng(0))
  pool = np.arange(len(ids))
  thr = grouping.form_groups(ids, sims, pool, mode='threshold', threshold=0.8, anchor_surplus=2.0,
                             **kw)  # ~30% of anchors fail at 0.8: a larger surplus fills 150
  assert len(thr.groups) == 150
  ranks = []
  for anchor, *members in thr.groups:
    row = ids[anchor].tolist()
    pos = [row.index(m) for m in members]
    assert (sims[anchor, pos] >= 0.8).all()
    ranks += pos
  greedy = grouping.form_groups(ids, sims, pool, mode='greedy', threshold=0.8, **kw)
  greedy_ranks = [ids[a].tolist().index(m) for a, *ms in greedy.groups for m in ms]
  assert np.mean(ranks) > np.mean(greedy_ranks) + 2  # random picks, not the nearest ones
  strict = grouping.form_groups(ids, sims, pool, mode='threshold', threshold=0.95, **kw)
  assert strict.num_failed > 0  # few anchors have 3 unused neighbours at cosine >= 0.95
  for anchor, *members in strict.groups:
    assert (sims[anchor, [ids[anchor].tolist().index(m) for m in members]] >= 0.95).all()
  with pytest.raises(ValueError, match='unknown group.neighbors mode'):
    grouping.form_groups(ids, sims, pool, mode='nope', threshold=0.8, **kw)


def test_threshold_pipeline_runs(workdir):
  data = _make(_config(**{'group.neighbors': 'threshold', 'group.threshold': 0.7}), workdir)
  batch = next(data)
  assert batch['image'].shape == (32, 16, 16, 1)
  ids, sims = data.source.neighbors
  groups = data.global_ids(0)[24:].reshape(2, 4)
  for anchor, *members in groups:
    row = np.asarray(ids[anchor]).tolist()
    assert all(sims[anchor, row.index(m)] >= 0.7 for m in members)


def test_latents_without_paths_name_the_preparation_commands():
  for unset in ('path', 'neighbors'):
    config = _config('latents', **{'data.path': '/x', 'data.neighbors': '/y', f'data.{unset}': ''})
    with pytest.raises(ValueError, match=rf"needs config.data.{unset} .*groupdiff_jax.encode.*"
                                         r"groupdiff_jax.embed.*groupdiff_jax.neighbors"):
      sources.make_source(config)
