"""`python -m groupdiff_jax.evaluate`: metrics from .npz files (random Inception weights), the
reference as images or as statistics, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from groupdiff_jax.cli import UserError
from groupdiff_jax.evaluation import evaluator, features, metrics, npz_images

pytest.importorskip('torch')
import inception_reference  # pylint: disable=wrong-import-position


def _images(n, seed, size=16):
  rng = np.random.default_rng(seed)
  # Smooth random blobs (not white noise) so the features vary between images.
  low = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
  return np.repeat(np.repeat(low, size // 4, 1), size // 4, 2).astype(np.uint8)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  weights = inception_reference.random_state_dict(seed=0)
  paths = {'weights': str(root / 'inception.npz'), 'samples': str(root / 'samples.npz'),
           'ref': str(root / 'ref.npz'), 'shards': str(root / 'shards')}
  np.savez(paths['weights'], **weights)
  samples, ref = _images(10, 1), _images(12, 2)
  np.savez(paths['samples'], arr_0=samples)
  np.savez(paths['ref'], arr_0=ref)
  os.makedirs(paths['shards'])
  # The sampling job's shard layout: `images` arrays, read in name order.
  np.savez(os.path.join(paths['shards'], 'shard_00001_0000004-0000010.npz'), images=samples[4:])
  np.savez(os.path.join(paths['shards'], 'shard_00000_0000000-0000004.npz'), images=samples[:4])
  return paths


class TinyFeatures(nnx.Module):
  """Stands in for the Inception where the test is about files, batching and bookkeeping (the
  network has its own parity test, and the CLI test below runs it): the same output names,
  small dimensions, a few ms per batch."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.w = nnx.Param(jnp.asarray(rng.normal(size=(3, 24)), jnp.float32))
    self.fc = nnx.Param(jnp.asarray(rng.normal(size=(24, 10)), jnp.float32))

  def __call__(self, x):  # [N, 299, 299, 3] in [-1, 1]
    h = jax.nn.relu(x @ self.w[...])
    logits = h.mean((1, 2)) @ self.fc[...]
    return {'pool': h.mean((1, 2)), 'spatial': h[:, ::50, ::50, :4].reshape(len(x), -1),
            'logits': logits, 'logits_unbiased': logits}


@pytest.fixture(scope='module')
def extractor():
  return features.FeatureExtractor(TinyFeatures(), batch_size=8)


