"""Dense layers with the CPU kernel's gradients (models/dense.py, kernels/dense.cc) against XLA's
own differentiation: the op alone, the SiT blocks, on one device and on a mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from groupdiff_jax import sharding
from groupdiff_jax.models import dense, sit

AXES = ('data', 'fsdp', 'context')
RULES = (('batch', ('data', 'fsdp')), ('tokens', 'context'))


def _grads(fn, x, kernel, bias, probe):
  return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * probe), argnums=(0, 1, 2)))(x, kernel, bias)


@pytest.mark.parametrize('x_shape,n', [
    ((2, 300, 40), 48),   # K not a multiple of the 6-row tile, N not of the 4-vector strip
    ((520, 384), 16),     # rows past two whole 256-row chunks; one vector of columns
    ((1, 259, 7), 160),   # K below one tile; many strips
    ((300, 770), 32),     # K over two 384-row blocks of dW, the last one ragged; dx: 12 whole
                          # 64-column panels, then 2 columns of dot products
    ((3, 100, 130), 400),  # dx: N over one 384-deep chunk; panels of 64, 64 and a 2-column tail
])
def test_kernel_gradients_equal_xla(x_shape, n):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], x_shape)
  kernel = jax.random.normal(keys[1], (x_shape[-1], n)) / np.sqrt(x_shape[-1])
  bias = jax.random.normal(keys[2], (n,))
  probe = jax.random.normal(keys[3], (*x_shape[:-1], n))
  assert dense.kernel_fits(x, kernel)
  np.testing.assert_array_equal(dense.dense(x, kernel, bias), dense._affine(x, kernel, bias))
  got = _grads(dense.dense, x, kernel, bias, probe)
  want = _grads(dense._affine, x, kernel, bias, probe)
  for g, w in zip(got, want):  # float32 sums over up to 600 rows in another order
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5 * float(jnp.abs(w).max()))


def test_kernel_under_vmap_and_what_it_declines():
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  x = jax.random.normal(keys[0], (3, 256, 24))
  kernel = jax.random.normal(keys[1], (3, 24, 32))
  probe = jax.random.normal(keys[2], (3, 256, 32))
  bias = jnp.zeros((3, 32))
  per_example = lambda fn: jax.vmap(lambda *a: _grads(fn, *a))(x, kernel, bias, probe)
  for g, w in zip(per_example(dense.dense), per_example(dense._affine)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  assert not dense.kernel_fits(x[0], kernel[0, :, :20])        # N not a multiple of 16
  assert not dense.kernel_fits(x[0, :255], kernel[0])          # too few rows
  assert not dense.kernel_fits(x[0].astype(jnp.bfloat16), kernel[0])


def test_auto_picks_the_kernel_on_one_cpu_device_only():
  assert dense.resolve_grads('auto', 'cpu') == 'cpu_kernel'
  assert dense.resolve_grads('auto', 'tpu') == 'xla' and dense.resolve_grads('auto', 'gpu') == 'xla'
  with sharding.use_mesh(sharding.make_mesh(AXES, (1, 1, 1), jax.devices()[:1]), RULES):
    assert dense.resolve_grads('auto', 'cpu') == 'cpu_kernel'
  with sharding.use_mesh(sharding.make_mesh(AXES, (2, 4, 1)), RULES):
    assert dense.resolve_grads('auto', 'cpu') == 'xla'  # no partitioning rule for the call
  assert dense.resolve_grads('xla', 'cpu') == 'xla'
  with pytest.raises(ValueError, match="'cpu_kernel' runs on CPU only, not on tpu"):
    dense.resolve_grads('cpu_kernel', 'tpu')
  with pytest.raises(ValueError, match="unknown model.dense_grads 'fast'"):
    dense.resolve_grads('fast', 'cpu')
  model_cfg = ml_collections.ConfigDict(dict(
      name='SiT-S/2', input_size=32, in_channels=4, num_classes=10, learn_sigma=False,
      max_group_size=4, fixed_sample_ids=False, attention='auto', dtype='float32',
      param_dtype='float32', remat=False, residuals='auto', dense_grads='fast',
      time_convention='noise_at_1'))
  with pytest.raises(sit.ModelConfigError, match="unknown model.dense_grads 'fast'"):
    sit.config_from(model_cfg)


def _model(dense_grads, residuals):
  # 16x16 latents, patch 2: 64 tokens x 8 images = 512 rows, enough for the kernel; every N
  # (qkv 96, fc1 128, proj/fc2/embedding 32, output 16) a multiple of 16.
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=16, in_channels=4,
                      num_classes=10, dtype='float32', residuals=residuals,
                      dense_grads=dense_grads)
  model = sit.create(cfg, seed=0)
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)  # random weights: the zero-init layers must matter
  keys = jax.random.split(jax.random.PRNGKey(42), len(leaves))
  leaves = [0.2 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def _loss_and_grad(dense_grads, residuals, mesh=None):
  graphdef, params = _model(dense_grads, residuals)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
  x, t = jax.random.normal(k1, (8, 16, 16, 4)), jax.random.uniform(k2, (8,))
  y = jax.random.randint(k3, (8,), 0, 11)
  groups = sit.Groups(((4, 1), (4, 4)))
  ids = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])

  def loss(params):
    out = nnx.merge(graphdef, params)(x, t, y, group_size=groups, sample_ids=ids)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  def run(params):
    if mesh is None:
      return jax.value_and_grad(loss)(params)
    with sharding.use_mesh(mesh, RULES):
      return jax.value_and_grad(loss)(params)
  jaxpr = str(jax.make_jaxpr(run)(params))
  return jaxpr, jax.jit(run)(params)


@pytest.mark.parametrize('residuals,mesh_shape', [
    ('dots', None),       # CPU's 'auto' residuals: the kernel path's outputs must be kept
    ('all', None),
    ('dots', (2, 4, 1)),  # named explicitly on an 8-device mesh: still right (operands gathered)
])
def test_sit_gradients_with_the_kernel_equal_xla(residuals, mesh_shape):
  mesh = sharding.make_mesh(AXES, mesh_shape) if mesh_shape else None
  xla_jaxpr, (want_loss, want) = _loss_and_grad('xla', residuals, mesh)
  jaxpr, (got_loss, got) = _loss_and_grad('cpu_kernel', residuals, mesh)
  assert 'groupdiff_dense_backward' not in xla_jaxpr
  # every block's qkv, proj, fc1, fc2, plus the patch embedding and the output layer
  assert jaxpr.count('groupdiff_dense_backward') >= 4 + 2
  assert ('policy=' in jaxpr) == (residuals == 'dots')  # jax.checkpoint around the sublayers
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  jax.tree.map(close, got, want)


def test_policy_keeps_the_kernel_outputs_only_where_it_is_used():
  cfg = sit.SiTConfig(depth=1, hidden=8, heads=1, patch=2, dense_grads='xla')
  assert sit.sublayer_policy(cfg, 'cpu') is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  with_kernel = sit.sublayer_policy(dataclasses.replace(cfg, dense_grads='auto'), 'cpu')
  assert with_kernel not in (None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert sit.sublayer_policy(dataclasses.replace(cfg, dense_grads='auto'), 'tpu') is None
