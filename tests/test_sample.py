"""The offline sampling job: batch/device independence, group schedule, shards, resume, merge,
the DDPM and VAE paths, and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, apply_overrides, load_config, tiny_config
from groupdiff_jax import checkpoint, cli, image_grid, sharding, train
from groupdiff_jax.models import sit, vae, vae_weights
from groupdiff_jax.sampling import job, shards, weights
from groupdiff_jax.sampling.plan import Plan


# --- fixtures: a tiny trained pixel model, a random latent model and a random VAE ---------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  """A trainer workdir: 2 steps of a 1-channel 8x8 SiT (pixel space, no VAE)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config(**{'model.in_channels': 1, 'total_steps': 2, 'ckpt_every_steps': 1,
                          'keep_ckpts': 3, 'mesh.shape': (1, 1, 1)})
  # One device: compiles the train step fastest; the sampler is tested on any mesh below.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sharding, 'mesh_from_config',
               lambda c, devices=None: sharding.make_mesh(c.mesh.axes, c.mesh.shape,
                                                          jax.devices()[:1]))
    train.train(config, workdir)
  return workdir


def _save_converted(path: str, cfg: sit.SiTConfig, name: str, *, objective: str, ema: bool,
                    seed: int = 0) -> str:
  """A weights-only checkpoint as groupdiff_jax.convert writes it (random weights, scaled up so
  that the zero-initialised output layers do not make every sample the same)."""
  @jax.jit
  def make():
    params = nnx.to_pure_dict(nnx.state(sit.create(cfg, seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys)])
  params = make()
  meta = {'model': dict(name=name, input_size=cfg.input_size, in_channels=cfg.in_channels,
                        num_classes=cfg.num_classes, learn_sigma=cfg.learn_sigma,
                        max_group_size=cfg.max_group_size, time_convention=cfg.time_convention),
          'objective': objective, 'has_ema': ema}
  ckpt = checkpoint.Checkpointer(path, max_to_keep=1, async_save=False)
  ckpt.save_weights(0, params=params, ema=params if ema else None, meta=meta)
  ckpt.close()
  return path


LATENT = dict(depth=2, hidden=32, heads=2, patch=2, input_size=8, in_channels=4, num_classes=10,
              max_group_size=4, dtype='float32')


@pytest.fixture(scope='module')
def latent_ckpt(tmp_path_factory) -> str:
  return _save_converted(str(tmp_path_factory.mktemp('latent') / 'ckpt'),
                         sit.SiTConfig(**LATENT), 'SiT-d2h32n2/2', objective='flow_velocity',
                         ema=True)


@pytest.fixture(scope='module')
def random_vae(tmp_path_factory) -> str:
  """A tiny random SD-VAE in diffusers format (2 blocks: 8x8x4 latents -> 16x16x3 images)."""
  cfg = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  params = nnx.to_pure_dict(nnx.state(vae.create(cfg, seed=3)))
  path = tmp_path_factory.mktemp('vae')
  from safetensors.numpy import save_file
  save_file(vae_weights.params_to_diffusers(params), str(path / vae_weights.WEIGHTS_FILE))
  (path / 'config.json').write_text(json.dumps(dict(
      in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
      norm_num_groups=8, latent_channels=4, down_block_types=['DownEncoderBlock2D'] * 2,
      up_block_types=['UpDecoderBlock2D'] * 2, scaling_factor=vae.SCALE)))
  return str(path)


def sample_config(ckpt: str, **overrides):
  """configs/sample_sit_xl.py made tiny: 40 images (4 per class), 4 SDE steps, float32."""
  c = load_config('sample_sit_xl')
  return apply_overrides(c, {'ckpt': ckpt, 'num_samples': 40, 'shard_size': 8, 'batch_size': 8,
                             'precision': 'float32', 'grid_images': 16, 'sample.num_steps': 4,
                             'sample.cfg_scale': 2.0, 'sample.guidance_low': 0.0,
                             'sample.guidance_high': 1.0, 'sample.guided_channels': 0,
                             **overrides})