def test_metrics_from_files(files, extractor, tmp_path):
  result = evaluator.compute(evaluator.check_inputs(files['samples'], files['ref'],
                                                    files['weights']), extractor=extractor)
  assert result['num_samples'] == 10 and result['num_reference'] == 12
  assert result['fid'] > 0 and result['sfid'] > 0
  assert 1.0 <= result['inception_score'] <= 1008
  assert 0 <= result['precision'] <= 1 and 0 <= result['recall'] <= 1

  # The same numbers from the features directly (batching across 8 devices and the padding of
  # the last batch change nothing).
  s = extractor(np.load(files['samples'])['arr_0'])
  r = extractor(np.load(files['ref'])['arr_0'])
  assert result['fid'] == pytest.approx(
      metrics.frechet_distance(*metrics.statistics(s['pool']), *metrics.statistics(r['pool'])),
      rel=1e-5)
  assert result['inception_score'] == pytest.approx(metrics.inception_score(s['logits_unbiased']),
                                                    rel=1e-5)

  # Samples against themselves, read from the shard directory: FID 0, precision = recall = 1.
  same = evaluator.compute(evaluator.check_inputs(files['shards'], files['samples'],
                                                  files['weights']), extractor=extractor)
  assert same['fid'] == pytest.approx(0.0, abs=1e-3 * result['fid'])
  assert same['sfid'] == pytest.approx(0.0, abs=1e-3 * result['sfid'])
  assert (same['precision'], same['recall']) == (1.0, 1.0)

  # A reference given as statistics only (the ADM layout): the same FID/sFID, no precision/recall.
  stats = str(tmp_path / 'ref_stats.npz')
  mu, sigma = metrics.statistics(r['pool'])
  mu_s, sigma_s = metrics.statistics(r['spatial'])
  np.savez(stats, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  inputs = evaluator.check_inputs(files['samples'], stats, files['weights'],
                                  feature_dims=(24, 6 * 6 * 4))  # TinyFeatures' sizes
  from_stats = evaluator.compute(inputs, extractor=extractor)
  assert from_stats['fid'] == pytest.approx(result['fid'], rel=1e-5)
  assert from_stats['sfid'] == pytest.approx(result['sfid'], rel=1e-5)
  assert from_stats['precision'] is None and from_stats['num_reference'] is None
  text = evaluator.table(from_stats)
  assert 'FID' in text and 'n/a' in text and 'need reference images' in text


def test_shards_stream_in_order(files):
  source = npz_images.ImageSource(files['shards'])
  assert len(source) == 10
  got = np.concatenate(list(source.batches(3)))  # batches span the two shards
  np.testing.assert_array_equal(got, np.load(files['samples'])['arr_0'])
  assert [len(b) for b in source.batches(3)] == [3, 3, 3, 1]


def _run(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'groupdiff_jax.evaluate', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the real Inception, compiled and run on CPU in a fresh process (~1-2 min)
def test_cli_prints_table_and_writes_json(files, tmp_path):
  out = str(tmp_path / 'm.json')
  proc = _run(f'--samples={files["samples"]}', f'--ref={files["ref"]}',
              f'--inception_weights={files["weights"]}', f'--out={out}', '--batch_size=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'samples: 10/10 images' in proc.stdout and 'images/s' in proc.stdout
  assert 'FID' in proc.stdout and 'Recall' in proc.stdout and f'wrote {out}' in proc.stdout
  with open(out) as f:
    result = json.load(f)
  assert result['num_samples'] == 10 and result['fid'] > 0 and result['protocol'] == 'adm'


def _bad_files(root, files):
  def save(name, **arrays):
    path = os.path.join(root, name)
    np.savez(path, **arrays)
    return path
  img = np.zeros((4, 8, 8, 3), np.uint8)
  return {
      'float': save('float.npz', arr_0=img.astype(np.float32)),
      'nchw': save('nchw.npz', arr_0=np.zeros((4, 3, 8, 8), np.uint8)),
      'nokey': save('nokey.npz', x=img),
      'badweights': save('badweights.npz', **{'fc.weight': np.zeros((1008, 2048), np.float32)}),
  }


@pytest.mark.parametrize('case,expected', [
    ('missing_samples', 'no such file or directory'),
    ('float', 'is float32; expected uint8'),
    ('nchw', 'looks NCHW'),
    ('nokey', 'no image array (expected arr_0 or images; the file holds x)'),
    ('ref_without_images_or_stats', 'neither reference images'),
    ('no_weights_flag', '--inception_weights is required'),
    ('missing_weights', 'no such file (get pt_inception-2015-12-05-6726825d.pth'),
    ('badweights', 'not the FID InceptionV3 state dict'),
])
def test_bad_input_is_one_line_error(files, tmp_path, case, expected):
  bad = _bad_files(str(tmp_path), files)
  args = {'samples': files['samples'], 'ref': files['ref'],
          'inception_weights': files['weights']}
  if case == 'missing_samples':
    args['samples'] = str(tmp_path / 'nope.npz')
  elif case in ('float', 'nchw', 'nokey'):
    args['samples'] = bad[case]
  elif case == 'ref_without_images_or_stats':
    args['ref'] = bad['nokey']
  elif case == 'no_weights_flag':
    del args['inception_weights']
  elif case == 'missing_weights':
    args['inception_weights'] = str(tmp_path / 'nope.pth')
  elif case == 'badweights':
    args['inception_weights'] = bad['badweights']
  out = str(tmp_path / 'out.json')
  proc = _run(*[f'--{k}={v}' for k, v in args.items()], f'--out={out}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('groupdiff_jax: error: '), proc.stderr
  assert expected in lines[0]
  assert not os.path.exists(out)


def test_check_inputs_refuses_statistics_of_another_size(tmp_path, files):
  stats = str(tmp_path / 'stats64.npz')
  np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(UserError, match='mu has shape'):
    evaluator.check_inputs(files['samples'], stats, files['weights'])


def test_check_inputs_refuses_a_single_image(tmp_path, files):
  one = str(tmp_path / 'one.npz')
  np.savez(one, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(UserError, match='at least 2'):
    evaluator.check_inputs(one, files['ref'], files['weights'])
