"""S_cross: the score on constructed attention masses, the model's attention-mass option (same
model code, default output unchanged), and `python -m groupdiff_jax.diagnose` end to end."""
import csv
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from groupdiff_jax import checkpoint, diagnose
from groupdiff_jax.cli import UserError
from groupdiff_jax.evaluation import s_cross
from groupdiff_jax.models import attention, sit


# --- the score ---------------------------------------------------------------------------------

def test_uniform_cross_mass_is_zero():
  m = 4
  mass = np.full((m, m), 0.1)
  np.fill_diagonal(mass, 0.7)  # self-attention does not count
  np.testing.assert_allclose(s_cross.per_image(mass), 0.0, atol=1e-15)


@pytest.mark.parametrize('m', [3, 4, 8, 16])
def test_one_member_taking_all_cross_mass(m):
  # Image i gives all its cross mass to image (i + 1) % m: max = c, mean = c / (m - 1), so
  # S = 1 - 1 / (m - 1) = (m - 2) / (m - 1) (2/3 for m = 4, -> 1 as m grows), whatever c is.
  mass = np.zeros((m, m))
  for i in range(m):
    mass[i, i] = 0.6
    mass[i, (i + 1) % m] = 0.4
  np.testing.assert_allclose(s_cross.per_image(mass), (m - 2) / (m - 1), rtol=1e-12)
  # The largest value the score can take for that group size.
  rng = np.random.default_rng(m)
  assert s_cross.per_image(rng.dirichlet(np.ones(m), size=(50, m))).max() <= (m - 2) / (m - 1)


def test_group_of_two_is_zero():
  rng = np.random.default_rng(0)
  mass = rng.dirichlet(np.ones(2), size=(7, 2))  # any attention at all
  np.testing.assert_array_equal(s_cross.per_image(mass), 0.0)


def test_score_averages_images_and_groups():
  uniform = np.full((4, 4), 0.25)
  peaked = np.eye(4)[[1, 2, 3, 0]] * 0.5 + np.eye(4) * 0.5
  mass = np.stack([np.stack([uniform, peaked])] * 3)  # [layers=3, groups=2, 4, 4]
  np.testing.assert_allclose(s_cross.score(mass), [(0 + 2 / 3) / 2] * 3)


def test_member_attention_on_constructed_queries_and_keys():
  # Group of 4 images, 3 tokens each, 2 heads. Every query points along e0; only image 1's keys
  # do too (with a large norm), so every image (image 1 included) puts ~all mass on image 1.
  m, t, h, d = 4, 3, 2, 8
  q = np.zeros((1, m * t, h, d), np.float32)
  q[..., 0] = 10.0
  k = np.zeros((1, m * t, h, d), np.float32)
  k[0, t:2 * t, :, 0] = 10.0
  mass = np.asarray(attention.member_attention(jnp.asarray(q), jnp.asarray(k), m))
  assert mass.shape == (1, m, m)
  np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mass[0, :, 1], 1.0, atol=1e-6)
  s = s_cross.per_image(mass)[0]
  np.testing.assert_allclose(s[[0, 2, 3]], 2 / 3, atol=1e-5)  # one member takes all: (M-2)/(M-1)


def test_member_attention_matches_reference_probabilities():
  # Brute force: the reference attention's softmax, summed per key image, averaged by hand.
  rng = np.random.default_rng(1)
  m, t, h, d = 3, 5, 2, 4
  q, k = (rng.normal(size=(2, m * t, h, d)).astype(np.float32) for _ in range(2))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.zeros((2, m, m))
  for i in range(m):
    for j in range(m):
      want[:, i, j] = p[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t].sum(-1).mean(axis=(1, 2))
  np.testing.assert_allclose(attention.member_attention(q, k, m), want, rtol=1e-5, atol=1e-6)


# --- through the model -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def base_model():
  """Built once (initialisation dominates these tests); tests that change it take a clone."""
  cfg = sit.SiTConfig(depth=3, hidden=32, heads=2, patch=2, input_size=8, num_classes=10,
                      max_group_size=4, dtype='float32', attention='xla')
  seed = 0
  model = sit.create(cfg, seed=seed)
  # The official init zeroes adaLN: then every block ignores t, y and the sample embedding.
  # Random modulation weights make the conditioning count, as in a trained model.
  key = jax.random.PRNGKey(seed + 1)
  k = model.blocks.adaLN_modulation.kernel
  k[...] = 0.05 * jax.random.normal(key, k[...].shape)
  return model


def _run(model, x, group_size, **kw):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    n = x.shape[0]
    return nnx.merge(graphdef, state)(x, jnp.full((n,), 0.5), jnp.zeros((n,), jnp.int32),
                                      group_size=group_size, rng=jax.random.PRNGKey(3), **kw)
  return forward(state, x)