def sampler_on(devices, config) -> tuple:
  """(sample_fn, params, plan) for `config` on a mesh of `devices`."""
  source = weights.locate(config.ckpt, config.step)
  cfg = weights.model_config(source, dtype=config.precision, attention='xla')
  plan = Plan(config.num_samples, cfg.num_classes, job.eval_group_size(config.sample),
              config.shard_size, config.sample.seed, config.round_groups)
  mesh = sharding.make_mesh(config.mesh.axes, (len(devices), 1, 1), devices)
  graphdef, params = weights.restore(source, cfg, mesh, config.mesh.rules, use_ema=True)
  return job.make_sample_fn(graphdef, cfg, config, plan, mesh, config.mesh.rules), params, mesh


def _in_batches(fn, params, ids, batch):
  return np.concatenate([np.asarray(fn(params, ids[i:i + batch]))
                         for i in range(0, len(ids), batch)])


# --- what is sampled ------------------------------------------------------------------------

def _same_uint8(a: np.ndarray, b: np.ndarray) -> None:
  """uint8 images from float32 values that agree within 1e-5: equal, but for the rare value that
  sits on a rounding boundary (one level apart, in under 0.1% of the pixels)."""
  diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
  assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))


def test_one_device_and_eight_devices_give_the_same_images(trained, latent_ckpt, random_vae):
  """Noise, labels and all later draws of image i are functions of (seed, i): another device
  count and batch size give the same images (float32 within 1e-5, so uint8 equal after decode
  up to a rounding flip)."""
  ids = np.arange(16)
  config = sample_config(trained)
  fn1, p1, _ = sampler_on(jax.devices()[:1], config)
  fn8, p8, _ = sampler_on(jax.devices(), config)
  a = _in_batches(fn1, p1, ids, 4)        # 1 device, batches of one group
  b = _in_batches(fn8, p8, ids, 16)       # 8 devices, one batch
  assert a.shape == (16, 8, 8, 1) and np.abs(a - b).max() <= 1e-5
  assert np.std(a) > 0.1 and not np.allclose(a[0], a[4])  # real, distinct samples
  _same_uint8(image_grid.to_uint8(a), image_grid.to_uint8(b))

  # The latent path through the SD-VAE decode, with the Euler ODE.
  config = sample_config(latent_ckpt, **{'sample.sampler': 'euler', 'vae': random_vae})
  fn1, p1, mesh1 = sampler_on(jax.devices()[:1], config)
  fn8, p8, mesh8 = sampler_on(jax.devices(), config)
  lat1, lat8 = _in_batches(fn1, p1, ids, 8), _in_batches(fn8, p8, ids, 16)
  assert np.abs(lat1 - lat8).max() <= 1e-5
  img1 = job.make_decoder(random_vae, mesh1)(lat1)
  img8 = job.make_decoder(random_vae, mesh8)(lat8)
  assert img1.shape == (16, 16, 16, 3) and img1.dtype == np.uint8
  _same_uint8(img1, img8)
  expected = vae.load(random_vae).decode(lat1)  # the decode is x / 0.18215 through the decoder
  np.testing.assert_array_equal(img1, image_grid.to_uint8(expected))


