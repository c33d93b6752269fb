"""Group attention lowers for real TPU slices (libtpu's topology descriptions, compiled on the CPU
host): the train step with splash (and 'auto', which must pick splash from the mesh's devices
although this host's backend is CPU) compiles on multi-chip meshes that shard the batch, the
Mosaic kernel running inside shard_map. Needs libtpu (pip install -e .[aot]); skips without it."""
import pytest
from conftest import tiny_config

from groupdiff_jax import sharding, train_step
from groupdiff_jax.compilation import programs, topology

pytestmark = pytest.mark.aot


@pytest.mark.parametrize('slice_name,mesh_shape,attention', [
    ('v5e:2x2', (1, -1, 1), 'splash'),
    ('v5p:2x2x2', (2, -1, 1), 'auto'),
])
def test_train_step_with_splash_compiles_for_a_multi_chip_slice(slice_name, mesh_shape, attention):
  config = tiny_config(**{'model.attention': attention, 'model.dtype': 'bfloat16',
                          'mesh.shape': mesh_shape, 'data.global_batch': 32})
  devices = topology.devices(topology.parse(slice_name))
  trainer = train_step.build(config, sharding.mesh_from_config(config, devices))
  assert trainer.batch_shards == len(devices)  # 32 images: whole groups on every chip
  compiled = programs.compile_train(trainer, config).compiled
  text = compiled.as_text()
  assert 'tpu_custom_call' in text  # the splash kernel, not an XLA fallback
  memory = compiled.memory_analysis()
  assert 0 < memory.argument_size_in_bytes < 2**30
