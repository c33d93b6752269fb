"""Checkpoint conversion: parity with diffusers' DiT, exact round trips, and bad input.

The parity reference is diffusers' `DiTTransformer2DModel`, randomly initialised in a small
config and renamed to the official DiT state-dict names (tests/dit_reference.py, which lists the
two differences from the official DiT that it bridges).
"""
import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dit_reference import (CH, DEPTH, HEAD_DIM, HEADS, HIDDEN, PATCH, SIDE,
                           diffusers_to_official, float64_ddpm_scheduler, make_diffusers_dit,
                           run_diffusers)

from groupdiff_jax import convert, convert_io, convert_keys
from groupdiff_jax.convert_keys import ConversionError
from groupdiff_jax.diffusion import ddpm
from groupdiff_jax.models import sit

torch = pytest.importorskip('torch', reason='parity and .pt tests need torch (the test extra)')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_diffusers_time_features_with_shift_0_match_ours():
  diffusers = pytest.importorskip('diffusers', reason='parity tests need diffusers')
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0.0, 0.25, 1.0, 17.0, 999.0], np.float32)
  theirs = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                  downscale_freq_shift=0).numpy()
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(sit.timestep_features(jnp.asarray(t)))
  # torch's and XLA's float32 exp differ by 1 ulp on some frequencies; the argument t*f then
  # differs by ~t * 6e-8, so allow float32 rounding that grows with t (DiT feeds t up to 999).
  tol = 1e-6 + 1.2e-7 * t[:, None]
  assert diffusers is not None and np.all(np.abs(ours - theirs) <= tol)
  # With diffusers' own DiT setting (shift 1) the features are different: hence the patch above.
  shifted = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                   downscale_freq_shift=1).numpy()
  assert np.abs(ours - shifted).max() > 1e-2


def _save(path: str, payload: dict) -> None:
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in payload.items()}, path)
  else:
    torch.save(jax.tree.map(torch.from_numpy, payload,
                            is_leaf=lambda v: isinstance(v, np.ndarray)), path)


# (kind, learn_sigma, file name, how the file wraps the official state dict)
CASES = [
    ('dit', True, 'dit.pt', 'bare'),
    ('dit', False, 'dit.safetensors', 'bare'),
    ('sit', True, 'sit.pt', 'train'),
    ('repa', False, 'repa.pt', 'ema_only'),
    ('groupdiff', False, 'gdiff.pth', 'groupdiff'),
    ('groupdiff_dit', True, 'gdiff_dit.pth', 'groupdiff'),
]


@pytest.mark.parametrize('kind,learn_sigma,fname,wrap', CASES)
def test_parity_with_diffusers_dit(tmp_path, kind, learn_sigma, fname, wrap):
  ref = make_diffusers_dit(learn_sigma, seed=len(kind) + 7 * learn_sigma)
  sd = diffusers_to_official(ref)
  rng = np.random.default_rng(0)
  sd['pos_embed'] = sit.sincos_pos_embed(HIDDEN, SIDE // PATCH)[None]
  if kind == 'repa':  # REPA's projector heads must be dropped
    sd['projectors.0.0.weight'] = rng.standard_normal((64, HIDDEN)).astype(np.float32)
  if kind.startswith('groupdiff'):
    # GroupDiff adds s_emb[id] to the conditioning; with fixed ids (all 0 at group size 1) the
    # reference sees the same sum when s_emb[0] is folded into its label table.
    table = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    sd['sample_embedder.embedding_table.weight'] = table
    with torch.no_grad():
      for block in ref.transformer_blocks:
        block.norm1.emb.class_embedder.embedding_table.weight += torch.from_numpy(table[0])
  # Training-checkpoint layouts: params != ema, so the test also shows the EMA is what loads.
  noisy = {k: v if k == 'pos_embed' else v + 0.5 for k, v in sd.items()}
  payload = {
      'bare': sd,
      'train': {'model': noisy, 'ema': sd, 'opt': {'state': {}}, 'args': argparse.Namespace(a=1)},
      'ema_only': {'ema': sd, 'steps': 4_000_000},
      'groupdiff': {'model': {f'denoiser.{k}': v for k, v in noisy.items()},
                    'model_ema': {f'denoiser.{k}': v for k, v in sd.items()}, 'epoch': 3},
  }[wrap]
  src = str(tmp_path / fname)
  if fname.endswith('.safetensors'):
    _save(src, payload)
  else:
    torch.save(jax.tree.map(lambda v: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray)
                            else v, payload, is_leaf=lambda v: not isinstance(v, dict)), src)
  out = str(tmp_path / 'ckpt')
  # Without a sample table (or with a zero one) the converted model is exactly the file's.
  table_args = {'groupdiff': {}, 'groupdiff_dit': {},
                'repa': dict(sample_init='zeros')}.get(kind, dict(max_group_size=0))
  meta = convert.convert_file(src, kind, out, heads=HEADS, verbose=False, **table_args)
  assert meta['model']['learn_sigma'] == learn_sigma
  assert meta['model']['time_convention'] == convert.KINDS[kind].time_convention
  assert meta['time_convention'] == convert.KINDS[kind].meta_time
  assert meta['has_ema'] == (wrap in ('train', 'groupdiff'))
  model, _ = convert.load_converted(out, fixed_sample_ids=True)
  ddpm_time = convert.KINDS[kind].meta_time == 'ddpm_1000'  # integer t in [0, 999]
  for trial in range(3):
    x = rng.standard_normal((3, SIDE, SIDE, CH)).astype(np.float32)
    t = (rng.integers(0, 1000, 3) if ddpm_time else rng.uniform(0, 1, 3)).astype(np.float32)
    y = np.array([rng.integers(0, 1000), rng.integers(0, 1000), 1000])  # incl. the null class
    with jax.default_matmul_precision('highest'):
      ours = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    if kind == 'sit':  # noise_at_0: the model computes -v_SiT(x, 1 - t) on the velocity
      theirs = run_diffusers(ref, x, 1.0 - t, y)
      theirs[..., :CH] *= -1
    else:
      theirs = run_diffusers(ref, x, t, y)
    assert ours.shape == theirs.shape == (3, SIDE, SIDE, 2 * CH if learn_sigma else CH)
    print(f"{kind} trial {trial}: rel err {rel_err(ours, theirs):.2e}")
    assert rel_err(ours, theirs) <= 1e-5, (trial, rel_err(ours, theirs))


