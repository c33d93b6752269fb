"""FID, IS and precision/recall on inputs with known answers, and against direct computations."""
import numpy as np
import pytest
from scipy import linalg

from groupdiff_jax.evaluation import metrics


def _scipy_fid(mu1, s1, mu2, s2):
  """The textbook formula with scipy's general matrix square root (as the ADM evaluator)."""
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = covmean.real if np.iscomplexobj(covmean) else covmean
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _gaussian_features(n, d, seed, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize('n,d', [(400, 16), (300, 64)])
def test_frechet_distance_matches_scipy(n, d):
  mu1, s1 = metrics.statistics(_gaussian_features(n, d, 0))
  mu2, s2 = metrics.statistics(_gaussian_features(n, d, 1, shift=0.3))
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _scipy_fid(mu1, s1, mu2, s2), rtol=1e-9)
  assert got > 0


def test_frechet_distance_singular_covariances():
  # Fewer samples than dimensions (rank-deficient sigmas): still finite and equal to scipy's.
  mu1, s1 = metrics.statistics(_gaussian_features(20, 50, 2))
  mu2, s2 = metrics.statistics(_gaussian_features(20, 50, 3))
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _scipy_fid(mu1, s1, mu2, s2), rtol=1e-6)


def test_frechet_distance_known_values():
  assert metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)) == \
      pytest.approx(0.0, abs=1e-12)
  # Two 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
  # Commuting diagonal covariances: sum over dims of (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  assert metrics.frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == \
      pytest.approx(3 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_frechet_distance_refuses_mismatched_statistics():
  with pytest.raises(ValueError, match='do not match'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_known_answers():
  classes = 10
  # Confident and evenly spread over 10 classes: IS = 10. One class for all: IS = 1.
  logits = np.full((200, 1008), -50.0)
  logits[np.arange(200), np.arange(200) % classes] = 50.0
  assert metrics.inception_score(logits) == pytest.approx(classes, rel=1e-9)
  same = np.zeros((50, 1008))
  same[:, 3] = 50.0
  assert metrics.inception_score(same) == pytest.approx(1.0, abs=1e-9)
  # Uniform predictions carry no information: IS = 1.
  assert metrics.inception_score(np.zeros((30, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_splits():
  # Two splits of 100: the first spread over 4 classes (IS 4), the second over 2 (IS 2) -> 3.
  logits = np.full((200, 8), -60.0)
  logits[np.arange(100), np.arange(100) % 4] = 60.0
  logits[100 + np.arange(100), np.arange(100) % 2] = 60.0
  assert metrics.inception_score(logits, split_size=100) == pytest.approx(3.0, rel=1e-9)
  # A soft case by hand: p(y|x) = [0.75, 0.25] and [0.25, 0.75] -> marginal [0.5, 0.5].
  soft = np.log(np.array([[0.75, 0.25], [0.25, 0.75]]))
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  assert metrics.inception_score(soft) == pytest.approx(np.exp(kl), rel=1e-12)


def test_precision_recall_known_answer():
  # Reference: 10 points on a line at 0..9. With k = 3 (the point itself is the 0th neighbour) the
  # squared radii are 9 at the two ends (neighbours at 1, 2, 3) and 4 elsewhere (1, 1, 2).
  ref = np.arange(10, dtype=np.float32)[:, None]
  np.testing.assert_allclose(metrics.knn_radii(ref), [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
  # Samples: 4.5 and -2.5 lie inside a reference ball (6.25 <= 9 from the end point 0); 11.5 is
  # 2.5 from point 9 (6.25 <= 9): inside; -4 and 30 are outside -> precision 3/5.
  samples = np.array([[4.5], [-2.5], [11.5], [-4.0], [30.0]], np.float32)
  # Sample radii (k = 3): sorted distances from each sample to the samples:
  #   4.5: 0, 7, 7, 8.5 -> 72.25;  -2.5: 0, 1.5, 7, 14 -> 196;  11.5: 0, 7, 14, 15.5 -> 240.25;
  #   -4: 0, 1.5, 8.5, 15.5 -> 240.25;  30: 0, 18.5, 25.5, 32.5 -> 1056.25
  np.testing.assert_allclose(metrics.knn_radii(samples), [72.25, 196, 240.25, 240.25, 1056.25])
  # Every reference point is within 4.5 (squared 20.25 <= 72.25) of the sample at 4.5: recall 1.
  precision, recall = metrics.precision_recall(ref, samples)
  assert precision == pytest.approx(3 / 5)
  assert recall == pytest.approx(1.0)
  # Samples at 0, 1, 2, 3 (squared radii 9, 4, 4, 9): the ball of 3 reaches 6, so the references
  # 0..6 are covered and 7, 8, 9 are not -> recall 7/10; every sample is a reference -> precision 1.
  part = np.arange(4, dtype=np.float32)[:, None]
  np.testing.assert_allclose(metrics.knn_radii(part), [9, 4, 4, 9])
  assert metrics.precision_recall(ref, part) == (pytest.approx(1.0), pytest.approx(0.7))


def test_precision_recall_disjoint_and_identical_sets():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 8)).astype(np.float32)
  assert metrics.precision_recall(a, a) == (1.0, 1.0)
  assert metrics.precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(300, 6)).astype(np.float32)
  samples = (rng.normal(size=(250, 6)) * 1.3 + 0.4).astype(np.float32)

  def brute(manifold, points, k=3):
    d_mm = ((manifold[:, None] - manifold[None]) ** 2).sum(-1)
    radii = np.sort(d_mm, axis=1)[:, k]
    d_pm = ((points[:, None] - manifold[None]) ** 2).sum(-1)
    return (d_pm <= radii[None]).any(axis=1).mean()

  precision, recall = metrics.precision_recall(ref, samples)
  assert precision == pytest.approx(brute(ref.astype(np.float64), samples.astype(np.float64)))
  assert recall == pytest.approx(brute(samples.astype(np.float64), ref.astype(np.float64)))
  assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # a case that discriminates
