"""The digits classifier: it learns, its feature space separates real digits from noise, class
accuracy follows the labels, and it survives a save/load."""
import numpy as np
import pytest

from groupdiff_jax.evaluation import digits_classifier as dc


@pytest.fixture(scope='module')
def classifier():
  return dc.train(16, epochs=15)  # the shipped script trains 60 epochs (docs: ~97% held out)


def test_split_is_stratified_and_disjoint():
  _, labels = dc.digits(8)
  train, test = dc.split(labels)
  assert not set(train) & set(test) and len(train) + len(test) == len(labels)
  for c in range(10):
    assert abs((labels[test] == c).sum() / (labels == c).sum() - 0.2) < 0.02


def test_learns_and_scores(classifier, tmp_path):
  assert classifier.held_out_accuracy >= 0.9
  images, labels = dc.digits(16)
  _, test = dc.split(labels)
  real = dc.score(classifier, images[test], labels[test])
  assert real['class_accuracy'] == pytest.approx(classifier.held_out_accuracy)
  # The wrong class for every image: accuracy collapses, the distance does not move.
  wrong = dc.score(classifier, images[test], (labels[test] + 1) % 10)
  assert wrong['class_accuracy'] < 0.15
  assert wrong['frechet_distance'] == pytest.approx(real['frechet_distance'])
  # Noise is far from the digits in feature space; real held-out digits are close.
  noise = np.random.default_rng(0).uniform(-1, 1, images[test].shape).astype(np.float32)
  far = dc.score(classifier, noise, labels[test])['frechet_distance']
  assert far > 20 * real['frechet_distance']
  dc.save(classifier, str(tmp_path / 'clf'))
  again = dc.load(str(tmp_path / 'clf'))
  assert again.held_out_accuracy == classifier.held_out_accuracy
  assert dc.score(again, images[test], labels[test]) == pytest.approx(real)


def test_load_or_train_reuses_a_saved_classifier(classifier, tmp_path):
  directory = str(tmp_path / 'cache')
  dc.save(classifier, directory)
  assert dc.load_or_train(directory, 16).held_out_accuracy == classifier.held_out_accuracy


def test_refuses_other_image_sizes(classifier):
  with pytest.raises(ValueError, match='do not match'):
    dc.score(classifier, np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, int))