def test_option_leaves_the_output_unchanged_and_returns_masses(base_model):
  model = base_model
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 4))
  plain = _run(model, x, 4)
  out, mass = _run(model, x, 4, return_attention_mass=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
  assert mass.shape == (3, 2, 4, 4)  # [depth, groups, M, M]
  np.testing.assert_allclose(np.asarray(mass).sum(-1), 1.0, rtol=1e-5)
  assert s_cross.score(np.asarray(mass)).min() > 1e-3  # distinct images: not uniform


def test_option_needs_group_attention_in_every_block(base_model):
  x = jnp.zeros((8, 8, 8, 4))
  with pytest.raises(ValueError, match='every block'):
    _run(base_model, x, 4, group_blocks=1, return_attention_mass=True)


def test_identical_images_give_zero(base_model):
  model = nnx.clone(base_model)
  # Identical members and identical sample embeddings: nothing tells the members apart, so every
  # image gives the same mass to each other member.
  table = model.sample_embedder.embedding_table
  table[...] = jnp.broadcast_to(table[...][:1], table[...].shape)
  one = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4))
  x = jnp.concatenate([jnp.repeat(one, 4, 0), jnp.repeat(one * 0.5, 4, 0)])
  _, mass = _run(model, x, 4, return_attention_mass=True)
  np.testing.assert_allclose(s_cross.score(np.asarray(mass)), 0.0, atol=1e-5)


def test_group_size_two_through_the_model_is_zero(base_model):
  model = base_model
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 4))
  _, mass = _run(model, x, 2, return_attention_mass=True)
  assert mass.shape == (3, 4, 2, 2)
  np.testing.assert_array_equal(s_cross.score(np.asarray(mass)), 0.0)


def test_measure_along_the_trajectory(base_model):
  model = base_model
  labels = np.full(8, 10)  # the null class: the unconditional branch
  scores, times = s_cross.measure(model, group_size=4, num_groups=2, num_steps=3, labels=labels)
  assert scores.shape == (3, 3)
  np.testing.assert_allclose(times, [1.0, 2 / 3, 1 / 3])
  assert np.all((scores >= 0) & (scores <= 2 / 3 + 1e-9))


# --- the command line --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory, base_model):
  path = str(tmp_path_factory.mktemp('diag') / 'ckpt')
  model = base_model
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  meta = {'model': dict(name='SiT-d3h32n2/2', input_size=8, in_channels=4, num_classes=10,
                        learn_sigma=False, max_group_size=4, time_convention='noise_at_1')}
  ckpt = checkpoint.Checkpointer(path, max_to_keep=1, async_save=False)
  ckpt.save_weights(0, params=params, ema=None, meta=meta)
  ckpt.close()
  return path


def _diagnose(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'groupdiff_jax.diagnose', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_csv_and_heat_map(ckpt_dir, tmp_path):
  out = str(tmp_path / 'diag')
  proc = _diagnose(f'--ckpt={ckpt_dir}', f'--out={out}', '--num_steps=4', '--num_groups=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'S_cross mean' in proc.stdout and 'S_cross: 4/4 steps' in proc.stdout
  with open(os.path.join(out, 's_cross.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 4 and rows[0].keys() == {'layer', 'step', 't', 's_cross'}
  scores, times = s_cross.read_csv(os.path.join(out, 's_cross.csv'))
  assert scores.shape == (3, 4) and times[0] == 1.0
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(os.path.join(out, 's_cross.png')) as image:
    assert image.mode == 'RGB' and image.width > 4 * 28 and image.height > 3 * 14


@pytest.mark.parametrize('args,expected', [
    (['--ckpt=/nonexistent/dir'], 'no such directory'),
    (['--ckpt={empty}'], 'holds no checkpoint'),
    (['--ckpt={ckpt}', '--group_size=8'], 'max_group_size (4)'),
])
def test_cli_bad_input_is_one_line_error(ckpt_dir, tmp_path, args, expected):
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = str(tmp_path / 'out')
  proc = _diagnose(*[a.format(empty=empty, ckpt=ckpt_dir) for a in args], f'--out={out}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('groupdiff_jax: error: '), proc.stderr
  assert expected in lines[0]
  assert not os.path.exists(out)


def test_argument_checks():
  meta = {'max_group_size': 4}
  diagnose.check_args(meta, 4, 1, 1)
  diagnose.check_args({'max_group_size': 0}, 16, 1, 1)  # no sample embedding: no upper limit
  for args, expected in (((1, 8, 25), '2 <= group size'), ((5, 8, 25), 'max_group_size (4)'),
                         ((4, 0, 25), '--num_groups'), ((4, 8, 0), '--num_steps')):
    with pytest.raises(UserError, match=re.escape(expected)):
      diagnose.check_args(meta, *args)
