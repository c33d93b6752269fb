"""Group attention over mixed group sizes, inside shard_map on 8 CPU devices, against the plain
single-device computation; the shard order that gives every batch shard whole groups."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax import layout as batch_layout
from groupdiff_jax import sharding
from groupdiff_jax.models import attention as attn
from groupdiff_jax.models import group_attention as ga

AXES = ('data', 'fsdp', 'context')
RULES = (('batch', ('data', 'fsdp')), ('tokens', 'context'), ('heads', None))


def _qkv(n=16, t=16, heads=2, head_dim=8):
  return jax.random.normal(jax.random.PRNGKey(0), (n, t, 3, heads, head_dim))


def _by_hand(qkv, segments):
  """Each group's images joined along the sequence, float32 reference attention per group."""
  outs, start = [], 0
  for images, size in segments:
    for g in range(start, start + images, size):
      q, k, v = (qkv[g:g + size, :, i].reshape(1, -1, *qkv.shape[3:]) for i in range(3))
      outs.append(attn.reference_attention(q, k, v).reshape(size, qkv.shape[1], *qkv.shape[3:]))
    start += images
  return jnp.concatenate(outs)


def test_groups_cut_into_blocks_of_whole_groups():
  groups = ga.Groups(((24, 4), (232, 1)))
  kinds, kind_of = groups.cut(64)
  assert kinds == (((4, 4),), ((4, 1),)) and kind_of == (0,) * 6 + (1,) * 58
  assert ga.Groups(((12, 1), (4, 4))).cut(8) is None  # a block of 2 rows would split a group
  assert ga.Groups(((2, 2), (4, 4), (2, 2), (4, 4))).cut(2) == ((((2, 2), (4, 4)),), (0, 0))
  assert ga.Groups(((4, 1), (4, 1))).segments == ((8, 1),)  # neighbours of one size merge
  with pytest.raises(ValueError, match='not whole groups of 4'):
    ga.Groups(((6, 4),))