def test_ddpm_of_a_dit_checkpoint_is_device_independent(tmp_path):
  """The registry's DDPM sampler (DiT checkpoints: eps + learned variance, integer t), with CFG on
  an interval and grouped unconditional passes, gives the same images on 1 and 8 devices."""
  dit = dict(LATENT, learn_sigma=True, in_channels=1)
  ckpt = _save_converted(str(tmp_path / 'dit'), sit.SiTConfig(**dit), 'DiT-d2h32n2/2',
                         objective='ddpm_eps_learned_variance', ema=True)
  config = sample_config(ckpt, **{'sample.sampler': 'ddpm', 'sample.guidance_low': 0.3,
                                  'sample.guidance_high': 0.8})
  ids = np.arange(8)
  fn1, p1, _ = sampler_on(jax.devices()[:1], config)
  fn8, p8, _ = sampler_on(jax.devices(), config)
  a, b = _in_batches(fn1, p1, ids, 4), _in_batches(fn8, p8, ids, 8)
  assert a.shape == (8, 8, 8, 1) and np.isfinite(a).all() and np.std(a) > 0.1
  # Random variance channels make |x_0| reach ~1e2 here: float32 agreement is relative.
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(cli.UserError, match='samples flow_velocity models.*use ddpm'):
    job.run(sample_config(ckpt), str(tmp_path / 'out'))


def test_per_image_keys_make_the_flow_samplers_batch_independent():
  """diffusion/samplers.py with one typed key per image: an image's trajectory (noise of every
  SDE step, the keys the model sees) does not depend on the other images of its batch."""
  from groupdiff_jax.diffusion import samplers

  def velocity(x, t, y, group_size, keys):  # uses its per-image keys like the model's ids do
    draw = jax.vmap(lambda k: jax.random.uniform(k))(keys)
    return 0.3 * x + draw[:, None, None, None] + y[:, None, None, None] * 0.01

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(8))
  noise = jax.random.normal(jax.random.key(1), (8, 2, 2, 1))
  labels = jnp.arange(8) % 3
  for name in ('sde', 'euler', 'heun'):
    run = lambda n, y, k: samplers.sample_loop(velocity, n, y, k, sampler=name, num_steps=5,  # noqa: E731
                                               cfg_scale=2.0, uncond_group_size=1)
    whole = run(noise, labels, keys)
    halves = jnp.concatenate([run(noise[:4], labels[:4], keys[:4]),
                              run(noise[4:], labels[4:], keys[4:])])
    np.testing.assert_allclose(np.asarray(whole), np.asarray(halves), atol=1e-6)
    assert np.abs(np.asarray(whole[0] - whole[1])).max() > 1e-3


def test_plan_is_class_balanced_and_rounds_groups_like_the_official_eval():
  plan = Plan(50_000, 1000, 4, 1024, seed=0)
  assert plan.per_class == 50 and plan.num_generated == 52_000
  ids = np.arange(plan.num_generated)
  kept = plan.kept(ids)
  assert kept.sum() == 50_000
  assert np.all(np.bincount(plan.labels(ids)[kept], minlength=1000) == 50)
  labels = plan.labels(ids)  # each group of 4 shares one class; classes cycle
  assert np.all(labels.reshape(-1, 4) == labels[::4, None]) and list(labels[:8:4]) == [0, 1]
  assert plan.kept(np.arange(48_000, 48_008)).tolist() == [True] * 2 + [False] * 2 + [True] * 2 + [False] * 2
  with pytest.raises(cli.UserError, match='do not divide the 50 images per class'):
    Plan(50_000, 1000, 4, 1024, seed=0, round_groups=False)


# --- inference group schedule ---------------------------------------------------------------

