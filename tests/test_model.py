"""SiT/DiT backbone facts and the GroupDiff change (group attention, sample embedding)."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from groupdiff_jax.models import sit


def _count(name, learn_sigma, max_group_size=0):
  _, depth, hidden, heads, patch = sit.parse_name(name)
  cfg = sit.SiTConfig(depth=depth, hidden=hidden, heads=heads, patch=patch,
                      learn_sigma=learn_sigma, max_group_size=max_group_size)
  return sit.count_params(jax.eval_shape(lambda: sit.create(cfg))), hidden


@pytest.mark.parametrize('name,learn_sigma,expected', [
    ('SiT-XL/2', False, 674_816_272),
    ('DiT-XL/2', True, 674_834_720),
])
def test_official_parameter_counts(name, learn_sigma, expected):
  count, hidden = _count(name, learn_sigma)
  assert count == expected
  assert _count(name, learn_sigma, max_group_size=4)[0] == expected + 4 * hidden


def _tiny(max_group_size=4, **kw):
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=8, in_channels=4,
                      num_classes=10, dtype='float32', max_group_size=max_group_size, **kw)
  model = sit.create(cfg, seed=0)
  # Official init zeroes adaLN and the final layer (output 0): randomise so outputs mean something.
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(42), len(leaves))
  leaves = [0.2 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), cfg


def _inputs(n=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (n, 8, 8, 4)), jax.random.uniform(k2, (n,)),
          jax.random.randint(k3, (n,), 0, 11))


def test_output_is_zero_at_official_init():
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=8, num_classes=10,
                      dtype='float32')
  out = sit.create(cfg)(*_inputs(), group_size=4, rng=jax.random.PRNGKey(0))
  assert out.shape == (8, 8, 8, 4)
  np.testing.assert_array_equal(out, 0.0)


def test_official_initialisation():
  cfg = sit.SiTConfig(depth=3, hidden=64, heads=4, patch=2, input_size=8, num_classes=10)
  params = nnx.to_pure_dict(nnx.state(sit.create(cfg), nnx.Param))
  qkv = np.asarray(params['blocks']['qkv']['kernel'])
  assert qkv.shape == (3, 64, 192)
  bound = math.sqrt(6 / (64 + 192))  # xavier uniform of the (D, 3D) matrix
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  patch = np.asarray(params['x_embedder']['kernel'])  # xavier on the dense (C*p*p, D) view
  assert np.abs(patch).max() <= math.sqrt(6 / (16 + 64))
  for table in (params['y_embedder']['embedding_table'], params['sample_embedder']['embedding_table'],
                params['t_embedder']['mlp_0']['kernel']):
    assert abs(float(np.std(table)) - 0.02) < 0.004
  assert params['y_embedder']['embedding_table'].shape == (11, 64)  # + null class
  for zeroed in (params['blocks']['adaLN_modulation'], params['final_layer']['adaLN_modulation'],
                 params['final_layer']['linear']):
    assert not np.any(zeroed['kernel']) and not np.any(zeroed['bias'])
  for bias in (params['blocks']['fc1']['bias'], params['x_embedder']['bias']):
    assert not np.any(bias)


def test_position_embedding_matches_formula():
  table = sit.sincos_pos_embed(8, 2)  # hidden 8: 2 frequencies per (sin, cos) x (col, row)
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  token = 1 * 2 + 0  # row 1, column 0
  col, row = 0.0, 1.0
  want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                         np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(table[token], want, rtol=1e-6)


def test_timestep_features_are_cos_then_sin():
  feats = sit.timestep_features(jnp.array([0.5]), dim=4)
  freqs = np.exp(-np.log(10000) * np.arange(2) / 2)
  np.testing.assert_allclose(feats[0], np.concatenate([np.cos(0.5 * freqs), np.sin(0.5 * freqs)]),
                             rtol=1e-6)


def test_group_size_one_equals_plain_sit():
  grouped, _ = _tiny(max_group_size=4)
  plain = nnx.merge(*nnx.split(_tiny(max_group_size=0)[0]))
  # Same backbone weights; the GroupDiff model's sample table zeroed makes it plain SiT.
  g_state = nnx.to_pure_dict(nnx.state(grouped))
  p_state = nnx.to_pure_dict(nnx.state(plain))
  g_state = {k: v for k, v in g_state.items() if k != 'sample_embedder'}
  nnx.update(plain, jax.tree.map(jnp.asarray, g_state))
  grouped.sample_embedder.embedding_table[...] = jnp.zeros_like(
      grouped.sample_embedder.embedding_table[...])
  x, t, y = _inputs()
  want = plain(x, t, y, group_size=1)
  np.testing.assert_array_equal(grouped(x, t, y, group_size=1, rng=jax.random.PRNGKey(3)), want)
  assert set(p_state) == set(g_state)
  # And each image alone gives the same output as in the batch: no cross-image mixing at M=1.
  np.testing.assert_allclose(plain(x[:1], t[:1], y[:1]), want[:1], rtol=1e-5, atol=1e-6)


def test_permuting_a_group_permutes_outputs():
  model, _ = _tiny()
  x, t, y = _inputs()
  ids = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])
  out = model(x, t, y, group_size=4, sample_ids=ids)
  perm = np.array([2, 0, 3, 1, 5, 7, 4, 6])  # within each group of 4
  out_p = model(x[perm], t[perm], y[perm], group_size=4, sample_ids=ids[perm])
  np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-5)


def test_images_interact_only_within_their_group():
  model, _ = _tiny()
  x, t, y = _inputs()
  ids = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
  out = model(x, t, y, group_size=4, sample_ids=ids)
  x2 = x.at[5].add(1.0)  # change one image of the second group
  out2 = model(x2, t, y, group_size=4, sample_ids=ids)
  np.testing.assert_array_equal(out2[:4], out[:4])               # first group untouched
  for i in (4, 6, 7):                                            # its group-mates change
    assert float(jnp.abs(out2[i] - out[i]).max()) > 1e-3
  # With group size 1 nobody else changes.
  solo = model(x, t, y, group_size=1, sample_ids=ids)
  solo2 = model(x2, t, y, group_size=1, sample_ids=ids)
  np.testing.assert_array_equal(np.delete(np.asarray(solo2), 5, 0), np.delete(np.asarray(solo), 5, 0))


def test_sample_ids_are_a_fresh_permutation_per_group_and_call():
  model, _ = _tiny()
  a = np.asarray(model.sample_ids(16, 4, jax.random.PRNGKey(0))).reshape(4, 4)
  b = np.asarray(model.sample_ids(16, 4, jax.random.PRNGKey(1))).reshape(4, 4)
  for row in np.concatenate([a, b]):
    assert sorted(row) == [0, 1, 2, 3]
  assert not np.array_equal(a, b)
  singles = np.asarray(model.sample_ids(64, 1, jax.random.PRNGKey(2)))
  assert set(singles) == {0, 1, 2, 3}  # group size 1: a random id from the whole table
  x, t, y = _inputs()
  r1 = model(x, t, y, group_size=4, rng=jax.random.PRNGKey(0))
  r2 = model(x, t, y, group_size=4, rng=jax.random.PRNGKey(1))
  assert float(jnp.abs(r1 - r2).max()) > 0  # the ids reach the output through adaLN


def test_fixed_sample_ids_option():
  model, _ = _tiny(fixed_sample_ids=True)
  np.testing.assert_array_equal(model.sample_ids(8, 4, None), [0, 1, 2, 3, 0, 1, 2, 3])
  x, t, y = _inputs()
  np.testing.assert_array_equal(model(x, t, y, group_size=4),
                                model(x, t, y, group_size=4, sample_ids=jnp.tile(jnp.arange(4), 2)))


def test_learn_sigma_and_noise_at_0_convention():
  model, cfg = _tiny(learn_sigma=True)
  x, t, y = _inputs()
  ids = jnp.zeros(8, jnp.int32)
  out = model(x, t, y, group_size=1, sample_ids=ids)
  assert out.shape == (8, 8, 8, 8)
  flipped = sit.SiT.__new__(sit.SiT)
  flipped.__dict__.update(model.__dict__)
  flipped.cfg = sit.SiTConfig(**{**cfg.__dict__, 'time_convention': 'noise_at_0'})
  out0 = flipped(x, 1.0 - t, y, group_size=1, sample_ids=ids)
  np.testing.assert_allclose(out0[..., :4], -out[..., :4], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out0[..., 4:], out[..., 4:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bad,message', [
    ('SiT-XXL/2', 'unknown model name'), ('GiT-XL/2', 'unknown model name'), ('SiT-XL', 'unknown'),
])
def test_unknown_model_names(bad, message):
  with pytest.raises(sit.ModelConfigError, match=message):
    sit.parse_name(bad)


def test_sizes_by_name():
  assert sit.parse_name('SiT-XL/2') == ('SiT', 28, 1152, 16, 2)
  assert sit.parse_name('DiT-B/4') == ('DiT', 12, 768, 12, 4)
  assert sit.parse_name('SiT-S/8') == ('SiT', 12, 384, 6, 8)
  assert sit.parse_name('SiT-L/2')[1:4] == (24, 1024, 16)


def test_bad_group_sizes():
  model, _ = _tiny()
  x, t, y = _inputs(6)
  with pytest.raises(ValueError, match='group size 4 does not divide the batch of 6'):
    model(x, t, y, group_size=4, rng=jax.random.PRNGKey(0))
  x, t, y = _inputs(8)
  with pytest.raises(ValueError, match='exceeds model.max_group_size'):
    model(x, t, y, group_size=8, rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='pass rng'):
    model(x, t, y, group_size=4)


def test_mixed_groups_in_one_pass_equal_one_call_per_group_size():
  """GroupDiff training's one pass (singles and groups of 4 in one batch) is the two calls."""
  model, _ = _tiny()
  x, t, y = _inputs(8)
  ids = jnp.array([0, 2, 3, 1, 0, 1, 2, 3])
  groups = sit.Groups(((2, 1), (4, 4), (2, 2)))
  out = model(x, t, y, group_size=groups, sample_ids=ids)
  # Outputs are O(1-5); XLA's CPU dots block differently for 8 rows than for 2 or 4, which moves
  # float32 results by a few 1e-6 with any attention kernel (a wrong grouping moves them by O(1)).
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:2], model(x[:2], t[:2], y[:2], group_size=1, sample_ids=ids[:2]),
                             **tol)
  np.testing.assert_allclose(out[2:6], model(x[2:6], t[2:6], y[2:6], group_size=4,
                                             sample_ids=ids[2:6]), **tol)
  np.testing.assert_allclose(out[6:], model(x[6:], t[6:], y[6:], group_size=2,
                                            sample_ids=ids[6:]), **tol)