@pytest.mark.parametrize('batch,cond,uncond,fraction,shards', [
    (256, 1, 4, 0.1, 64), (256, 1, 4, 0.1, 256 // 4), (48, 2, 4, 0.25, 8), (32, 4, 4, 0.5, 8),
    (24, 2, 3, 0.5, 4), (16, 1, 4, 0.25, 4), (16, 1, 4, 0.25, 1), (64, 1, 16, 0.25, 4)])
def test_shard_order_gives_every_shard_whole_groups(batch, cond, uncond, fraction, shards):
  layout = batch_layout.make_layout(batch, cond, uncond, fraction)
  order, groups = batch_layout.shard_order(layout, shards)
  assert sorted(order.tolist()) == list(range(batch))  # a permutation of the layout rows
  kinds, kind_of = groups.cut(shards)
  assert len(kind_of) == shards and len(kinds) <= 3
  # Every group of the layout lands whole and in order on one shard, and the structure says
  # which rows are conditional.
  rows = batch // shards
  start = 0
  for images, size in groups.segments:
    members = order[start:start + images].reshape(-1, size)  # layout rows of each group
    positions = np.arange(start, start + images).reshape(-1, size)  # their batch rows
    assert np.all(np.diff(members, axis=1) == 1)  # a layout group, members in order
    assert np.all(np.where(members[:, 0] < layout.num_cond, members[:, 0],
                           members[:, 0] - layout.num_cond) % size == 0)  # aligned groups
    assert np.all(positions[:, 0] // rows == positions[:, -1] // rows)  # on one shard
    is_cond = members < layout.num_cond
    assert np.all(is_cond.all(1) | ~is_cond.any(1))  # a group is all conditional or not at all
    if is_cond.all() or not is_cond.any():
      assert size == (cond if is_cond.all() else uncond)
    else:  # both parts in one merged segment
      assert cond == uncond == size
    start += images
  if shards == 1:
    np.testing.assert_array_equal(order, np.arange(batch))


def test_the_issue_example_six_uncond_shards_and_58_of_singles():
  layout = batch_layout.make_layout(256, 1, 4, 0.1)
  assert (layout.num_cond, layout.num_uncond) == (232, 24)
  order, groups = batch_layout.shard_order(layout, 64)
  kinds, kind_of = groups.cut(64)
  assert [kinds[k] for k in kind_of].count(((4, 4),)) == 6
  assert [kinds[k] for k in kind_of].count(((4, 1),)) == 58
  assert np.all(order[:24] >= 232) and np.all(order[24:] < 232)


def test_a_layout_that_cannot_be_cut_is_a_clear_error():
  layout = batch_layout.make_layout(16, 1, 4, 0.25)
  with pytest.raises(batch_layout.LayoutError, match='do not split into 8 batch shards'):
    batch_layout.shard_order(layout, 8)
  mesh = sharding.make_mesh(AXES, (2, 4, 1))
  counts = ga.batch_shard_counts(mesh, RULES)
  assert counts == [8, 4, 2, 1]  # (data, fsdp), fsdp, data, none
  order, groups, shards = batch_layout.shard_order_for_mesh(layout, counts)
  assert shards == 4 and groups.cut(4) is not None


def test_outside_a_mesh_equals_attention_by_hand():
  qkv, segments = _qkv(), ((4, 1), (8, 4), (2, 2), (2, 1))
  np.testing.assert_allclose(ga.group_attention(qkv, ga.Groups(segments), 'reference'),
                             _by_hand(qkv, segments), atol=1e-6)
  # An int group size is the uniform structure, the plain path of the converter parity tests.
  np.testing.assert_array_equal(ga.group_attention(qkv, 4, 'xla'),
                                ga.group_attention(qkv, ga.Groups(((16, 4),)), 'xla'))


@pytest.mark.parametrize('backend', ['flash_cpu', 'xla'])
def test_one_device_mixed_groups_forward_and_gradient(backend):
  """On one device flash_cpu reads each segment's packed qkv whole (no q/k/v slices): the output
  and the gradient of qkv equal attention by hand, segment by segment."""
  qkv, segments = _qkv(), ((4, 1), (8, 4), (2, 2), (2, 1))
  probe = jax.random.normal(jax.random.PRNGKey(1), qkv.shape[:2] + qkv.shape[3:])
  plain = lambda x: _by_hand(x, segments)
  mine = lambda x: ga.group_attention(x, ga.Groups(segments), backend)
  np.testing.assert_allclose(mine(qkv), plain(qkv), atol=2e-6)
  got = jax.jit(jax.grad(lambda x: jnp.sum(mine(x) * probe)))(qkv)
  want = jax.grad(lambda x: jnp.sum(plain(x) * probe))(qkv)
  np.testing.assert_allclose(got, want, atol=5e-6)


def _sharded(groups, backend, shape):
  mesh = sharding.make_mesh(AXES, shape)

  def fn(qkv):
    with sharding.use_mesh(mesh, RULES):
      return ga.group_attention(qkv, groups, backend)
  return jax.jit(fn)


@pytest.mark.parametrize('backend,shape', [
    ('xla', (1, 8, 1)),    # 8 batch shards: 2 kinds of shard, picked by lax.switch
    ('xla', (2, 1, 4)),    # context parallel: tokens over 4 devices, K/V all-gathered
    ('blocked', (2, 1, 4)),  # the XLA CPU loop with queries shorter than keys (context parallel)
    ('flash_cpu', (2, 1, 4)),  # the C++ CPU kernel, the same
    ('flash_cpu', (1, 8, 1)),  # ... in both branches of the lax.switch
    ('splash', (2, 2, 2)),  # the Pallas kernel (interpret mode) inside shard_map, both at once
])
def test_sharded_forward_and_gradient_equal_the_plain_computation(backend, shape):
  qkv = _qkv(n=32)
  groups = ga.Groups(((8, 4), (24, 1)))  # shards of 4: two of a group of 4, six of singles
  probe = jax.random.normal(jax.random.PRNGKey(1), (32, 16, 2, 8))
  plain = lambda x: ga.group_attention(x, groups, 'reference')
  fn = _sharded(groups, backend, shape)
  np.testing.assert_allclose(fn(qkv), plain(qkv), atol=2e-6)
  # Differentiated under jit, as in the train step (eager grad of a jitted shard_map after one
  # on another mesh trips a JAX 0.10 sharding-recovery cache).
  got = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) * probe)))(qkv)
  want = jax.grad(lambda x: jnp.sum(plain(x) * probe))(qkv)
  np.testing.assert_allclose(got, want, atol=5e-6)


def test_splash_traced_twice_needs_no_retrace_of_the_kernel():
  """The cached kernel holds concrete arrays: a second, different trace (train step, then the
  sampler) must not meet the first trace's tracers."""
  qkv = _qkv(n=4)
  first = jax.jit(lambda x: ga.group_attention(x, 2, 'splash'))(qkv)
  second = jax.jit(lambda x: 2.0 * ga.group_attention(x, 2, 'splash'))(qkv)
  third = jax.grad(lambda x: jnp.sum(ga.group_attention(x, 2, 'splash')))(qkv)
  np.testing.assert_allclose(second, 2.0 * first, rtol=1e-6)
  assert np.all(np.isfinite(third))


def test_auto_follows_the_platform_of_the_mesh_devices():
  mesh = sharding.make_mesh(AXES, (1, 8, 1))
  assert ga.mesh_platform(mesh) == 'cpu'
  assert attn.resolve_backend('auto', ga.mesh_platform(mesh)) == 'flash_cpu'
  assert attn.resolve_backend('auto', 'tpu') == 'splash'
