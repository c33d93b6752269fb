"""One process of tests/test_multiprocess.py's batch check (not a test module itself):

  python tests/multiprocess_batches.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Joins a localhost jax.distributed job, builds the trainer's batch shardings on a mesh over a
deliberately permuted device list (the same permutation in every process), reads this process's
rows of three digits GroupDiff-f batches as train.py does, assembles the global arrays and checks
them against the plan that a single process computes on its own: every addressable shard holds
what the sharding's index map names, and the global batch, gathered from all processes, is the
planned ids' images and labels in layout order. Prints 'rows: ...' (this process's plan rows)
and 'checked N batches'.
"""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_config  # pylint: disable=wrong-import-position

from groupdiff_jax import sharding, train_step  # pylint: disable=wrong-import-position
from groupdiff_jax.data import pipeline  # pylint: disable=wrong-import-position

# GroupDiff-f (conditional groups as large as unconditional ones) on the digits, batch rows over
# ('fsdp', 'data') of a (2, 4, 1) mesh.
CONFIG = {'data.source': 'digits', 'data.image_size': 8, 'model.in_channels': 1,
          'group.cond_size': 4, 'group.uncond_size': 4, 'mesh.shape': (2, 4, 1),
          'mesh.rules': (('batch', ('fsdp', 'data')), ('tokens', 'context'), ('embed', 'fsdp'),
                         ('mlp', None), ('heads', None), ('layers', None), ('vocab', None))}
STEPS = 3


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes, process_id)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  config = tiny_config(**CONFIG)
  devices = np.random.default_rng(1).permutation(np.array(jax.devices()))
  mesh = jax.sharding.Mesh(devices.reshape(config.mesh.shape), config.mesh.axes)
  trainer = train_step.build(config, mesh)
  layout = trainer.layout
  shapes = {'image': (layout.global_batch, 8, 8, 1), 'label': (layout.global_batch,)}
  rows = sharding.batch_rows(trainer.batch_shardings['image'], shapes['image'])
  print('rows:', ' '.join(map(str, rows)), flush=True)
  data = pipeline.make_train_data(config, layout, workdir=workdir, rows=rows)
  reference = pipeline.make_train_data(config, layout, workdir=workdir)  # every row, one process
  source = reference.source

  for step in range(STEPS):
    local, expected = next(data), next(reference)
    ids = reference.global_ids(step)
    assert len(set(ids.tolist())) == len(ids), ids
    np.testing.assert_array_equal(expected['label'], source.labels[ids])
    np.testing.assert_array_equal(expected['image'], np.stack([source[i][0] for i in ids]))
    for key, shape in shapes.items():
      batch = sharding.assemble_batch(trainer.batch_shardings[key], shape, rows, local[key])
      index_map = trainer.batch_shardings[key].devices_indices_map(shape)
      for shard in batch.addressable_shards:  # each device holds the rows its index map names
        np.testing.assert_array_equal(shard.data, expected[key][index_map[shard.device]])
      whole = multihost_utils.process_allgather(batch, tiled=True)  # the global batch
      np.testing.assert_array_equal(whole, expected[key])
  print(f'checked {STEPS} batches', flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