@pytest.mark.parametrize('shape', [(2, 1, 4), (1, 2, 4)])
def test_context_parallel_model_equals_the_unsharded_model(shape):
  """Tokens over 4 'context' devices (each holds 4 of every image's 16 tokens; queries meet the
  all-gathered keys of the whole group), groups over the batch axes: forward and gradient."""
  from groupdiff_jax import sharding  # pylint: disable=import-outside-toplevel
  model, _ = _tiny()
  graphdef, params = nnx.split(model)
  x, t, y = _inputs(8)
  ids = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])
  mesh = sharding.make_mesh(('data', 'fsdp', 'context'), shape)
  rules = (('batch', ('data', 'fsdp')), ('tokens', 'context'), ('embed', None), ('heads', None))

  def loss(params, x):
    out = nnx.merge(graphdef, params)(x, t, y, group_size=4, sample_ids=ids)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  def sharded(params, x):
    with sharding.use_mesh(mesh, rules):
      return jax.value_and_grad(loss)(params, x)

  assert 'all_gather' in str(jax.make_jaxpr(sharded)(params, x))  # K/V really are gathered
  want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(params, x)
  got_loss, got_grad = jax.jit(sharded)(params, x)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               got_grad, want_grad)


def _jaxpr_of_gradient(residuals: str, remat: bool = False) -> tuple[str, dict]:
  model, _ = _tiny(residuals=residuals, remat=remat)
  graphdef, params = nnx.split(model)
  x, t, y = _inputs(8)
  ids = jnp.array([0, 1, 2, 3, 3, 2, 1, 0])
  groups = sit.Groups(((4, 1), (4, 4)))

  def loss(params):
    out = nnx.merge(graphdef, params)(x, t, y, group_size=groups, sample_ids=ids)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
  return str(jax.make_jaxpr(jax.grad(loss))(params)), jax.jit(jax.grad(loss))(params)


