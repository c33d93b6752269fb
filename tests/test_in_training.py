"""In-training evaluation: a tiny digits run logs the classifier's Fréchet distance, class
accuracy and S_cross at the eval steps (metrics.jsonl and the run's last line); the Inception
reference (random weights) scores against ADM-style statistics; bad settings are one-line errors.
"""
import json
import os

import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from groupdiff_jax import train
from groupdiff_jax.cli import UserError
from groupdiff_jax.evaluation import digits_classifier, in_training, inception, metrics


def digits_config(**overrides):
  c = tiny_config(**overrides)
  c.model.input_size = 8
  c.model.in_channels = 1
  c.data.source = 'digits'
  c.data.image_size = 8
  c.total_steps = 4
  c.sample.sampler = 'euler'
  c.sample.num_steps = 2
  c.sample.cfg_scale = 2.0
  c.eval.every_steps = 3  # at step 3 and at the last step (4)
  c.eval.reference = 'digits'
  c.eval.num_samples = 20  # not a multiple of the batch: the last batch is cut
  c.eval.batch_size = 16
  c.eval.s_cross_groups = 2
  c.eval.s_cross_steps = 2
  return c


@pytest.fixture(scope='module')
def classifier_dir(tmp_path_factory):
  """A classifier trained for one epoch (seconds): the test checks plumbing, not its quality."""
  directory = str(tmp_path_factory.mktemp('clf'))
  digits_classifier.save(digits_classifier.train(8, epochs=1), directory)
  return directory


def test_digits_run_logs_eval_rows(tmp_path, classifier_dir, capsys):
  c = digits_config()
  c.eval.classifier_dir = classifier_dir
  result = train.train(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval/digits_fd' in r]
  assert [r['step'] for r in evals] == [3, 4]
  for r in evals:
    assert r['eval/digits_fd'] > 0 and np.isfinite(r['eval/digits_fd'])
    assert 0.0 <= r['eval/digits_accuracy'] <= 1.0
    assert 0.0 <= r['eval/s_cross'] <= 2 / 3 + 1e-6  # (M - 2)/(M - 1) for groups of 4
  # Training rows are untouched (losses of every step) and carry throughput.
  assert len(train.final_losses(str(tmp_path))) == 4
  assert all('images_per_sec' in r for r in rows if 'loss' in r and r['step'] > 1)
  assert result['eval/digits_fd'] == evals[-1]['eval/digits_fd']
  last_line = capsys.readouterr().out.strip().splitlines()[-1]
  assert last_line.startswith('final eval step 4 (20 samples): digits_fd ')
  assert 'digits_accuracy' in last_line and 's_cross' in last_line


def test_eval_samples_are_fixed_noise_and_cut(classifier_dir):
  from groupdiff_jax import sharding, train_step  # pylint: disable=import-outside-toplevel
  c = digits_config()
  c.eval.classifier_dir = classifier_dir
  trainer = train_step.build(c, sharding.mesh_from_config(c))
  evaluator = in_training.build(c, trainer, '/nonexistent')
  assert evaluator.batch == 16  # whole groups of 4, a multiple of the 8 devices
  params = train_step.init_state(trainer, 0)['ema']
  images, labels = evaluator.samples(params)
  assert images.shape == (20, 8, 8, 1) and labels.shape == (20,)
  # Classes cycle per group of 4 across batches: 0,0,0,0,1,... continuing into the 2nd batch.
  np.testing.assert_array_equal(labels, np.arange(20) // 4 % 10)
  again, _ = evaluator.samples(params)
  np.testing.assert_array_equal(images, again)  # the same noise at every evaluation


def test_batch_size_rounds_to_groups_and_shards():
  assert in_training.batch_size(256, 4, 8, 1000) == 256
  assert in_training.batch_size(256, 4, 8, 20) == 24   # no more than needed, whole units of 8
  assert in_training.batch_size(10, 4, 6, 1000) == 12  # lcm(4, 6)


def test_inception_reference_scores_against_statistics(tmp_path):
  """Random Inception weights at a tiny input: the reference statistics of the same images give
  FID ~0, of other images a clearly positive FID."""
  model = inception.InceptionV3(rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  low = rng.uniform(-1, 1, (6, 4, 4, 1)).astype(np.float32)
  images = np.repeat(np.repeat(low, 4, 1), 4, 2)  # 16x16 grey blobs in [-1, 1]
  stats = str(tmp_path / 'ref.npz')
  np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
  ref = in_training.InceptionReference(stats, model, decode=np.asarray, batch_size=8)
  pool = ref.extractor(np.repeat(in_training.image_grid.to_uint8(images), 3, -1))['pool']
  assert pool.shape == (6, 2048)
  ref.mu, ref.sigma = metrics.statistics(pool)
  assert abs(ref.score(images, None)['fid']) < 1e-3 * np.trace(ref.sigma) + 1e-6
  assert ref.score(-images, None)['fid'] > 1e-2 * np.trace(ref.sigma)


@pytest.mark.parametrize('overrides, message', [
    ({'eval.reference': 'clip'}, 'unknown; known: digits, inception'),
    ({'eval.reference': 'inception', 'eval.ref_stats': '/no/such.npz'}, 'no such file'),
    ({'eval.every_steps': -1}, 'must be >= 0'),
    ({'eval.num_samples': 1}, 'num_samples must be >= 2'),
])
def test_bad_settings_are_user_errors(tmp_path, overrides, message):
  c = tiny_config(**{'eval.every_steps': 2, **overrides})
  with pytest.raises(UserError, match=message):
    train.train(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written


def test_ref_stats_of_another_network_are_refused(tmp_path):
  path = str(tmp_path / 'stats.npz')
  np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(UserError, match='mu \\[2048\\]'):
    in_training.read_ref_stats(path)


def test_off_by_default_in_the_imagenet_configs():
  from conftest import load_config  # pylint: disable=import-outside-toplevel
  for name in ('sit_xl', 'sit_b', 'sit_s', 'dit_xl'):
    assert load_config(name).eval.every_steps == 0
  assert load_config('demo').eval.every_steps > 0
