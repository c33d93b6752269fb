"""FSDP parameter specs on 8 CPU devices: a mesh axis that does not divide a parameter's named
dimension moves to one it divides, what fits nowhere is reported in one warning line, and each
scanned layer is gathered in the compute dtype right before use."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from flax import nnx
from jax.sharding import PartitionSpec as P

from groupdiff_jax import sharding, train_step
from groupdiff_jax.models import sit

RULES = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', None), ('heads', None),
         ('layers', None))


def mesh(shape):
  return sharding.make_mesh(('data', 'fsdp', 'context'), shape)


def test_divisible_dimension_is_sharded_where_the_rules_say():
  spec, unplaced = sharding.param_spec(('layers', 'embed', 'mlp'), (2, 32, 128), RULES,
                                       mesh((1, 8, 1)))
  assert (spec, unplaced) == (P(None, 'fsdp', None), ())


def test_axis_moves_to_the_largest_dimension_it_divides_but_never_to_layers():
  # 36 % 8 != 0: fsdp moves to the 144-wide dimension (as 1152 over 256 moves to 4608 in XL).
  spec, unplaced = sharding.param_spec(('layers', 'embed', 'mlp'), (8, 36, 144), RULES,
                                       mesh((1, 8, 1)))
  assert (spec, unplaced) == (P(None, None, 'fsdp'), ())
  spec, unplaced = sharding.param_spec(('layers', 'embed', 'heads'), (8, 36, 36), RULES,
                                       mesh((1, 8, 1)))
  assert (spec, unplaced) == (P(None, None, None), ('fsdp',))


def test_an_axis_group_that_fits_nowhere_keeps_its_largest_axis():
  rules = (('embed', ('data', 'fsdp')),)
  spec, unplaced = sharding.param_spec(('embed', None), (12, 6), rules, mesh((2, 4, 1)))
  assert (spec, unplaced) == (P('fsdp', None), ('data',))


def build_with(caplog, name):
  config = tiny_config(**{'model.name': name})
  with caplog.at_level(logging.WARNING):
    trainer = train_step.build(config, sharding.mesh_from_config(config))
  return trainer, [r.getMessage() for r in caplog.records if 'replicated' in r.getMessage()]


def test_parameters_left_replicated_are_named_in_one_warning(caplog):
  trainer, warnings = build_with(caplog, 'SiT-d2h36n2/2')  # hidden 36 over fsdp = 8
  assert len(warnings) == 1 and '\n' not in warnings[0]
  # qkv (36 x 108) and proj (36 x 36) kernels, proj / fc2 biases, the t-embedder's second kernel,
  # its first bias, the patch-embedding bias and the two tables (11 x 36, 4 x 36).
  assert warnings[0].startswith('sharding: 9 of 22 parameter arrays (12,420 values, 0.0 MiB')
  assert 'divisible by fsdp = 8' in warnings[0]
  blocks = trainer.state_shardings['params']['blocks']
  assert blocks['qkv']['kernel'].is_fully_replicated
  assert blocks['fc1']['kernel'].spec == P(None, None, 'fsdp')   # moved off the 36
  assert blocks['fc2']['kernel'].spec == P(None, 'fsdp', None)   # 'mlp' 144 took it
  assert blocks['adaLN_modulation']['kernel'].spec == P(None, None, 'fsdp')


def test_no_warning_when_the_mesh_divides_every_parameter(caplog):
  trainer, warnings = build_with(caplog, 'SiT-d2h32n2/2')
  assert warnings == []
  assert trainer.state_shardings['params']['blocks']['qkv']['kernel'].spec == P(None, 'fsdp', None)


def test_layer_is_gathered_whole_in_the_compute_dtype():
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=8, num_classes=10)
  m = mesh((2, 4, 1))
  graphdef, state = nnx.split(sit.create(cfg).blocks)
  shardings = sharding.param_shardings(state, m, RULES)
  values = jax.device_put(nnx.to_pure_dict(state), shardings)
  assert values['qkv']['kernel'].sharding.spec == P(None, 'fsdp', None)
  nnx.replace_by_pure_dict(state, values)

  def first_layer(state):
    layer = jax.tree.map(lambda v: v[0], state)
    return sharding.gather_for_compute(layer, jnp.bfloat16)

  with sharding.use_mesh(m, RULES):
    gathered = jax.jit(first_layer)(state)
  kernel = gathered['qkv']['kernel']
  assert kernel.dtype == jnp.bfloat16 and kernel.shape == (32, 96)
  assert kernel.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                np.asarray(values['qkv']['kernel'][0].astype(jnp.bfloat16),
                                           np.float32))
  del graphdef
  plain = jax.jit(first_layer)(state)  # outside use_mesh: only the cast
  assert plain['fc1']['kernel'].dtype == jnp.bfloat16


def test_gradient_through_the_gather_is_the_plain_cast_gradient_reduce_scattered():
  m = mesh((2, 4, 1))
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=8, num_classes=10)
  _, state = nnx.split(sit.create(cfg).blocks)
  state = nnx.state(state, lambda path, v: 'qkv' in path and path[-1] == 'kernel')
  kernel = jax.random.normal(jax.random.key(0), (2, 32, 96))
  nnx.replace_by_pure_dict(state, jax.device_put(
      {'qkv': {'kernel': kernel}}, sharding.param_shardings(state, m, RULES)))
  x = jax.random.normal(jax.random.key(1), (16, 32), jnp.bfloat16)

  def loss(state, gather):
    def layer(h, params):
      w = gather(params)['qkv']['kernel'] if gather else params['qkv']['kernel'][...]
      return jnp.tanh(h @ w[:, :32].astype(jnp.bfloat16)), None
    return jnp.sum(jax.lax.scan(layer, x, state)[0].astype(jnp.float32) ** 2)

  with sharding.use_mesh(m, RULES):
    grad = jax.jit(jax.grad(
        lambda s: loss(s, lambda p: sharding.gather_for_compute(p, jnp.bfloat16))))(state)
  plain = jax.jit(jax.grad(lambda s: loss(s, None)))(state)
  g, ref = grad['qkv']['kernel'][...], plain['qkv']['kernel'][...]
  assert g.dtype == jnp.float32 and g.sharding.spec == P(None, 'fsdp', None)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=2e-2, atol=1e-2)
  assert np.abs(np.asarray(g)).max() > 0


def test_fit_proposes_the_largest_fsdp_size_that_shards_every_parameter():
  from groupdiff_jax.compilation import fit  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{'model.name': 'SiT-d2h36n2/2'})  # 36 over fsdp = 8 does not divide
  assert fit.proposals(config, jax.devices()) == [
      {'mesh.shape': (2, 4, 1)}, {'model.remat': True},
      {'mesh.shape': (2, 4, 1), 'model.remat': True}]
  assert fit.proposals(tiny_config(), jax.devices()) == [{'model.remat': True}]
  assert fit.flags_for({'mesh.shape': (2, 4, 1), 'model.remat': True}) == \
      "--config.mesh.shape='(2, 4, 1)' --config.model.remat=True"