def test_saving_only_the_dense_outputs_gives_the_same_gradients():
  """model.residuals='dots' (CPU's 'auto') recomputes the elementwise parts of each block in the
  backward pass, attention keeps its own residuals, and the gradients do not change."""
  all_jaxpr, want = _jaxpr_of_gradient('all')
  dots_jaxpr, got = _jaxpr_of_gradient('dots')
  assert 'policy=' not in all_jaxpr and 'policy=' in dots_jaxpr  # jax.checkpoint's policy
  assert dots_jaxpr.count('custom_vjp_call') == all_jaxpr.count('custom_vjp_call')
  # float32 sums in another order: agreement to ~1e-6 of each gradient's scale
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
  jax.tree.map(close, got, want)
  _, full = _jaxpr_of_gradient('dots', remat=True)  # remat wins: the whole block recomputed
  jax.tree.map(close, full, want)


def test_residuals_auto_picks_per_platform_and_names_are_checked():
  cfg = sit.SiTConfig(depth=1, hidden=8, heads=1, patch=2, dense_grads='xla')  # see test_dense
  for platform in ('cpu', 'gpu', 'cuda'):
    assert sit.sublayer_policy(cfg, platform) is (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert sit.sublayer_policy(cfg, 'tpu') is None
  assert sit.sublayer_policy(dataclasses.replace(cfg, residuals='all'), 'cpu') is None
  with pytest.raises(sit.ModelConfigError, match="unknown model.residuals 'some'"):
    sit.config_from(_model_block(residuals='some'))


def _model_block(**fields) -> ml_collections.ConfigDict:
  """A `config.model` block of SiT-S/2 with these fields set."""
  return ml_collections.ConfigDict(dict(
      name='SiT-S/2', input_size=32, in_channels=4, num_classes=10, learn_sigma=False,
      max_group_size=4, fixed_sample_ids=False, attention='auto', dtype='float32',
      param_dtype='float32', remat=False, time_convention='noise_at_1', **fields))


def _output_and_gradient(layer_loop: str, training: bool, **call):
  model, _ = _tiny(layer_loop=layer_loop)
  graphdef, params = nnx.split(model)
  x, t, y = _inputs(8)

  def loss(params):
    out = nnx.merge(graphdef, params)(x, t, y, group_size=4, rng=jax.random.PRNGKey(3),
                                      training=training, **call)
    out = out[0] if call.get('return_attention_mass') else out
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(params))
  return jaxpr, jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.mark.parametrize('call', [{}, {'group_blocks': 1}])