def test_group_window_and_block_schedule(latent_ckpt):
  ids = np.arange(16)
  base = sample_config(latent_ckpt)

  def run(**overrides):
    config = apply_overrides(base.copy_and_resolve_references(), overrides)
    source = weights.locate(config.ckpt)
    cfg = weights.model_config(source, dtype='float32', attention='xla')
    plan = Plan(40, 10, 4, 8, 0)  # the same labels and keys in every variant
    mesh = sharding.make_mesh(config.mesh.axes, (1, 1, 1), jax.devices()[:1])
    graphdef, params = weights.restore(source, cfg, mesh, config.mesh.rules, use_ema=True)
    return np.asarray(job.make_sample_fn(graphdef, cfg, config, plan, mesh,
                                         config.mesh.rules)(params, ids))

  no_groups = run(**{'sample.cond_group_size': 1, 'sample.uncond_group_size': 1})
  groups = run()
  assert np.abs(groups - no_groups).max() > 1e-4  # group attention changes the samples
  np.testing.assert_array_equal(run(**{'sample.group_t_range': (0.0, 0.0)}), no_groups)
  partial = run(**{'sample.group_t_range': (0.3, 0.8)})
  assert np.abs(partial - groups).max() > 1e-5 and np.abs(partial - no_groups).max() > 1e-5
  # Blocks: only the attention changes (the group's sample-embedding ids stay), so k = 0 is
  # neither variant above, and k = depth is the full group model.
  first_block = run(**{'sample.group_blocks': 1})
  assert np.abs(first_block - groups).max() > 1e-5
  np.testing.assert_allclose(run(**{'sample.group_blocks': 2}), groups, atol=1e-6)  # depth 2


# --- the job: shards, manifest, merge, resume -------------------------------------------------

def test_job_writes_shards_manifest_and_merged_npz(trained, tmp_path):
  out = str(tmp_path / 'out')
  result = job.run(sample_config(trained), out)
  assert result == {'done': 0, 'sampled': 5, 'num_shards': 5}
  manifest = json.load(open(os.path.join(out, shards.MANIFEST)))
  assert manifest['run']['step'] == 2 and manifest['run']['seed'] == 0
  assert manifest['run']['sample']['sampler'] == 'sde'
  assert [(s['start'], s['end']) for s in manifest['shards']] == [(i, i + 8) for i in range(0, 40, 8)]
  merged = np.load(os.path.join(out, shards.MERGED))
  assert merged['arr_0'].shape == (40, 8, 8, 1) and merged['arr_0'].dtype == np.uint8
  assert np.all(np.bincount(merged['arr_1'], minlength=10) == 4)
  assert os.path.isfile(os.path.join(out, shards.GRID))
  # Rerunning is a no-op that leaves every file as it was.
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if 'shard' in n}
  assert job.run(sample_config(trained), out)['sampled'] == 0
  assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in before}
  # A lost shard is redone alone, bit for bit.
  lost = os.path.join(out, shards.shard_name(2, 16, 24))
  with np.load(lost) as z:
    lost_images = z['images']
  os.remove(lost)
  assert job.run(sample_config(trained), out)['sampled'] == 1
  with np.load(lost) as z:
    np.testing.assert_array_equal(z['images'], lost_images)
  # --step picks an older checkpoint: another run, refused in this directory.
  with pytest.raises(cli.UserError, match='another sampling run .*step'):
    job.run(sample_config(trained, step=1), out)


