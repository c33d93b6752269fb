"""The DiT configs (configs/dit_xl.py, dit_xl_table1.py rows, sample_dit_xl.py) build a DDPM
trainer as documented; dit_xl trains, writes its grid with the DDPM sampler, and the sampling job
samples its checkpoint; all on a tiny model override."""
import math
import os

import jax
import numpy as np
import pytest
from conftest import apply_overrides, load_config

from groupdiff_jax import cli, sharding, train, train_step
from groupdiff_jax.data import pipeline
from groupdiff_jax.sampling import job, shards

ROWS = ('baseline', 'uc2', 'uc4', 'uc8', 'uc16', 'random', 'class', 'spread100')
TINY = {'model.name': 'DiT-d2h32n2/2', 'model.input_size': 8, 'model.num_classes': 10,
        'model.dtype': 'float32', 'data.source': 'synthetic', 'data.global_batch': 64,
        'data.synthetic_size': 512, 'mesh.shape': (1, -1, 1)}


def tiny(name: str, arg: str | None = None):
  return apply_overrides(load_config(name, arg), TINY)


def test_dit_xl_is_the_released_groupdiff_dit_setting():
  c = load_config('dit_xl')
  assert (c.model.name, c.model.learn_sigma, c.transport.objective) == ('DiT-XL/2', True, 'ddpm')
  assert (c.group.cond_size, c.group.uncond_size, c.total_steps) == (1, 4, 800_000)
  s = c.sample
  assert (s.sampler, s.num_steps, s.cfg_scale, s.guidance_low, s.guidance_high,
          s.guided_channels, s.cond_group_size, s.uncond_group_size) == (
              'ddpm', 250, 1.65, 0.0, 1.0, 0, 1, 4)
  sample = load_config('sample_dit_xl').sample
  assert {k: sample[k] for k in s if k in sample and k != 'seed'} == {
      k: s[k] for k in s if k in sample and k != 'seed'}


@pytest.mark.parametrize('row', ROWS)
def test_table1_rows_build_ddpm_trainers(row):
  c = tiny('dit_xl_table1', row)
  trainer = train_step.build(c, sharding.mesh_from_config(c))
  size = {'baseline': 1, 'uc2': 2, 'uc8': 8, 'uc16': 16}.get(row, 4)
  assert trainer.objective.name == 'ddpm' and trainer.model_cfg.learn_sigma
  assert trainer.layout.uncond_group_size == size == c.sample.uncond_group_size
  assert trainer.model_cfg.max_group_size == (0 if row == 'baseline' else size)
  assert c.group.neighbors == {'random': 'random', 'class': 'class'}.get(row, 'greedy')
  assert c.group.t_spread == (0.1 if row == 'spread100' else 0.0)


def test_unknown_table1_row_is_refused():
  with pytest.raises(ValueError, match='unknown row; rows: baseline, uc2'):
    load_config('dit_xl_table1', 'uc3')


def one_step(c):
  trainer = train_step.build(c, sharding.mesh_from_config(c))
  state = train_step.init_state(trainer, c.seed)
  data = pipeline.make_train_data(c, trainer.layout)
  batch = {k: jax.make_array_from_process_local_data(trainer.batch_shardings[k], v)
           for k, v in next(data).items()}
  state, metrics = train_step.make_train_step(trainer, c)(state, batch)
  return trainer, state, jax.device_get(metrics)


def test_dit_xl_trains_and_its_checkpoint_samples_with_ddpm(tmp_path, monkeypatch):
  """configs/dit_xl.py (tiny, pixel space) trains 2 steps and writes its end-of-run grid with the
  DDPM sampler; the sampling job (configs/sample_dit_xl.py) then samples the checkpoint, whose
  meta says it is a DDPM model, and refuses a flow sampler for it."""
  monkeypatch.setattr(sharding, 'mesh_from_config',  # one device: the fastest compile
                      lambda c, devices=None: sharding.make_mesh(c.mesh.axes, c.mesh.shape,
                                                                 jax.devices()[:1]))
  c = apply_overrides(tiny('dit_xl'), {
      'model.in_channels': 1, 'total_steps': 2, 'ckpt_every_steps': 2, 'log_every_steps': 1,
      'mesh.shape': (1, 1, 1), 'sample.num_steps': 4, 'sample.num_images': 8,
      'sample.write_grid': True})
  workdir = str(tmp_path / 'run')
  final = train.train(c, workdir)
  assert math.isfinite(final['loss'])
  # The hybrid loss: eps-MSE ~ 1 for a fresh model, the VLB small and positive.
  assert final['loss'] == pytest.approx(final['loss_mse'] + final['loss_vb'], rel=1e-5)
  assert 0 < final['loss_vb'] < final['loss_mse']
  assert os.path.isfile(os.path.join(workdir, 'samples_step2.png'))

  s = apply_overrides(load_config('sample_dit_xl'), {
      'ckpt': workdir, 'num_samples': 20, 'shard_size': 4, 'batch_size': 4,
      'precision': 'float32', 'grid_images': 8, 'sample.num_steps': 4})
  result = job.run(s, str(tmp_path / 'samples'))
  assert result['sampled'] == result['num_shards'] > 0
  with np.load(str(tmp_path / 'samples' / shards.MERGED)) as merged:
    assert merged['arr_0'].shape == (20, 8, 8, 1)
  s.sample.sampler = 'sde'
  with pytest.raises(cli.UserError, match='samples flow_velocity models.*use ddpm'):
    job.run(s, str(tmp_path / 'samples_sde'))


@pytest.mark.slow
@pytest.mark.parametrize('row', ROWS)
def test_every_table1_row_trains_a_step(row):
  _, _, metrics = one_step(tiny('dit_xl_table1', row))
  assert math.isfinite(metrics['loss']) and metrics['loss_vb'] > 0


def test_a_flow_sampler_for_a_ddpm_run_is_refused():
  c = tiny('dit_xl')
  c.sample.sampler = 'sde'
  with pytest.raises(ValueError, match="sampler='sde' does not sample the ddpm objective"):
    train_step.build(c, sharding.mesh_from_config(c))
