"""The training loop as a user runs it: sharding, exact resume, re-meshing, skipped incomplete
checkpoints, divergence, GroupDiff variants, logs. Tiny configs (conftest.tiny_config), 8 CPU
devices.
"""
import glob
import json
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest
from conftest import compiled_step_cache, run_steps, tiny_config

from groupdiff_jax import checkpoint, sharding, train, train_step
from groupdiff_jax.data import pipeline

K = 2  # the interrupted run stops after K steps, the reference runs 2K


@pytest.fixture(scope='module', autouse=True)
def reuse_compiled_steps():
  with compiled_step_cache():
    yield


def restore_latest(workdir, config):
  """(step, {'state', 'ema', 'data', 'meta'}) of a workdir's newest checkpoint, on the host."""
  trainer = train_step.build(config, sharding.mesh_from_config(config))
  sh, abstract = trainer.state_shardings, trainer.abstract_state
  keys = ('step', 'params', 'opt_state')
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'), read_only=True, async_save=False)
  try:
    restored = ckpt.restore_latest(
        state={k: abstract[k] for k in keys}, state_shardings={k: sh[k] for k in keys},
        ema=abstract['ema'], ema_shardings=sh['ema'])
  finally:
    ckpt.close()
  assert restored is not None, f'no readable checkpoint in {workdir}'
  step, items = restored
  return step, jax.device_get(items)


def metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted 2K-step run and a K-step run (the 'stopped' one), both on (1, 8, 1)."""
  base = tmp_path_factory.mktemp('runs')
  full, half = str(base / 'full'), str(base / 'half')
  train.train(tiny_config(total_steps=2 * K), full)
  train.train(tiny_config(total_steps=K), half)
  assert train.steps_done(full) == [2, 4] and train.steps_done(half) == [2]
  return {'full': full, 'half': half, 'losses': train.final_losses(full)}


# --- sharding -------------------------------------------------------------------------------

def test_same_losses_on_one_device_and_on_a_2x4_fsdp_mesh():
  config = tiny_config(**{'mesh.shape': (2, 4, 1)})
  axes = config.mesh.axes
  one = sharding.make_mesh(axes, (1, 1, 1), jax.devices()[:1])
  eight = sharding.mesh_from_config(config)
  assert dict(eight.shape) == {'data': 2, 'fsdp': 4, 'context': 1}
  losses_1, state_1 = run_steps(config, one, 3)
  losses_8, state_8 = run_steps(config, eight, 3)
  assert np.all(np.isfinite(losses_1)) and len(set(losses_1.tolist())) == 3
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)

  # The parameters, the EMA and Adam's moments really are split over 'fsdp' on the 2x4 mesh.
  kernel = state_8['params']['blocks']['qkv']['kernel']  # [layers, hidden, 3*hidden]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  assert kernel.addressable_shards[0].data.shape == (2, 32 // 4, 96)
  assert len(kernel.sharding.device_set) == 8
  ema_kernel = state_8['ema']['blocks']['qkv']['kernel']
  assert ema_kernel.addressable_shards[0].data.shape == (2, 8, 96)
  moments = [x for x in jax.tree.leaves(state_8['opt_state'])
             if getattr(x, 'shape', None) == (2, 32, 96)]
  assert moments and all(m.addressable_shards[0].data.shape == (2, 8, 96) for m in moments)
  assert len(state_1['params']['blocks']['qkv']['kernel'].sharding.device_set) == 1


# --- checkpoints and resume -------------------------------------------------------------------

def test_resume_matches_an_uninterrupted_run_bit_for_bit(runs, tmp_path, capsys):
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(runs['half'], workdir)
  train.train(tiny_config(total_steps=2 * K), workdir)
  assert f'resumed from step {K}' in capsys.readouterr().out

  rows = metric_rows(workdir)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  np.testing.assert_array_equal(np.array([r['loss'] for r in rows]), runs['losses'])
  step_r, resumed = restore_latest(workdir, tiny_config())
  step_f, full = restore_latest(runs['full'], tiny_config())
  assert step_r == step_f == 2 * K
  assert_trees_equal(resumed['state'], full['state'])  # params, Adam state, step
  assert_trees_equal(resumed['ema'], full['ema'])
  assert resumed['data'] == full['data']  # the data iterator is where the full run's is
  # The EMA is its own tree, not a copy of the parameters.
  assert not np.array_equal(resumed['ema']['blocks']['qkv']['kernel'],
                            resumed['state']['params']['blocks']['qkv']['kernel'])


def test_resume_onto_a_different_mesh_shape(runs, tmp_path, capsys):
  workdir = str(tmp_path / 'remeshed')
  shutil.copytree(runs['half'], workdir)
  with open(os.path.join(workdir, 'ckpt', str(K), 'meta', 'metadata')) as f:
    assert json.load(f)['mesh']['shape'] == [1, 8, 1]
  config = tiny_config(total_steps=2 * K, **{'mesh.shape': (2, 4, 1)})
  train.train(config, workdir)
  out = capsys.readouterr().out
  assert f'resumed from step {K}' in out and "'data': 2, 'fsdp': 4" in out
  losses = np.array([r['loss'] for r in metric_rows(workdir)])
  np.testing.assert_allclose(losses, runs['losses'], rtol=1e-5)
  _, remeshed = restore_latest(workdir, config)
  assert remeshed['meta']['mesh']['shape'] == [2, 4, 1]


def test_incomplete_checkpoint_is_skipped(runs, tmp_path, capsys):
  workdir = str(tmp_path / 'broken')
  shutil.copytree(runs['full'], workdir)
  ckpt_dir = os.path.join(workdir, 'ckpt')
  # Step 4 lost its array data (a write cut short); a crashed async save left a temp dir.
  state_dir = os.path.join(ckpt_dir, '4', 'state')
  for name in os.listdir(state_dir):
    if name not in ('_METADATA', '_CHECKPOINT_METADATA'):
      path = os.path.join(state_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  os.remove(os.path.join(ckpt_dir, '4', 'meta', 'metadata'))
  os.makedirs(os.path.join(ckpt_dir, '6.orbax-checkpoint-tmp-1700000000', 'state'))

  train.train(tiny_config(total_steps=2 * K), workdir)
  assert 'resumed from step 2' in capsys.readouterr().out
  rows = metric_rows(workdir)  # steps 1-4 of the first run, then 3-4 again after the fallback
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 3, 4]
  np.testing.assert_array_equal([r['loss'] for r in rows[-2:]], runs['losses'][2:])
  assert train.steps_done(workdir) == [2, 4]
  assert len(glob.glob(os.path.join(ckpt_dir, '4.unreadable-*', 'state'))) == 1  # kept aside
  step, redone = restore_latest(workdir, tiny_config())
  _, full = restore_latest(runs['full'], tiny_config())
  assert step == 4
  assert_trees_equal(redone['state'], full['state'])
  assert_trees_equal(redone['ema'], full['ema'])


# --- divergence -------------------------------------------------------------------------------

class _PoisonedData:
  """Wraps the real TrainData; batches after the first `good` ones are all +inf."""

  def __init__(self, inner, good):
    self._inner, self._good, self._served = inner, good, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    self._served += 1
    if self._served > self._good:
      batch = dict(batch, image=np.full_like(batch['image'], np.inf))
    return batch

  def __getattr__(self, name):
    return getattr(self._inner, name)


@pytest.mark.parametrize('resume', [False, True],
                         ids=['fresh_run_caught_when_logged', 'resumed_run_caught_at_save'])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    runs, tmp_path, monkeypatch, resume):
  workdir = str(tmp_path / 'diverged')
  if resume:  # resumed at step 2, inf from step 3; not logged, so the save at step 4 refuses
    shutil.copytree(runs['half'], workdir)
    good, log_every = 0, 100
  else:  # inf from step 3, logged at once, while the async save of step 2 may still be writing
    good, log_every = 2, 1
  real = pipeline.make_train_data
  monkeypatch.setattr(pipeline, 'make_train_data',
                      lambda *a, **kw: _PoisonedData(real(*a, **kw), good=good))
  config = tiny_config(total_steps=6, ckpt_every_steps=2, log_every_steps=log_every)
  with pytest.raises(train.TrainingDiverged,
                     match=r'loss is (nan|inf) at step [34].*last good checkpoint') as err:
    train.train(config, workdir)
  assert os.path.join(workdir, 'ckpt') in str(err.value)
  assert f'at step {3 if log_every == 1 else 4}' in str(err.value)
  assert train.steps_done(workdir) == [2]  # step 2 is complete, nothing after it was written
  step, items = restore_latest(workdir, tiny_config())
  assert step == 2
  for leaf in jax.tree.leaves((items['state'], items['ema'])):
    assert np.all(np.isfinite(leaf))


# --- GroupDiff variants, logs ----------------------------------------------------------------

PROGRESS = re.compile(r'step (\d+)/(\d+) \| loss (\d+\.\d+) \| (\d+\.\d) img/s \| '
                      r'(\d+\.\d+) TFLOP/s/dev \| MFU (n/a|\d+\.\d%) \| '
                      r'ETA (\d+s|\d+m\d\ds|\d+h\d\dm)')


@pytest.mark.parametrize('cond,uncond', [(4, 4), (1, 1)], ids=['groupdiff_f', 'plain_sit'])
def test_variants_train_and_log(tmp_path, capsys, cond, uncond):
  workdir = str(tmp_path / 'run')
  config = tiny_config(total_steps=2, **{'group.cond_size': cond, 'group.uncond_size': uncond})
  final = train.train(config, workdir)
  out = capsys.readouterr().out
  assert (f'batch: 12 cond (groups of {cond}) + 4 uncond (groups of {uncond})') in out
  assert final['step'] == 2 and math.isfinite(final['loss'])
  assert train.steps_done(workdir) == [2]

  # Progress lines: step, loss, images/s, TFLOP/s per device, MFU, ETA.
  lines = [m for m in map(PROGRESS.search, out.splitlines()) if m]
  assert [(m[1], m[2]) for m in lines] == [('1', '2'), ('2', '2')]
  assert float(lines[-1][3]) == pytest.approx(final['loss'], abs=1e-4)
  # metrics.jsonl: one row per logged step with throughput and FLOP numbers.
  rows = metric_rows(workdir)
  assert [r['step'] for r in rows] == [1, 2]
  for row in rows:
    assert {'loss', 'grad_norm', 'param_norm', 'loss_uncond', 'images_per_sec',
            'tflops_per_device', 'eta_sec'} <= set(row)
    assert row['images_per_sec'] > 0 and row['tflops_per_device'] > 0
  assert rows[-1]['loss'] == final['loss']
  # TensorBoard event files with the scalars.
  events = glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents*'))
  assert events
  with open(events[0], 'rb') as f:
    content = f.read()
  assert b'loss' in content and b'images_per_sec' in content


def test_no_grid_and_no_error_when_the_grid_has_no_images(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train(tiny_config(total_steps=1, **{'sample.write_grid': True, 'sample.num_images': 0}),
              workdir)
  assert train.steps_done(workdir) == [1]
  assert not glob.glob(os.path.join(workdir, 'samples_step*.png'))


# --- one pass per step ------------------------------------------------------------------------

@pytest.mark.parametrize('overrides', [
    {'data.global_batch': 32, 'group.uncond_fraction': 0.25},             # singles + groups of 4
    {'data.global_batch': 48, 'group.cond_size': 2, 'model.max_group_size': 4},  # mixed shards
])
def test_one_pass_per_image_losses_equal_the_two_pass_computation(overrides):
  """The shard-ordered batch through the model once (8 batch shards, kinds picked by
  lax.switch) gives each image the loss that a conditional pass and an unconditional pass give
  it for the same image, noise, time, label and sample ids."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  config = tiny_config(**overrides)
  trainer = train_step.build(config, sharding.mesh_from_config(config))
  layout, order = trainer.layout, trainer.order
  assert trainer.batch_shards == 8 and not np.array_equal(order, np.arange(len(order)))
  params = jax.device_get(train_step.init_state(trainer, 0)['params'])
  params = jax.tree.map(lambda p: p + 0.05 * np.cos(np.arange(p.size).reshape(p.shape)), params)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((layout.global_batch, 8, 8, 4)).astype(np.float32)  # layout order
  labels = rng.integers(0, 10, layout.global_batch).astype(np.int32)
  batch = {'image': images[order], 'label': labels[order]}  # what the pipeline emits
  key = jax.random.PRNGKey(7)

  def one_pass(params, batch):
    with sharding.use_mesh(trainer.mesh, trainer.rules):
      return train_step.loss_fn(trainer, params, batch, key, 0.1)[1][0]
  got = np.empty(layout.global_batch, np.float32)
  got[order] = jax.jit(one_pass)(params, batch)

  # Two passes in layout order, on one device, with the same draws.
  k_inputs, k_cond, k_uncond = jax.random.split(key, 3)
  noised = trainer.objective.inputs(images, k_inputs, layout, 0.1)  # rows in layout order
  x_t, t = noised.x_t, noised.t
  model = nnx.merge(trainer.graphdef, params)
  ids = train_step.layout_sample_ids(model, layout, k_cond, k_uncond)
  nc = layout.num_cond
  cond = model(x_t[:nc], t[:nc], labels[:nc], group_size=layout.cond_group_size,
               sample_ids=ids[:nc])
  uncond = model(x_t[nc:], t[nc:], np.full_like(labels[nc:], 10),
                 group_size=layout.uncond_group_size, sample_ids=ids[nc:])
  want, _ = trainer.objective.per_image_loss(np.concatenate([cond, uncond]), noised.target)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