def _cli(*args, **kw) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return subprocess.Popen([sys.executable, '-m', 'groupdiff_jax.sample', *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _flags(ckpt: str, out: str) -> list[str]:
  return ['--config=configs/sample_sit_xl.py', f'--config.ckpt={ckpt}', f'--workdir={out}',
          '--config.num_samples=80', '--config.shard_size=4', '--config.batch_size=4',
          '--config.precision=float32', '--config.sample.num_steps=60']


@pytest.mark.slow  # ~90 s: two sampling processes; the fast resume check is in the test above
def test_killed_job_resumes_without_duplicates_or_gaps(trained, tmp_path):
  """kill -9 mid-run, the same command again: the result equals an uninterrupted run bit for bit."""
  whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
  ref = _cli(*_flags(trained, whole))
  proc = _cli(*_flags(trained, killed))
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(n.startswith('shard_') and n.endswith('.npz') for n in os.listdir(killed)
           if os.path.isdir(killed)) if os.path.isdir(killed) else False:
      break
    time.sleep(0.2)
  assert proc.poll() is None, 'the job finished before it could be killed'
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  written = [n for n in os.listdir(killed) if n.startswith('shard_')]
  assert 0 < len([n for n in written if n.endswith('.npz')]) < 20
  resumed = _cli(*_flags(trained, killed))
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert 'already written' in out and 'wrote' in out
  ref_out, ref_err = ref.communicate(timeout=600)
  assert ref.returncode == 0, ref_err[-3000:]
  a, b = np.load(os.path.join(whole, 'samples.npz')), np.load(os.path.join(killed, 'samples.npz'))
  np.testing.assert_array_equal(a['arr_0'], b['arr_0'])
  np.testing.assert_array_equal(a['arr_1'], b['arr_1'])
  # `merge OUT` rewrites samples.npz from the shards.
  os.remove(os.path.join(killed, 'samples.npz'))
  merge = _cli('merge', killed)
  _, err = merge.communicate(timeout=300)
  assert merge.returncode == 0, err[-2000:]
  np.testing.assert_array_equal(np.load(os.path.join(killed, 'samples.npz'))['arr_0'], a['arr_0'])


# --- bad input: one line, nothing written, finished shards untouched ----------------------------

def test_bad_input_fails_before_anything_is_written(trained, latent_ckpt, tmp_path):
  no_ema = _save_converted(str(tmp_path / 'no_ema'), sit.SiTConfig(**LATENT), 'SiT-d2h32n2/2',
                           objective='flow_velocity', ema=False)
  os.makedirs(tmp_path / 'empty')
  cases = [
      (dict(ckpt=str(tmp_path / 'empty')), 'holds no checkpoint'),
      (dict(ckpt=str(tmp_path / 'missing')), 'no such directory'),
      (dict(step=7), 'step=7: .* has no such step; steps present: 1, 2'),
      (dict(ckpt=no_ema), 'has no EMA parameters .*--config.use_ema=False'),
      ({'sample.guidance_high': 1.5}, r'guidance interval \[0.0, 1.5\] must lie in \[0, 1\]'),
      ({'sample.guidance_low': -0.25}, 'guidance interval'),
      ({'sample.group_t_range': (0.5, 1.2)}, 'group_t_range'),
      (dict(round_groups=False, num_samples=50), 'groups of 4 do not divide the 5 images per class'),
      ({'sample.cond_group_size': 3}, 'cond_group_size=3 does not divide the eval group of 4'),
      (dict(num_samples=45), 'multiple of the checkpoint\'s 10 classes'),
      ({'sample.sampler': 'ddpm'}, 'samples ddpm_eps_learned_variance models.*use sde or euler'),
      (dict(ckpt=latent_ckpt), '4-channel latents need a decoder: pass --config.vae'),
  ]
  for overrides, message in cases:
    out = str(tmp_path / 'out')
    with pytest.raises(cli.UserError, match=message):
      job.run(sample_config(overrides.pop('ckpt', trained), **overrides), out)
    assert not os.path.exists(out), overrides
  # The flag the EMA error offers: the raw weights, restored without any optimizer state.
  source = weights.locate(no_ema)
  cfg = weights.model_config(source, dtype='float32', attention='xla')
  mesh = sharding.make_mesh(('data', 'fsdp', 'context'), (1, 1, 1), jax.devices()[:1])
  _, params = weights.restore(source, cfg, mesh, load_config('common').mesh.rules, use_ema=False)
  assert params['x_embedder']['kernel'].shape == (2 * 2 * 4, 32)


def test_cli_refuses_another_runs_directory_in_one_line_and_touches_nothing(trained, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / shards.MANIFEST).write_text(json.dumps({'run': {'seed': 99}, 'shards': []}))
  shard = out / shards.shard_name(0, 0, 8)
  shard.write_bytes(b'finished shard of another run')
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  proc = _cli(*_flags(trained, str(out)))
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-2000:]
  lines = err.strip().splitlines()
  assert lines[-1].startswith('groupdiff_jax: error: ') and 'another sampling run' in lines[-1]
  assert 'Traceback' not in err
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