# --- exact round trips --------------------------------------------------------------------------

def _random_params(cfg: sit.SiTConfig, seed: int) -> dict:
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: sit.create(cfg)), nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.standard_normal(l.shape).astype(np.float32)
                                   for l in leaves])


@pytest.mark.parametrize('learn_sigma,groups', [(False, 4), (True, 0)])
def test_round_trip_is_exact(tmp_path, learn_sigma, groups):
  cfg = sit.SiTConfig(depth=3, hidden=48, heads=3, patch=4, input_size=16,
                      learn_sigma=learn_sigma, max_group_size=groups, dtype='float32')
  params = _random_params(cfg, seed=1)
  sd = convert.params_to_official(params, cfg)
  assert sd['x_embedder.proj.weight'].shape == (48, 4, 4, 4)
  assert sd['blocks.2.attn.qkv.weight'].shape == (144, 48)
  back = convert_keys.official_to_params(sd, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  # Through a .pt file and the full converter (inference of the size from shapes included).
  src = str(tmp_path / 'rt.pt')
  _save(src, sd)
  loaded = convert_io.read(src)
  conv = convert.convert_state_dict(loaded.params, 'repa', heads=3, max_group_size=groups)
  assert (conv.cfg.depth, conv.cfg.hidden, conv.cfg.patch, conv.cfg.input_size) == (3, 48, 4, 16)
  assert conv.cfg.learn_sigma == learn_sigma and conv.name == 'SiT-d3h48n3/4'
  assert all(np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(conv.params), jax.tree.leaves(params)))
  again = convert.params_to_official(conv.params, conv.cfg)
  assert set(again) == set(sd) and all(np.array_equal(again[k], sd[k]) for k in sd)


def test_published_sizes_are_inferred_and_sigma_can_be_dropped():
  cfg = sit.SiTConfig(depth=12, hidden=384, heads=6, patch=2, learn_sigma=True, max_group_size=0)
  sd = {k: np.zeros(s, np.float32) for k, s in convert_keys.expected_shapes(cfg).items()}
  info = convert_keys.infer(sd)
  assert (info.heads, info.input_size, info.num_classes, info.learn_sigma) == (6, 32, 1000, True)
  assert info.model_name('DiT') == 'DiT-S/2'
  conv = convert.convert_state_dict(sd, 'sit', drop_sigma=True, max_group_size=0)
  assert not conv.cfg.learn_sigma and conv.cfg.time_convention == 'noise_at_0'
  assert conv.params['final_layer']['linear']['kernel'].shape == (384, 16)


