"""Samplers against exact velocities of Gaussian mixtures, plus CFG / interval / group plumbing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.diffusion import samplers

NULL = 1000

# Data mixture in D = 2 (images of shape [1, 1, 2]): well-separated components with unequal
# weights, so matching the weights (not only the first two moments) is checked too.
PIS = np.array([0.3, 0.7], np.float32)
MUS = np.array([[-2.0, 1.0], [1.5, -0.5]], np.float32)
SIGMAS = np.array([[0.5, 0.3], [0.4, 0.8]], np.float32)


def mixture_velocity(x, t, pis, mus, sigmas):
  """Exact v(x_t, t) = E[eps - x | x_t] for data x ~ sum_k pi_k N(mu_k, diag(s_k^2)).

  Derivation (per coordinate, a = 1 - t). Given component k, (x, eps) are jointly Gaussian with
  x ~ N(mu, s^2), eps ~ N(0, 1) independent, and x_t = a x + t eps, so
    x_t | k ~ N(a mu, V),  V = a^2 s^2 + t^2,
    Cov(x, x_t) = a s^2,   Cov(eps, x_t) = t,
  and Gaussian conditioning gives, with d = x_t - a mu,
    E[x | x_t, k] = mu + (a s^2 / V) d,   E[eps | x_t, k] = (t / V) d,
    v_k = E[eps - x | x_t, k] = ((t - a s^2) / V) d - mu.
  The marginal of x_t is sum_k pi_k N(a mu_k, V_k), so the posterior weights are
    r_k(x_t) proportional to pi_k N(x_t; a mu_k, V_k)   (product over coordinates),
  and v = sum_k r_k v_k by the tower rule. (At t = 0 this gives v = -x; at t = 1, v = x_t - mean.)
  """
  shape = x.shape
  x = x.reshape(shape[0], -1)[:, None, :]                 # [B, 1, D]
  t = t.astype(jnp.float32)[:, None, None]                # [B, 1, 1]
  a = 1.0 - t
  var = a**2 * sigmas**2 + t**2                           # [B, K, D]
  d = x - a * mus                                         # [B, K, D]
  logp = jnp.log(pis) - 0.5 * jnp.sum(d**2 / var + jnp.log(var), axis=-1)
  r = jax.nn.softmax(logp, axis=-1)[..., None]            # [B, K, 1]
  v_k = (t - a * sigmas**2) / var * d - mus
  return jnp.sum(r * v_k, axis=1).reshape(shape)


def data_velocity(x, t, y, group_size, rng):
  del y, group_size, rng
  return mixture_velocity(x, t, PIS, MUS, SIGMAS)


def mixture_moments():
  mean = PIS @ MUS
  second = sum(p * (np.diag(s**2) + np.outer(m, m)) for p, m, s in zip(PIS, MUS, SIGMAS))
  return mean, second - np.outer(mean, mean)


def noise_and_labels(n, d=2, seed=0):
  noise = jax.random.normal(jax.random.PRNGKey(seed), (n, 1, 1, d))
  return noise, jnp.zeros((n,), jnp.int32)


@pytest.mark.parametrize('sampler,num_steps', [('sde', 250), ('euler', 200), ('heun', 100)])
def test_reproduces_gaussian_mixture(sampler, num_steps):
  n = 4096
  noise, labels = noise_and_labels(n)
  out = samplers.sample(data_velocity, noise, labels, jax.random.PRNGKey(1), sampler=sampler,
                        num_steps=num_steps)
  assert out.shape == noise.shape and out.dtype == jnp.float32
  x = np.asarray(out).reshape(n, 2)
  mean, cov = mixture_moments()
  centered = x - mean
  # Tolerances are 5 standard errors of the estimator (from the samples themselves) plus a small
  # allowance for discretisation: ~0.1 for the means and ~0.2 relative for the covariance; a
  # flipped velocity sign or time direction is off by O(1) (checked by breaking the sampler).
  se_mean = x.std(0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * se_mean + 0.02)
  prods = centered[:, :, None] * centered[:, None, :]
  se_cov = prods.reshape(n, 4).std(0).reshape(2, 2) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(prods.mean(0) - cov), 5 * se_cov + 0.03)
  # Mode weights: components are > 3 sigma from the boundary x0 = -0.25.
  frac = np.mean(x[:, 0] < -0.25)
  assert abs(frac - PIS[0]) < 5 * np.sqrt(PIS[0] * PIS[1] / n) + 0.01, frac
  # Within-mode spread: the sampler must not blur the modes (what a Gaussian fit would do).
  np.testing.assert_allclose(x[x[:, 0] < -0.25].std(0), SIGMAS[0], rtol=0.1)
  np.testing.assert_allclose(x[x[:, 0] >= -0.25].std(0), SIGMAS[1], rtol=0.1)


# Two equal-variance Gaussians: v is affine in the mean, so uncond + s (cond - uncond) is exactly
# the velocity of N(mu_u + s (mu_c - mu_u), sigma^2): CFG has a closed-form target.
MU_C = np.array([[1.0, -1.0]], np.float32)
MU_U = np.array([[0.0, 0.0]], np.float32)
SIG = np.array([[0.5, 0.5]], np.float32)
ONE = np.array([1.0], np.float32)


def two_gaussians_velocity(x, t, y, group_size, rng):
  del group_size, rng
  v_c = mixture_velocity(x, t, ONE, MU_C, SIG)
  v_u = mixture_velocity(x, t, ONE, MU_U, SIG)
  return jnp.where((y == NULL)[:, None, None, None], v_u, v_c)


@pytest.mark.parametrize('sampler', ['sde', 'euler'])
def test_cfg_matches_closed_form(sampler):
  n, s = 2048, 2.5
  noise, labels = noise_and_labels(n)
  kw = dict(sampler=sampler, num_steps=100, cfg_scale=s, uncond_group_size=4)
  x = np.asarray(samplers.sample(two_gaussians_velocity, noise, labels, jax.random.PRNGKey(2),
                                 **kw)).reshape(n, 2)
  target = MU_U[0] + s * (MU_C[0] - MU_U[0])
  np.testing.assert_allclose(x.mean(0), target, atol=0.05)
  np.testing.assert_allclose(x.std(0), SIG[0], rtol=0.1)
  # Legacy quirk: only channel 0 guided; channel 1 follows the conditional flow exactly.
  part = np.asarray(samplers.sample(two_gaussians_velocity, noise, labels,
                                    jax.random.PRNGKey(2), guided_channels=1, **kw))
  plain = np.asarray(samplers.sample(two_gaussians_velocity, noise, labels,
                                     jax.random.PRNGKey(2), sampler=sampler, num_steps=100))
  np.testing.assert_allclose(part[..., 0], x.reshape(part.shape)[..., 0], atol=1e-5)
  np.testing.assert_allclose(part[..., 1], plain[..., 1], atol=1e-5)
  assert abs(part[..., 0].mean() - target[0]) < 0.05
  assert abs(part[..., 1].mean() - MU_C[0, 1]) < 0.05


def nan_unconditional(x, t, y, group_size, rng):
  v = two_gaussians_velocity(x, t, y, group_size, rng)
  return jnp.where((y == NULL)[:, None, None, None], jnp.nan, v)


@pytest.mark.parametrize('sampler', ['sde', 'euler', 'heun'])
def test_cfg_scale_one_is_plain_conditional(sampler):
  noise, labels = noise_and_labels(64)
  kw = dict(sampler=sampler, num_steps=10)
  plain = samplers.sample(two_gaussians_velocity, noise, labels, jax.random.PRNGKey(3), **kw)
  # cfg 1 never calls the unconditional branch (NaN there would leak), whatever the interval.
  same = samplers.sample(nan_unconditional, noise, labels, jax.random.PRNGKey(3), cfg_scale=1.0,
                         guidance_low=0.2, guidance_high=0.9, uncond_group_size=64, **kw)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))
  # An empty-ish interval with s != 1 is also the conditional flow when no step falls inside it.
  guided_nowhere = samplers.sample(nan_unconditional, noise, labels, jax.random.PRNGKey(3),
                                   cfg_scale=4.0, guidance_low=0.001, guidance_high=0.002, **kw)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(guided_nowhere))


def recording_velocity(log):
  """A velocity fn that logs (t, labels, group_size, rng) of every executed call."""
  def record(t, y, key, *, group_size):
    log.append((float(t[0]), np.asarray(y).copy(), group_size, tuple(np.asarray(key).ravel())))

  def fn(x, t, y, group_size, rng):
    assert isinstance(group_size, int)
    jax.debug.callback(functools.partial(record, group_size=group_size), t, y, rng)
    return two_gaussians_velocity(x, t, y, group_size, rng)
  return fn


def test_guidance_interval_group_sizes_and_keys():
  log = []
  noise, labels = noise_and_labels(8)
  labels = jnp.arange(8, dtype=jnp.int32)
  samplers.sample(recording_velocity(log), noise, labels, jax.random.PRNGKey(4), sampler='euler',
                  num_steps=20, cfg_scale=2.0, guidance_low=0.22, guidance_high=0.73,
                  cond_group_size=2, uncond_group_size=4)
  jax.effects_barrier()
  cond = [e for e in log if (e[1] != NULL).all()]
  uncond = [e for e in log if (e[1] == NULL).all()]
  assert len(cond) + len(uncond) == len(log)
  grid = np.linspace(1.0, 0.0, 21)[:-1]
  np.testing.assert_allclose(sorted(e[0] for e in cond), sorted(grid), atol=1e-6)
  assert all(e[2] == 2 and (e[1] == np.arange(8)).all() for e in cond)
  inside = grid[(grid >= 0.22) & (grid <= 0.73)]
  assert len(inside) == 10
  np.testing.assert_allclose(sorted(e[0] for e in uncond), sorted(inside), atol=1e-6)
  assert all(e[2] == 4 for e in uncond)
  keys = [e[3] for e in log]
  assert len(set(keys)) == len(keys), 'every model call must get a fresh key'
  # NaN from the null branch outside the interval must never reach the samples.
  def nan_outside(x, t, y, group_size, rng):
    v = two_gaussians_velocity(x, t, y, group_size, rng)
    bad = (y == NULL) & ((t < 0.22) | (t > 0.73))
    return jnp.where(bad[:, None, None, None], jnp.nan, v)
  out = samplers.sample(nan_outside, noise, labels, jax.random.PRNGKey(4), sampler='euler',
                        num_steps=20, cfg_scale=2.0, guidance_low=0.22, guidance_high=0.73)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize('sampler,num_steps,grid', [
    ('sde', 5, 1.0 - np.linspace(0.0, 0.96, 5)),
    ('euler', 4, np.linspace(1.0, 0.0, 5)[:-1]),
    ('heun', 4, np.concatenate([np.linspace(1.0, 0.0, 5)[:-1], np.linspace(1.0, 0.0, 5)[1:-1]])),
])
def test_time_grids(sampler, num_steps, grid):
  log = []
  noise, labels = noise_and_labels(4)
  samplers.sample(recording_velocity(log), noise, labels, jax.random.PRNGKey(5), sampler=sampler,
                  num_steps=num_steps)
  jax.effects_barrier()
  assert len(log) == samplers.num_function_evals(sampler, num_steps)
  np.testing.assert_allclose(sorted(e[0] for e in log), sorted(grid), atol=1e-6)


def test_learned_sigma_channels_are_ignored_and_state_is_float32():
  def with_sigma(x, t, y, group_size, rng):
    v = two_gaussians_velocity(x, t, y, group_size, rng)
    return jnp.concatenate([v, 100.0 + x], axis=-1)
  noise, labels = noise_and_labels(16)
  kw = dict(sampler='heun', num_steps=8, cfg_scale=3.0)
  a = samplers.sample(two_gaussians_velocity, noise, labels, jax.random.PRNGKey(6), **kw)
  b = samplers.sample(with_sigma, noise.astype(jnp.bfloat16), labels, jax.random.PRNGKey(6), **kw)
  assert b.dtype == jnp.float32 and b.shape == noise.shape
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)  # bf16 noise rounding only


@pytest.mark.parametrize('batch,kwargs,match', [
    (6, dict(cond_group_size=4), 'cond group size 4'),
    (6, dict(cfg_scale=2.0, uncond_group_size=4), 'uncond group size 4'),
    (8, dict(sampler='ddim'), 'unknown sampler'),
    (8, dict(sampler='euler', num_steps=0), 'num_steps'),
    (8, dict(sampler='sde', num_steps=1), 'num_steps'),
    (8, dict(cfg_scale=2.0, guidance_low=0.8, guidance_high=0.2), 'guidance interval'),
    (8, dict(cfg_scale=2.0, guidance_high=1.5), 'guidance interval'),
    (8, dict(guidance_low=-0.1), 'guidance interval'),
    (8, dict(guided_channels=-1), 'guided_channels'),
])
def test_bad_arguments(batch, kwargs, match):
  noise, labels = noise_and_labels(batch)
  with pytest.raises(ValueError, match=match):
    samplers.sample(data_velocity, noise, labels, jax.random.PRNGKey(0), **kwargs)


def test_uncond_group_size_unchecked_without_cfg():
  noise, labels = noise_and_labels(6)
  out = samplers.sample(data_velocity, noise, labels, jax.random.PRNGKey(0), sampler='euler',
                        num_steps=2, uncond_group_size=4)
  assert out.shape == noise.shape


def test_num_function_evals():
  assert samplers.num_function_evals('sde', 250) == 250
  assert samplers.num_function_evals('heun', 125, cfg_scale=1.5) == 2 * 249
  with pytest.raises(ValueError, match='unknown sampler'):
    samplers.num_function_evals('dopri5', 10)