def test_unrolled_layers_equal_the_scan(call):
  """model.layer_loop='unrolled' (the CPU train step's 'auto') runs the blocks as a Python loop:
  the same outputs and gradients as the scan over the stacked layers."""
  scan_jaxpr, (want_grad, want_out) = _output_and_gradient('scan', True, **call)
  loop_jaxpr, (got_grad, got_out) = _output_and_gradient('unrolled', False, **call)
  assert 'scan[' in scan_jaxpr and 'scan[' not in loop_jaxpr
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
  jax.tree.map(close, got_grad, want_grad)
  model, _ = _tiny(layer_loop='unrolled')
  x, t, y = _inputs(8)
  _, mass = model(x, t, y, group_size=4, rng=jax.random.PRNGKey(3), return_attention_mass=True)
  _, want_mass = _tiny(layer_loop='scan')[0](x, t, y, group_size=4, rng=jax.random.PRNGKey(3),
                                             return_attention_mass=True)
  assert mass.shape == (2, 2, 4, 4)  # [depth, groups, M, M], stacked as the scan stacks it
  np.testing.assert_allclose(mass, want_mass, rtol=1e-5, atol=1e-6)


def test_layer_loop_auto_unrolls_only_the_cpu_train_step():
  cfg = sit.SiTConfig(depth=1, hidden=8, heads=1, patch=2)
  assert sit.unrolled_layers(cfg, 'cpu', training=True)
  assert not sit.unrolled_layers(cfg, 'cpu', training=False)  # forwards: compile time only
  for platform in ('tpu', 'gpu', 'cuda'):
    assert not sit.unrolled_layers(cfg, platform, training=True)
  assert sit.unrolled_layers(dataclasses.replace(cfg, layer_loop='unrolled'), 'tpu', False)
  assert not sit.unrolled_layers(dataclasses.replace(cfg, layer_loop='scan'), 'cpu', True)
  with pytest.raises(sit.ModelConfigError, match="unknown model.layer_loop 'while'; known: auto"):
    sit.config_from(_model_block(layer_loop='while'))