def test_drop_sigma_keeps_the_velocity_channels():
  rng = np.random.default_rng(0)
  sd = {'final_layer.linear.weight': rng.standard_normal((2 * 2 * 8, 5)),
        'final_layer.linear.bias': rng.standard_normal(2 * 2 * 8)}
  out = convert_keys.drop_sigma(sd, in_channels=4, patch=2)
  w = sd['final_layer.linear.weight'].reshape(2, 2, 8, 5)
  assert np.array_equal(out['final_layer.linear.weight'], w[:, :, :4].reshape(16, 5))

def test_sit_conversion_keeps_the_original_function_and_load_converted_takes_overrides(tmp_path):
  """--kind=sit adds a 4-row sample table: zero by default, so the converted model is exactly
  the file's SiT whatever ids it draws; load_converted accepts overrides of recorded fields."""
  src = str(tmp_path / 'sit.pt')
  _save(src, {k: v if k == 'pos_embed' else 0.3 * v for k, v in _official().items()})
  plain, tabled = str(tmp_path / 'plain'), str(tmp_path / 'tabled')
  convert.convert_file(src, 'sit', plain, heads=HEADS, max_group_size=0, verbose=False)
  meta = convert.convert_file(src, 'sit', tabled, heads=HEADS, verbose=False)
  assert meta['model']['max_group_size'] == 4
  assert any('--sample_init=zeros: the model computes exactly' in n for n in meta['notes'])
  ref, _ = convert.load_converted(plain)
  model, _ = convert.load_converted(tabled)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, SIDE, SIDE, CH)).astype(np.float32))
  t, y = jnp.asarray([0.1, 0.4, 0.7, 0.9]), jnp.asarray([1, 2, 3, 1000])
  np.testing.assert_array_equal(np.asarray(model(x, t, y, rng=jax.random.key(1))),
                                np.asarray(ref(x, t, y)))
  # Overrides of recorded fields (this used to raise 'got multiple values for keyword argument').
  flipped, _ = convert.load_converted(tabled, time_convention='noise_at_1', attention='xla')
  assert flipped.cfg.time_convention == 'noise_at_1' and model.cfg.time_convention == 'noise_at_0'
  assert flipped.cfg.attention == 'xla'
  assert not np.allclose(np.asarray(flipped(x, t, y, rng=jax.random.key(1))),
                         np.asarray(ref(x, t, y)))


# --- bad input ------------------------------------------------------------------------------

def _official(learn_sigma=False) -> dict[str, np.ndarray]:
  cfg = sit.SiTConfig(depth=DEPTH, hidden=HIDDEN, heads=HEADS, patch=PATCH, input_size=SIDE,
                      learn_sigma=learn_sigma, max_group_size=0)
  return convert.params_to_official(_random_params(cfg, seed=3), cfg)


def _expect_failure(tmp_path, sd, *, match: list[str], kind='dit', fname='bad.pt'):
  src, out = str(tmp_path / fname), str(tmp_path / 'out')
  _save(src, sd)
  with pytest.raises(ConversionError) as err:
    convert.convert_file(src, kind, out, heads=HEADS, verbose=False)
  for text in match:
    assert text in str(err.value), str(err.value)
  assert not os.path.exists(out)
  assert not any(p.name.startswith('out.tmp') for p in tmp_path.iterdir())


def test_missing_key(tmp_path):
  sd = _official()
  del sd['blocks.1.mlp.fc2.bias']
  _expect_failure(tmp_path, sd, match=['missing keys', 'blocks.1.mlp.fc2.bias', f'({HIDDEN},)'])


def test_unexpected_key(tmp_path):
  sd = _official()
  sd['blocks.0.attn.q_norm.weight'] = np.ones(HEAD_DIM, np.float32)
  _expect_failure(tmp_path, sd, match=['unexpected keys', 'blocks.0.attn.q_norm.weight', '(16,)'])


def test_bad_shapes(tmp_path):
  sd = _official()
  sd['blocks.1.mlp.fc1.weight'] = np.zeros((100, HIDDEN), np.float32)
  sd['final_layer.linear.bias'] = np.zeros(7, np.float32)
  _expect_failure(tmp_path, sd, match=['wrong shapes', 'blocks.1.mlp.fc1.weight (100, 32)',
                                       '(expected (128, 32))', 'final_layer.linear.bias'])


