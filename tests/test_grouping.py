"""Grouping modes (greedy, threshold, class, random): valid groups, determinism, statistics."""
import numpy as np
import pytest

from conftest import apply_overrides, load_config
from groupdiff_jax.data import grouping, pipeline, sources
from groupdiff_jax.layout import layout_from_config, make_layout


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  """(ids [n, 100], sims [n, 100], labels [n]) of the digits set: real, labelled neighbours."""
  c = load_config('common')
  c.data.source, c.data.image_size = 'digits', 8
  src = sources.make_source(c, str(tmp_path_factory.mktemp('digits')))
  ids, sims = src.neighbors
  return np.asarray(ids), np.asarray(sims, np.float32), np.asarray(src.labels)


def _form(digits, mode, *, seed=0, num_groups=150, pool=None, **kw):
  ids, sims, labels = digits
  pool = np.arange(len(ids)) if pool is None else pool
  return grouping.form_groups(ids, sims, pool, group_size=4, num_groups=num_groups, mode=mode,
                              threshold=kw.pop('threshold', 0.7), labels=labels,
                              rng=np.random.default_rng(seed), **kw)


def test_registry_names_the_four_modes():
  assert list(grouping.MODES) == ['greedy', 'threshold', 'class', 'random']


@pytest.mark.parametrize('mode', list(grouping.MODES))
def test_every_mode_forms_valid_groups(digits, mode):
  ids, _, labels = digits
  pool = np.random.default_rng(9).choice(len(ids), 1500, replace=False)  # not every id
  g = _form(digits, mode, pool=pool, num_groups=200)
  assert g.groups.shape == (200, 4) and g.groups.dtype == np.int32
  assert all(len(set(row)) == 4 for row in g.groups.tolist())     # no member twice in a group
  members = np.concatenate([g.groups.ravel(), g.rest])
  assert sorted(members.tolist()) == sorted(pool.tolist())        # each pool id exactly once
  assert g.num_anchors >= 200 and g.num_failed == g.num_anchors - 200
  if mode in ('greedy', 'threshold'):                               # partners from the top K
    for anchor, *partners in g.groups:
      assert set(partners) <= set(ids[anchor].tolist())
    assert g.partners_found == 600
  if mode == 'class':
    assert (labels[g.groups] == labels[g.groups[:, :1]]).all()


@pytest.mark.parametrize('mode', list(grouping.MODES))
def test_plan_is_deterministic_per_seed_and_epoch(digits, mode):
  ids, sims, labels = digits
  layout = make_layout(64, 1, 4, 0.5)

  def plan(seed, epoch):
    return grouping.plan_epoch(ids, sims, layout, mode=mode, threshold=0.7, seed=seed,
                               epoch=epoch, labels=labels).batches

  a = plan(0, 0)
  np.testing.assert_array_equal(a, plan(0, 0))
  assert not np.array_equal(a, plan(0, 1)) and not np.array_equal(a, plan(1, 0))
  assert len(np.unique(a)) == a.size  # an epoch uses every image at most once


def test_class_mode_reuses_a_failed_anchor():
  # One class of 5 images, pairs, 4 anchors: the first anchor takes the only non-anchor, the
  # second fails and returns to its class's queue, the third picks it up, the fourth is unused.
  ids = np.tile(np.arange(5), (5, 1))
  for seed in range(5):
    g = grouping.form_groups(ids, np.ones((5, 5)), np.arange(5), group_size=2, num_groups=2,
                             mode='class', threshold=0.0, labels=np.zeros(5, int),
                             rng=np.random.default_rng(seed), anchor_surplus=2.0)
    assert len(g.groups) == 2 and g.num_anchors == 3 and g.num_failed == 1
    assert len(set(g.groups.ravel().tolist())) == 4 and len(g.rest) == 1


def test_class_mode_needs_labels(digits):
  ids, sims, _ = digits
  with pytest.raises(ValueError, match="'class' needs class labels"):
    grouping.form_groups(ids, sims, np.arange(len(ids)), group_size=4, num_groups=10,
                         mode='class', threshold=0.7, rng=np.random.default_rng(0))


def test_random_mode_statistics(digits):
  ids, sims, labels = digits
  n, k = ids.shape
  same, found, counts = [], [], np.zeros(n)
  for seed in range(30):
    g = _form(digits, 'random', seed=seed, num_groups=300)
    partners = g.groups[:, 1:]
    same.append(np.mean(labels[partners] == labels[g.groups[:, :1]]))
    found.append(g.partners_found / partners.size)
    counts += np.bincount(partners.ravel(), minlength=n)
  # Uniform partners: class agreement at chance (10 balanced classes), top-K membership at
  # K / (n - 1), and every image picked about equally often (a Poisson-like spread).
  assert abs(np.mean(same) - 0.1) < 0.02
  assert abs(np.mean(found) - k / (n - 1)) < 0.015
  expect = counts.mean()
  assert np.std(counts) < 1.5 * np.sqrt(expect)
  # The similarity modes, for contrast, pick same-class neighbours.
  greedy = _form(digits, 'greedy')
  assert np.mean(labels[greedy.groups[:, 1:]] == labels[greedy.groups[:, :1]]) > 0.9


def test_partner_similarity_statistics(digits):
  ids, sims, _ = digits
  g = _form(digits, 'greedy')
  direct = [sims[a, ids[a].tolist().index(p)] for a, *ps in g.groups for p in ps]
  assert g.partners_found == len(direct)
  assert g.partner_sim_sum == pytest.approx(np.sum(direct), rel=1e-5)
  r = _form(digits, 'random')
  assert r.partners_found < 0.2 * r.groups[:, 1:].size  # few random partners are in the top K


def _config(**overrides):
  c = load_config('common')
  c.data.source, c.data.image_size, c.data.global_batch = 'digits', 8, 32
  c.model.input_size, c.model.in_channels, c.model.num_classes = 8, 1, 10
  c.group.uncond_fraction = 0.3  # rounds to 8 of 32 (two groups of 4): 25% effective
  return apply_overrides(c, overrides)


@pytest.mark.parametrize('mode', ['class', 'random'])
def test_pipeline_serves_groups_of_each_mode(tmp_path, mode):
  config = _config(**{'group.neighbors': mode})
  data = pipeline.make_train_data(config, layout_from_config(config), workdir=str(tmp_path))
  batch = next(data)
  assert batch['image'].shape == (32, 8, 8, 1)
  groups = batch['label'][24:].reshape(2, 4)
  if mode == 'class':
    assert (groups == groups[:, :1]).all()


def test_summary_line(tmp_path):
  config = _config()
  data = pipeline.make_train_data(config, layout_from_config(config), workdir=str(tmp_path))
  line = data.summary()
  stats = data.epoch_stats(0)
  assert '\n' not in line
  assert f'partner cosine {stats["mean_partner_sim"]:.3f}' in line
  assert f'{stats["num_failed"]} of {stats["num_anchors"]} anchors failed' in line
  assert stats['num_partners'] == 3 * stats['num_groups'] == stats['partners_found']
  assert 0.5 < stats['mean_partner_sim'] <= 1.0
  with pytest.raises(ValueError, match="unknown group.neighbors mode 'nope'"):
    pipeline.make_train_data(_config(**{'group.neighbors': 'nope'}),
                             layout_from_config(config), workdir=str(tmp_path))
