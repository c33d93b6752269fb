"""Batch assembly from the sharding's index map, and the startup checks (one process, 8 CPU
devices; tests/test_multiprocess.py runs real processes)."""
import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import tiny_config
from groupdiff_jax import cli, multihost, sharding
from groupdiff_jax.data import pipeline
from groupdiff_jax.layout import layout_from_config


def _permuted_mesh(config, seed=0):
  """A (data=2, fsdp=4) mesh over a shuffled device list: the batch rows of devices 0-3 (one
  'process') are scattered across the batch axis, as a topology-ordered mesh may do."""
  devices = np.random.default_rng(seed).permutation(np.array(jax.devices()))
  return Mesh(devices.reshape(2, 4, 1), config.mesh.axes)


@pytest.mark.parametrize('seed', [0, 1])
def test_global_batch_is_the_plan_in_layout_order_on_a_permuted_mesh(seed):
  config = tiny_config(**{'mesh.shape': (2, 4, 1)})
  layout = layout_from_config(config)
  mesh = _permuted_mesh(config, seed)
  shapes = {'image': (16, 8, 8, 4), 'label': (16,)}
  shardings = {k: sharding.batch_sharding(mesh, config.mesh.rules, len(s))
               for k, s in shapes.items()}
  # Two simulated processes: devices 0-3 and 4-7, each reading only its devices' rows.
  processes = [[d for d in jax.devices() if d.id // 4 == p] for p in range(2)]
  rows = [sharding.batch_rows(shardings['image'], shapes['image'], devices) for devices in processes]
  assert sorted(np.concatenate(rows).tolist()) == list(range(16))
  assert not np.array_equal(rows[0], np.arange(8))  # not the process-index slice: the hazard
  streams = [pipeline.make_train_data(config, layout, rows=r) for r in rows]
  reference = pipeline.make_train_data(config, layout)  # one process, every row
  source = reference.source

  for step in range(2):
    locals_ = [next(s) for s in streams]
    batch = {}
    for key, shape in shapes.items():
      blocks = {}
      for devices, r, local in zip(processes, rows, locals_):
        blocks.update(sharding.device_blocks(shardings[key], shape, r, local[key], devices))
      batch[key] = jax.make_array_from_single_device_arrays(
          shape, shardings[key], [jax.device_put(b, d) for d, b in blocks.items()])

    # Row r of the global batch is plan row r: the planned ids' images and labels, in order...
    ids = reference.global_ids(step)
    expected = next(reference)
    np.testing.assert_array_equal(expected['label'], np.asarray(source.labels)[ids])
    for key in shapes:
      np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
      # ...and each device holds exactly the rows its index map names.
      index_map = shardings[key].devices_indices_map(shapes[key])
      for shard in batch[key].addressable_shards:
        np.testing.assert_array_equal(shard.data, expected[key][index_map[shard.device]])


def test_assemble_batch_one_process_equals_process_local_placement():
  config = tiny_config(**{'mesh.shape': (2, 4, 1)})
  mesh = _permuted_mesh(config)
  sh = sharding.batch_sharding(mesh, config.mesh.rules, 4)
  local = np.random.default_rng(0).standard_normal((16, 8, 8, 4)).astype(np.float32)
  rows = sharding.batch_rows(sh, local.shape)
  np.testing.assert_array_equal(rows, np.arange(16))
  ours = sharding.assemble_batch(sh, local.shape, rows, local)
  theirs = jax.make_array_from_process_local_data(sh, local)
  assert ours.sharding == theirs.sharding
  for a, b in zip(ours.addressable_shards, theirs.addressable_shards):
    assert a.device == b.device
    np.testing.assert_array_equal(a.data, b.data)


def test_device_blocks_refuses_rows_a_device_does_not_have():
  config = tiny_config(**{'mesh.shape': (2, 4, 1)})
  sh = sharding.batch_sharding(_permuted_mesh(config), config.mesh.rules, 1)
  with pytest.raises(ValueError, match='not among `rows`'):
    sharding.device_blocks(sh, (16,), np.arange(8), np.zeros(8))


# --- startup checks ---------------------------------------------------------------------------

def test_check_agree_passes_equal_digests_and_names_the_odd_process():
  a, b = multihost.config_hash(tiny_config()), multihost.config_hash(tiny_config(seed=1))
  assert a != b and len(a) == 64
  multihost.check_agree('config', [a, a, a])
  with pytest.raises(cli.UserError, match=r'^process\(es\) 2 run a different config than process '
                     rf'0 \({b[:12]} vs {a[:12]}\); start every process with the same code'):
    multihost.check_agree('config', [a, a, b])


def test_single_process_check_runs_and_passes():
  config = tiny_config()
  digests = [multihost.config_hash(config), multihost.code_version()]
  assert multihost.gather_digests(digests) == [digests]
  multihost.check_processes(config)
  # The hash is of the resolved config, not of key order or of the object.
  assert multihost.config_hash(tiny_config()) == digests[0]


def test_describe_process_lists_every_local_device_with_its_mesh_position():
  config = tiny_config(**{'mesh.shape': (2, 4, 1)})
  mesh = _permuted_mesh(config)
  line = multihost.describe_process(mesh)
  assert line.startswith('process 0/1: 8 local cpu devices; mesh (data,fsdp,context) positions ')
  first = mesh.devices[0, 0, 0]
  assert f' {first.id}@(0,0,0)' in line and len(line.split('@')) == 9


# --- TPU multislice ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SliceDevice:
  """Stands in for a TPU device of a multislice job (all device_grid reads of one)."""
  id: int
  slice_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'
  process_index: int = 0


def test_multislice_grid_puts_each_slice_on_its_own_data_rows():
  devices = [_SliceDevice(i, i // 4) for i in (4, 5, 6, 7, 0, 1, 2, 3)]  # 2 slices of 4
  grid = sharding.device_grid((2, 4, 1), devices, ('data', 'fsdp', 'context'))
  assert grid.shape == (2, 4, 1)
  assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
  grid = sharding.device_grid((4, 2, 1), devices)  # 2 data rows per slice
  assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {0}, {1}, {1}]
  with pytest.raises(sharding.MeshError, match=r'2 TPU slices: the first mesh axis \(data=1\) '
                     r'must be a multiple of the slice count, e\.g\. --config\.mesh\.shape='):
    sharding.device_grid((1, 8, 1), devices)