def test_shapes_that_fit_no_size(tmp_path):
  sd = _official()
  sd['final_layer.linear.weight'] = np.zeros((4 * 5, HIDDEN), np.float32)  # 5 output channels
  _expect_failure(tmp_path, sd, match=['fits no model', '5 output channels'])
  src = str(tmp_path / 'nosize.pt')
  _save(src, _official())
  with pytest.raises(ConversionError, match='no published size.*--heads'):
    convert.convert_file(src, 'dit', str(tmp_path / 'o2'), verbose=False)  # no --heads
  assert not os.path.exists(tmp_path / 'o2')


def test_foreign_files(tmp_path):
  (tmp_path / 'notes.pt').write_text('not a checkpoint')
  with pytest.raises(ConversionError, match='cannot read as a PyTorch checkpoint'):
    convert.convert_file(str(tmp_path / 'notes.pt'), 'sit', str(tmp_path / 'o'), verbose=False)
  _save(str(tmp_path / 'other.safetensors'), {'encoder.conv_in.weight': np.zeros((2, 2))})
  with pytest.raises(ConversionError, match='x_embedder.proj.weight'):
    convert.convert_file(str(tmp_path / 'other.safetensors'), 'sit', str(tmp_path / 'o'),
                         verbose=False)
  assert not os.path.exists(tmp_path / 'o')


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'groupdiff_jax.convert', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('fname', ['trunc.pt', 'trunc.safetensors'])
def test_cli_truncated_file_exits_nonzero_and_writes_nothing(tmp_path, fname):
  src, out = str(tmp_path / fname), str(tmp_path / 'out')
  _save(src, _official())
  data = open(src, 'rb').read()
  with open(src, 'wb') as f:
    f.write(data[: len(data) // 2])
  proc = _cli(f'--src={src}', '--kind=dit', f'--out={out}', f'--heads={HEADS}')
  assert proc.returncode != 0
  assert 'cannot read' in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(out)


def test_cli_converts_and_reports_flags(tmp_path):
  src, out = str(tmp_path / 'ok.pt'), str(tmp_path / 'out')
  sd = _official(learn_sigma=True)
  _save(src, sd)
  proc = _cli(f'--src={src}', '--kind=dit', f'--out={out}', f'--heads={HEADS}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--config.model.name=DiT-d2h32n2/2' in proc.stdout
  assert 'transport.objective=ddpm' in proc.stdout  # the DDPM note
  # stderr carries no Orbax INFO lines (they buried the converter's own notes)
  assert not re.search(r'^(I\d{4} |INFO:)', proc.stderr, re.M), proc.stderr[-2000:]
  model, meta = convert.load_converted(out)
  assert meta['kind'] == 'dit' and meta['time_convention'] == 'ddpm_1000'
  assert not meta['has_ema'] and model.cfg.learn_sigma and model.cfg.max_group_size == 4
  # A second run onto the same --out refuses and leaves the first checkpoint alone.
  again = _cli(f'--src={src}', '--kind=dit', f'--out={out}', f'--heads={HEADS}')
  assert again.returncode != 0 and 'not empty' in again.stderr


# --- the DDPM that converted DiT checkpoints fine-tune and sample with ------------------------

def test_ddpm_step_matches_diffusers_scheduler():
  sched = float64_ddpm_scheduler('learned_range')
  diffusion = ddpm.DDPM.create()
  rng = np.random.default_rng(0)
  for t in (999, 500, 37, 1):
    x = rng.standard_normal((2, 4, 4, CH)).astype(np.float32)
    out = np.concatenate([rng.standard_normal((2, 4, 4, CH)),
                          rng.uniform(-1, 1, (2, 4, 4, CH))], -1).astype(np.float32)
    noise = torch.randn((2, CH, 4, 4), generator=torch.Generator().manual_seed(t),
                        dtype=torch.float64)
    theirs = sched.step(_nchw_t(out).double(), t, _nchw_t(x).double(),
                        generator=torch.Generator().manual_seed(t)).prev_sample
    ours = diffusion.p_sample(jnp.asarray(out), jnp.asarray(x), jnp.full((2,), t),
                         jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)))
    assert rel_err(ours, theirs.numpy().transpose(0, 2, 3, 1)) <= 1e-5, t


def _nchw_t(a):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_ddpm_respacing_and_loss():
  base, spaced = ddpm.DDPM.create(), ddpm.DDPM.create(respacing='250')
  assert spaced.num_steps == 250 and spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
  np.testing.assert_allclose(np.cumprod(1 - spaced.betas),
                             np.cumprod(1 - base.betas)[spaced.timestep_map], rtol=1e-12)
  # A model that predicts the true eps and the true posterior variance (v = -1) has zero loss
  # for t >= 1 (the KL of identical Gaussians); t = 0 scores the decoder NLL instead.
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, CH)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal((4, 4, 4, CH)), jnp.float32)
  t = jnp.array([999, 400, 1, 0])
  x_t = base.q_sample(x0, t, noise)
  out = jnp.concatenate([noise, -jnp.ones_like(noise)], -1)
  terms = base.training_losses(out, x0, x_t, t, noise)
  assert float(jnp.abs(terms['mse']).max()) == 0.0
  np.testing.assert_allclose(np.asarray(terms['vb'][:3]), 0.0, atol=1e-4)
  assert float(terms['vb'][3]) > 0
  grads = jax.grad(lambda o: base.training_losses(o, x0, x_t, t, noise)['vb'].sum())(out)
  assert float(jnp.abs(grads[..., :CH]).max()) == 0.0  # the VLB trains only the variance


