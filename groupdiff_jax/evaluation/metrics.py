"""Sample-quality metrics on Inception features, as the ADM evaluator defines them.

  FID / sFID   Fréchet distance between Gaussians fitted to pool / spatial features (float64)
  IS           Inception Score from the unbiased logits, over splits of 5,000 samples
  precision,   the k-NN manifold estimate (Kynkäänniemi et al. 2019) with k = 3: a sample is
  recall       'in' the reference manifold when it lies within the k-th-neighbour radius of some
               reference point (precision); recall swaps the roles
"""
import jax
import jax.numpy as jnp
import numpy as np

IS_SPLIT_SIZE = 5000   # the ADM evaluator scores consecutive chunks of 5,000 and averages
NEIGHBOURHOOD = 3      # k of the precision/recall manifold estimate


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (ddof 1, as np.cov) in float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'need at least 2 feature vectors [N, D] for a covariance, got {x.shape}')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh(m)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64.

  tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those
  of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2): two symmetric eigendecompositions, with no
  complex parts to discard and no failure on singular covariances (fewer samples than features).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                  np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} '
                     f'vs {s2.shape}')
  root1 = _psd_sqrt((s1 + s1.T) / 2)
  inner = root1 @ s2 @ root1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """exp(E_x KL(p(y|x) || p(y))) per split of `split_size` rows, averaged over splits (float64)."""
  logits = np.asarray(logits, np.float64)
  scores = []
  for start in range(0, len(logits), split_size):
    part = logits[start:start + split_size]
    log_p = part - part.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    log_marginal = np.log(p.mean(axis=0, keepdims=True))
    kl = (p * (log_p - log_marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores))


@jax.jit
def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  # |u|^2 - 2 u.v + |v|^2 as the ADM evaluator computes it, float32, clamped at 0.
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  cross = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2.0 * cross + nv, 0.0)


def _row_blocks(n: int, block: int):
  for start in range(0, n, block):
    yield start, min(start + block, n)


def knn_radii(features: np.ndarray, k: int = NEIGHBOURHOOD, block: int = 1024) -> np.ndarray:
  """Squared distance from each point to its k-th nearest neighbour (the point itself is the 0th)."""
  x = jnp.asarray(features, jnp.float32)
  if x.shape[0] <= k:
    raise ValueError(f'{x.shape[0]} feature vectors are too few for a {k}-NN radius')
  radii = []
  for start, end in _row_blocks(x.shape[0], block):
    d = _squared_distances(x[start:end], x)
    radii.append(np.asarray(-jax.lax.top_k(-d, k + 1)[0][:, k]))
  return np.concatenate(radii)


def coverage(manifold: np.ndarray, radii: np.ndarray, points: np.ndarray,
             block: int = 1024) -> float:
  """Fraction of `points` within radius of at least one `manifold` point (squared distances)."""
  m = jnp.asarray(manifold, jnp.float32)
  r = jnp.asarray(radii, jnp.float32)[None, :]
  p = jnp.asarray(points, jnp.float32)
  inside = [np.asarray(jnp.any(_squared_distances(p[s:e], m) <= r, axis=1))
            for s, e in _row_blocks(p.shape[0], block)]
  return float(np.concatenate(inside).mean())


def precision_recall(reference: np.ndarray, samples: np.ndarray,
                     k: int = NEIGHBOURHOOD) -> tuple[float, float]:
  """(precision, recall) of `samples` against `reference` features, k-NN manifolds."""
  ref_radii, sample_radii = knn_radii(reference, k), knn_radii(samples, k)
  return coverage(reference, ref_radii, samples), coverage(samples, sample_radii, reference)
