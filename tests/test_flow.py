"""Interpolant, targets, time sampling within groups, and the GroupDiff batch layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax import flops, layout
from groupdiff_jax.diffusion import flow, objectives
from groupdiff_jax.models import sit


def test_interpolant_has_noise_at_t1_and_velocity_target():
  x = jnp.full((2, 2, 2, 1), 3.0)
  eps = jnp.full((2, 2, 2, 1), -1.0)
  xt = flow.interpolate(x, eps, jnp.array([0.0, 1.0]))
  np.testing.assert_array_equal(xt[0], x[0])      # t = 0: data
  np.testing.assert_array_equal(xt[1], eps[1])    # t = 1: noise
  # d/dt of (1-t) x + t eps is eps - x.
  h = 1e-3
  t = jnp.array([0.3, 0.3])
  fd = (flow.interpolate(x, eps, t + h) - flow.interpolate(x, eps, t - h)) / (2 * h)
  np.testing.assert_allclose(fd, flow.velocity_target(x, eps), rtol=1e-3)


def test_per_image_mse_ignores_sigma_channels():
  pred = jnp.concatenate([jnp.ones((3, 2, 2, 4)), 100 * jnp.ones((3, 2, 2, 4))], -1)
  np.testing.assert_allclose(flow.per_image_mse(pred, jnp.zeros((3, 2, 2, 4))), 1.0)


def test_group_times_share_a_base_without_spread():
  t = np.asarray(flow.group_times(jax.random.PRNGKey(0), 4000, 4, 0.0)).reshape(-1, 4)
  assert np.all(t == t[:, :1])
  assert 0 <= t.min() and t.max() < 1
  assert abs(t[:, 0].mean() - 0.5) < 0.03  # U[0, 1)


def test_group_times_spread_within_delta():
  delta = 0.1
  t = np.asarray(flow.group_times(jax.random.PRNGKey(1), 4000, 4, delta)).reshape(-1, 4)
  assert np.all(t.max(1) - t.min(1) <= 2 * delta + 1e-6)
  assert np.mean(t.max(1) - t.min(1)) > 0.05       # members really differ
  assert not np.any(np.all(t == t[:, :1], axis=1))  # the first member is not pinned
  assert 0 <= t.min() and t.max() < 1


def test_batch_times_follow_the_layout():
  lay = layout.make_layout(32, 1, 4, 0.25)
  t = np.asarray(objectives.batch_times(
      jax.random.PRNGKey(2), lay, lambda k, n, g: flow.group_times(k, n, g, 0.0)))
  assert t.shape == (32,)
  assert len(set(t[:lay.num_cond].tolist())) == lay.num_cond          # singles: all distinct
  groups = t[lay.num_cond:].reshape(-1, 4)
  assert np.all(groups == groups[:, :1])


@pytest.mark.parametrize('batch,cond,uncond,frac,num_cond,num_uncond', [
    (256, 1, 4, 0.1, 232, 24),   # GroupDiff-l: 6 unconditional groups of 4
    (256, 4, 4, 0.1, 232, 24),   # GroupDiff-f
    (256, 1, 1, 0.1, 230, 26),   # plain SiT: 10% label dropout, as a static count
    (64, 1, 16, 0.1, 48, 16),    # at least one group when any is asked for
    (16, 1, 4, 0.0, 16, 0),
])
def test_layouts(batch, cond, uncond, frac, num_cond, num_uncond):
  lay = layout.make_layout(batch, cond, uncond, frac)
  assert (lay.num_cond, lay.num_uncond) == (num_cond, num_uncond)
  assert lay.num_cond % cond == 0 and lay.num_uncond % uncond == 0


def test_layout_errors_name_the_problem():
  with pytest.raises(layout.LayoutError, match='does not divide the batch'):
    layout.make_layout(18, 4, 4, 0.25)
  with pytest.raises(layout.LayoutError, match='group size must be >= 1'):
    layout.make_layout(16, 0, 4, 0.25)
  with pytest.raises(layout.LayoutError, match='uncond_fraction'):
    layout.make_layout(16, 1, 4, 1.5)


@pytest.mark.parametrize('batch,uncond,frac,share,warns', [
    (256, 4, 0.10, '9.4% unconditional (requested 10.0% = 25.6 images)', False),  # rounding
    (64, 3, 0.125, '14.1% unconditional (requested 12.5% = 8 images)', False),
    (7, 4, 0.125, '57.1% unconditional (requested 12.5% = 0.875 images)', True),  # forced group
    (64, 4, 0.125, '12.5% unconditional (requested 12.5% = 8 images)', False),
])
def test_split_is_stated_and_warned_when_off(batch, uncond, frac, share, warns):
  line, warning = layout.describe_split(layout.make_layout(batch, 1, uncond, frac), frac)
  assert share in line
  assert (warning is not None) == warns
  if warns:
    assert warning.startswith('warning: the unconditional share is 4/7')


def test_flop_count_matches_published_sit_xl():
  cfg = sit.SiTConfig(depth=28, hidden=1152, heads=16, patch=2)
  # DiT paper: 118.6 GMACs per SiT/DiT-XL/2 image (2 FLOPs each).
  assert abs(flops.forward_flops_per_image(cfg) / 2e9 - 118.6) < 0.3
  # Group attention at M=4 costs ~1.11x per image (reference section 2.3).
  ratio = flops.forward_flops_per_image(cfg, 4) / flops.forward_flops_per_image(cfg, 1)
  assert 1.09 < ratio < 1.13