def test_converted_dit_samples_with_ddpm(tmp_path):
  src, out = str(tmp_path / 'dit.pt'), str(tmp_path / 'ckpt')
  _save(src, {k: v if k == 'pos_embed' else v * 0.05  # tame the random outputs
              for k, v in _official(learn_sigma=True).items()})
  convert.convert_file(src, 'dit', out, heads=HEADS, max_group_size=0, verbose=False)
  model, meta = convert.load_converted(out)
  assert meta['objective'] == 'ddpm_eps_learned_variance'
  sampler = ddpm.DDPM.create(respacing='4')
  y = jnp.array([1, 2])
  noise = jax.random.normal(jax.random.key(0), (2, SIDE, SIDE, CH))

  def model_fn(x, t):
    cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, 1000))
    return ddpm.guided_output(cond, uncond, 1.5, CH)

  x0 = jax.jit(lambda n, k: sampler.sample(model_fn, n, k))(noise, jax.random.key(1))
  assert x0.shape == (2, SIDE, SIDE, CH) and bool(jnp.isfinite(x0).all())
  assert list(sampler.timestep_map) == [0, 333, 666, 999]


# --- a converted checkpoint fine-tunes with the trainer ---------------------------------------

def test_converted_checkpoint_fine_tunes_with_main(tmp_path):
  """The documented path: convert an original-SiT file, then `groupdiff_jax.main` with
  --config.init_from and exactly the --config.model.* flags the converter printed."""
  # A SiT (noise at t=0) shaped for configs/demo.py's data: 16x16x1 digits, 10 classes.
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=4, input_size=16, in_channels=1,
                      num_classes=10, learn_sigma=False, max_group_size=0)
  params = jax.tree.map(lambda a: a * 0.3, _random_params(cfg, seed=5))
  src, out, workdir = str(tmp_path / 'sit.pt'), str(tmp_path / 'ckpt'), str(tmp_path / 'run')
  _save(src, convert.params_to_official(params, cfg))
  proc = _cli(f'--src={src}', '--kind=sit', f'--out={out}', '--heads=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('fine-tune with: '))
  model_flags = line[len('fine-tune with: '):].split()
  assert f'--config.init_from={out}' in model_flags
  assert '--config.model.time_convention=noise_at_0' in model_flags
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # Without the time-convention flag the shapes still fit: the trainer must refuse, not train the
  # wrong function.
  wrong = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/demo.py',
       f'--workdir={workdir}_wrong', *[f for f in model_flags if 'time_convention' not in f],
       '--config.total_steps=1'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert wrong.returncode == 2, wrong.stderr[-2000:]
  assert "time_convention='noise_at_0'" in wrong.stderr and not os.path.exists(
      os.path.join(f'{workdir}_wrong', 'ckpt', '1'))
  train = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/demo.py',
       f'--workdir={workdir}', *model_flags, '--config.total_steps=3',
       '--config.log_every_steps=1', '--config.ckpt_every_steps=3', '--config.data.global_batch=32',
       '--config.sample.write_grid=False', '--config.eval.every_steps=0'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, (train.stdout[-2000:], train.stderr[-4000:])
  assert f'fine-tuning from {out}' in train.stdout
  losses = [json.loads(l)['loss'] for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert len(losses) == 3 and all(np.isfinite(losses))
  # The run started from the converted weights: after 3 small steps it is still next to them.
  converted, _ = convert.load_converted(out)
  trained, meta = convert.load_converted(workdir, prefer_ema=False)
  assert meta['model']['time_convention'] == 'noise_at_0' and meta['step'] == 3
  from flax import nnx
  a, b = (jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (converted, trained))
  drift = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))
  assert 0 < drift < 0.02, drift
