"""Startup checks of a (multi-process) job, run before any step.

Every process says where it is: its index, its devices and their positions in the mesh. Every
process must run the same resolved config and the same code: a hash of each is gathered from all
processes and compared with process 0's, and a mismatch (a stale checkout on one host, a flag
forgotten on another) stops the job with one line instead of training a silent mixture.
"""
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from groupdiff_jax import cli

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_DIGEST_BYTES = 32  # sha256


def code_version() -> str:
  """sha256 over the package's Python sources (relative paths and contents)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(PACKAGE_DIR):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')  # walk in a fixed order
    for name in sorted(f for f in files if f.endswith('.py')):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, PACKAGE_DIR).encode() + b'\0')
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the resolved config (overrides applied), independent of key order."""
  text = json.dumps(json.loads(config.to_json()), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def check_agree(what: str, digests: Sequence[str]) -> None:
  """Raises cli.UserError unless every process's digest (in process order) equals process 0's."""
  odd = [p for p, d in enumerate(digests) if d != digests[0]]
  if odd:
    raise cli.UserError(
        f'process(es) {", ".join(map(str, odd))} run a different {what} than process 0 '
        f'({digests[odd[0]][:12]} vs {digests[0][:12]}); start every process with the same code, config file and --config overrides')


def gather_digests(digests: Sequence[str]) -> list[list[str]]:
  """[process][i]: every process's hex `digests` (a collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  mine = np.frombuffer(b''.join(bytes.fromhex(d) for d in digests), np.uint8)
  table = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [[bytes(row[i * _DIGEST_BYTES:(i + 1) * _DIGEST_BYTES]).hex()
           for i in range(len(digests))] for row in table]


def check_processes(config: ml_collections.ConfigDict) -> None:
  """Stops the job (cli.UserError) unless all processes run the same config and code."""
  names = ('config', 'code version (groupdiff_jax sources)')
  table = gather_digests([config_hash(config), code_version()])
  for i, what in enumerate(names):
    check_agree(what, [row[i] for row in table])


def describe_process(mesh: Mesh) -> str:
  """'process i/P: N <platform> devices at mesh (axes) positions id@(..) ...' for this process."""
  me = jax.process_index()
  places = [f'{d.id}@({",".join(map(str, pos))})' for pos, d in np.ndenumerate(mesh.devices)
            if d.process_index == me]
  local = jax.local_devices()
  return (f'process {me}/{jax.process_count()}: {len(local)} local {local[0].platform} devices; '
          f'mesh ({",".join(mesh.axis_names)}) positions {" ".join(places)}')
