"""The DDPM objective and its group-CFG sampler (groupdiff_jax/diffusion/ddpm.py, objectives.py).

  * the hybrid loss (eps-MSE + VLB of the learned variance) against an independent float64 numpy
    computation of the same formulas, on fixed inputs, t = 0 (decoder NLL) included;
  * q_sample and the posterior against diffusers' DDPMScheduler;
  * integer group timesteps (the paper's "100 timesteps" spread) over a GroupDiff batch;
  * the sampler on a Gaussian target whose exact eps is known in closed form: it reproduces the
    mean and covariance, with CFG the guided mean, and it honours the guidance interval.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax import layout as batch_layout
from groupdiff_jax.diffusion import ddpm, objectives, registry
from groupdiff_jax.models import sit

T = 1000


# --- an independent float64 reference of DiT's formulas ---------------------------------------

def np_tables():
  betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  return dict(betas=betas, ac=ac, post_log_var=np.log(np.append(post_var[1], post_var[1:])),
              c1=betas * np.sqrt(ac_prev) / (1.0 - ac),
              c2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac))


def np_std_normal_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_hybrid_loss(out, x0, noise, t):
  """Per image: mse(eps) + (KL(q || p) in bits for t > 0, decoder NLL in bits at t = 0)."""
  tb = np_tables()
  col = lambda a: a[t].reshape(-1, 1, 1, 1)  # noqa: E731
  c = x0.shape[-1]
  eps, v = out[..., :c], out[..., c:]
  x_t = np.sqrt(col(tb['ac'])) * x0 + np.sqrt(1.0 - col(tb['ac'])) * noise
  true_mean = col(tb['c1']) * x0 + col(tb['c2']) * x_t
  true_log_var = col(tb['post_log_var'])
  x0_pred = np.sqrt(1.0 / col(tb['ac'])) * x_t - np.sqrt(1.0 / col(tb['ac']) - 1.0) * eps
  mean = col(tb['c1']) * x0_pred + col(tb['c2']) * x_t
  frac = (v + 1.0) / 2.0
  log_var = frac * np.log(col(tb['betas'])) + (1.0 - frac) * true_log_var
  kl = 0.5 * (-1.0 + log_var - true_log_var + np.exp(true_log_var - log_var)
              + (true_mean - mean) ** 2 * np.exp(-log_var))
  centered, inv_std = x0 - mean, np.exp(-0.5 * log_var)
  cdf_plus = np_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = np_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_probs = np.where(
      x0 < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
      np.where(x0 > 0.999, np.log(np.maximum(1.0 - cdf_min, 1e-12)),
               np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))
  per = lambda a: a.reshape(a.shape[0], -1).mean(1)  # noqa: E731
  vb = np.where(t == 0, -per(log_probs) / np.log(2.0), per(kl) / np.log(2.0))
  mse = per((noise - eps) ** 2)
  return mse + vb, mse, vb, x_t


def test_hybrid_loss_matches_float64_numpy_on_fixed_inputs():
  rng = np.random.default_rng(0)
  n, c = 6, 3
  t = np.array([0, 0, 1, 17, 500, 999])
  x0 = rng.uniform(-1.0, 1.0, (n, 4, 4, c))
  x0[:2, 0, 0] = [-1.0, 1.0, 0.9995]  # the decoder's edge bins at t = 0
  noise = rng.standard_normal((n, 4, 4, c))
  out = np.concatenate([noise + 0.3 * rng.standard_normal((n, 4, 4, c)),
                        rng.uniform(-1.0, 1.0, (n, 4, 4, c))], -1)
  loss, mse, vb, x_t = np_hybrid_loss(out, x0, noise, t)

  objective = objectives.OBJECTIVES['ddpm']
  diffusion = objective.diffusion
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  ours_x_t = diffusion.q_sample(f32(x0), jnp.asarray(t), f32(noise))
  np.testing.assert_allclose(ours_x_t, x_t, rtol=1e-5, atol=1e-6)
  target = objectives.DdpmTarget(f32(x0), f32(x_t), jnp.asarray(t), f32(noise))
  per_image, terms = objective.per_image_loss(f32(out), target)
  np.testing.assert_allclose(terms['mse'], mse, rtol=1e-5)
  np.testing.assert_allclose(terms['vb'], vb, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(per_image, loss, rtol=1e-5)
  assert np.all(vb[2:] > 0) and np.all(vb[:2] > 0)  # not a vacuous comparison

  # The VLB sees the mean through a stop-gradient: the eps channels get the MSE gradient only.
  grads = jax.grad(lambda o: objective.per_image_loss(o, target)[0].sum())(f32(out))
  mse_grad = 2.0 * (out[..., :c] - noise) / (16 * c)
  np.testing.assert_allclose(grads[..., :c], mse_grad, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(grads[..., c:]).max()) > 0  # ... and the variance the VLB


def test_q_sample_and_posterior_match_diffusers_scheduler():
  torch = pytest.importorskip('torch', reason='the diffusers reference needs torch')
  from dit_reference import float64_ddpm_scheduler  # pylint: disable=import-outside-toplevel
  sched = float64_ddpm_scheduler('fixed_small')
  diffusion = ddpm.DDPM.create()
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((4, 2, 2, 4))
  noise = rng.standard_normal((4, 2, 2, 4))
  t = np.array([0, 3, 400, 999])
  theirs = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  ours = diffusion.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                            jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)

  # Posterior q(x_{t-1} | x_t, x0): diffusers' step with the true eps gives its mean; the
  # variance is its fixed_small variance (DiT clips the t = 0 entry to t = 1's).
  x_t = theirs.numpy()
  mean, log_var = diffusion.q_posterior(jnp.asarray(x0, jnp.float32),
                                        jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
  for i, step in enumerate(t):
    prev = sched.step(torch.from_numpy(noise[i:i + 1]), int(step),
                      torch.from_numpy(x_t[i:i + 1])).pred_original_sample
    np.testing.assert_allclose(prev.numpy()[0], x0[i], rtol=1e-6, atol=1e-8)  # same x0 back
    ref_mean = sched.step(torch.from_numpy(noise[i:i + 1]), int(step),
                          torch.from_numpy(x_t[i:i + 1]),
                          generator=torch.Generator().manual_seed(0)).prev_sample.numpy()[0]
    if step == 0:  # no noise at the last step: prev_sample is the mean
      np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-5, atol=1e-6)
    else:
      var = float(sched._get_variance(int(step)))  # pylint: disable=protected-access
      np.testing.assert_allclose(np.exp(log_var[i]).ravel()[0], var, rtol=1e-5)
      # prev_sample = mean + std z; recover z and check it is the generator's draw.
      z = torch.randn((1, 2, 2, 4), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64).numpy()[0]
      np.testing.assert_allclose(mean[i] + math.sqrt(var) * z, ref_mean, rtol=1e-5, atol=1e-5)


# --- integer group timesteps ------------------------------------------------------------------

def test_group_steps_are_integers_around_a_shared_base():
  t = np.asarray(ddpm.group_steps(jax.random.PRNGKey(0), 4000, 4, 0)).reshape(-1, 4)
  assert t.dtype.kind == 'i' and np.all(t == t[:, :1]) and t.min() >= 0 and t.max() <= T - 1
  assert abs(t[:, 0].mean() - (T - 1) / 2) < 20
  t = np.asarray(ddpm.group_steps(jax.random.PRNGKey(1), 4000, 4, 100)).reshape(-1, 4)
  assert np.all(t.max(1) - t.min(1) <= 200) and np.mean(t.max(1) - t.min(1)) > 50
  assert np.mean(np.all(t == t[:, :1], axis=1)) < 0.01      # no member is pinned to the base
  assert t.min() == 0 and t.max() == T - 1                   # clipped at both ends, reached


def test_ddpm_inputs_follow_the_layout_and_the_spread_in_steps():
  lay = batch_layout.make_layout(64, 1, 4, 0.25)
  x = jax.random.normal(jax.random.PRNGKey(3), (64, 2, 2, 4))
  noised = objectives.OBJECTIVES['ddpm'].inputs(x, jax.random.PRNGKey(4), lay, t_spread=0.1)
  t = np.asarray(noised.target.t)
  np.testing.assert_array_equal(np.asarray(noised.t), t.astype(np.float32))  # raw integer t
  groups = t[lay.num_cond:].reshape(-1, 4)
  assert np.all(groups.max(1) - groups.min(1) <= 200)  # round(0.1 * 1000) = 100 each way
  tb = np_tables()
  expect = (np.sqrt(tb['ac'][t])[:, None, None, None] * np.asarray(x)
            + np.sqrt(1 - tb['ac'][t])[:, None, None, None] * np.asarray(noised.target.noise))
  np.testing.assert_allclose(noised.x_t, expect, rtol=1e-5, atol=1e-6)


def test_objective_registry_refuses_what_cannot_work():
  with pytest.raises(objectives.ObjectiveError, match='unknown; known: flow, ddpm'):
    objectives.get('edm')
  flat = sit.SiTConfig(depth=1, hidden=32, heads=2, patch=2, input_size=8, in_channels=4,
                       num_classes=10, learn_sigma=False, max_group_size=4)
  with pytest.raises(objectives.ObjectiveError, match='learn_sigma=True'):
    objectives.OBJECTIVES['ddpm'].check_model(flat)
  objectives.OBJECTIVES['flow'].check_model(flat)
  assert {s for o in objectives.OBJECTIVES.values() for s in o.samplers} == set(registry.SAMPLERS)
  for o in objectives.OBJECTIVES.values():  # each sampler family samples its own checkpoints
    assert all(registry.SAMPLERS[s].objective == o.checkpoint_objective for s in o.samplers)


# --- the sampler on a Gaussian target ---------------------------------------------------------

COV = np.array([[0.5, 0.2], [0.2, 0.3]])
MEANS = np.array([[1.0, -1.0], [-0.5, 2.0], [0.2, 0.4]])  # class 0, class 1, the "null" class 2


def gaussian_eps(log=None, nan_below=None):
  """Exact E[eps | x_t] for x0 ~ N(MEANS[y], COV): x_t = a x0 + b eps is Gaussian, so
  E[eps | x_t] = b (a^2 COV + b^2 I)^-1 (x_t - a m). Variance channels v = 0 (log-midpoint)."""
  ac = jnp.asarray(np.cumprod(1.0 - np.linspace(1e-4, 0.02, T)), jnp.float32)
  cov, means = jnp.asarray(COV, jnp.float32), jnp.asarray(MEANS, jnp.float32)

  def model_fn(x, t, y, group_size, rng):
    del rng
    if log is not None:
      log.append(group_size)  # at trace time: which passes run, with which group size
    a = jnp.sqrt(ac[t.astype(jnp.int32)])[:, None, None]
    b = jnp.sqrt(1.0 - ac[t.astype(jnp.int32)])[:, None, None]
    precision = jnp.linalg.inv(a ** 2 * cov + b ** 2 * jnp.eye(2))
    centered = x[:, 0, 0, :] - a[:, :, 0] * means[y]
    eps = b[:, :, 0] * jnp.einsum('bij,bj->bi', precision, centered)
    if nan_below is not None:  # a pass that must never run below t = nan_below
      eps = jnp.where(t[:, None] < nan_below, jnp.nan, eps)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], -1)[:, None, None, :]
  return model_fn


def run_sampler(model_fn, n, labels, **kw):
  noise = jax.random.normal(jax.random.PRNGKey(0), (n, 1, 1, 2))
  fn = jax.jit(lambda z, y, k: ddpm.sample_loop(model_fn, z, y, k, null_label=2, **kw))
  return np.asarray(fn(noise, labels, jax.random.PRNGKey(1)))[:, 0, 0, :]


def test_gaussian_target_mean_and_covariance():
  n = 8192
  labels = jnp.asarray(np.arange(n) // 4 % 2, jnp.int32)
  x = run_sampler(gaussian_eps(), n, labels, num_steps=250)
  se = np.sqrt(np.diag(COV) / (n / 2))  # standard error of a class mean
  for cls in (0, 1):
    part = x[np.asarray(labels) == cls]
    assert np.all(np.abs(part.mean(0) - MEANS[cls]) < 4 * se), (cls, part.mean(0))
    np.testing.assert_allclose(np.cov(part.T), COV, atol=0.04)


def test_group_cfg_guides_towards_the_extrapolated_mean():
  """Both branches share COV, so u + s (c - u) is exactly the eps of N(m_u + s (m_c - m_u), COV):
  the guided sampler must land there. Conditional passes run in groups of 1, unconditional
  ones in groups of 4."""
  n, scale, log = 4096, 1.5, []
  labels = jnp.zeros((n,), jnp.int32)
  x = run_sampler(gaussian_eps(log), n, labels, num_steps=100, cfg_scale=scale,
                  cond_group_size=1, uncond_group_size=4)
  assert log == [1, 4]
  target = MEANS[2] + scale * (MEANS[0] - MEANS[2])
  assert np.all(np.abs(x.mean(0) - target) < 4 * np.sqrt(np.diag(COV) / n)), x.mean(0)
  np.testing.assert_allclose(np.cov(x.T), COV, atol=0.05)


def test_guidance_interval_in_integer_steps():
  """low * 1000 <= t <= high * 1000: an unconditional pass that is NaN below t = 500 never
  runs with [0.5, 1] (the result is finite) and does run with [0.4, 1] (NaN)."""
  n = 8
  labels = jnp.zeros((n,), jnp.int32)
  cond = gaussian_eps()
  uncond = gaussian_eps(nan_below=500)
  model_fn = lambda x, t, y, g, k: jnp.where(  # noqa: E731
      (y == 2)[:, None, None, None], uncond(x, t, y, g, k), cond(x, t, y, g, k))
  kw = dict(num_steps=20, cfg_scale=2.0, uncond_group_size=4, guidance_high=1.0)
  inside = run_sampler(model_fn, n, labels, guidance_low=0.5, **kw)
  assert np.isfinite(inside).all()
  plain = run_sampler(cond, n, labels, num_steps=20)
  assert np.abs(inside - plain).max() > 1e-2  # guidance did act above t = 500
  assert np.isnan(run_sampler(model_fn, n, labels, guidance_low=0.4, **kw)).any()


@pytest.mark.parametrize('name', ['flow', 'ddpm'])
def test_draws_follow_the_image_not_the_row_order(name):
  """A batch in another row order (rows[r] = layout index of row r, as a shard order) gets
  exactly the same t, noise and x_t per image."""
  lay = batch_layout.make_layout(32, 1, 4, 0.25)
  x = jax.random.normal(jax.random.PRNGKey(5), (32, 2, 2, 4))
  rows = np.random.default_rng(0).permutation(32)
  objective = objectives.get(name)
  plain = objective.inputs(x, jax.random.PRNGKey(6), lay, 0.1)
  shuffled = objective.inputs(x[rows], jax.random.PRNGKey(6), lay, 0.1, rows)
  np.testing.assert_array_equal(shuffled.t, plain.t[rows])
  np.testing.assert_array_equal(shuffled.x_t, plain.x_t[rows])
