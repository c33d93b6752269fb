"""What importing the package sets for CPU runs before JAX starts: one XLA:CPU option
(groupdiff_jax/__init__.py), never over a value the user chose, and glibc's malloc options that
keep XLA's per-step scratch memory in the process (host_malloc.py)."""
import os
import subprocess
import sys

import jax
import pytest

import groupdiff_jax
from groupdiff_jax import host_malloc

FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'


def test_the_cpu_dot_flag_is_appended_unless_the_user_set_it(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  groupdiff_jax._set_cpu_flags()
  assert os.environ['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {FLAG}'
  groupdiff_jax._set_cpu_flags()  # idempotent
  assert os.environ['XLA_FLAGS'].count('ynn_fusion_type') == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  groupdiff_jax._set_cpu_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'


def test_this_process_started_jax_with_the_flag():
  """The test session imported the package before JAX's backend started: the flag is in force
  and XLA accepted it (an unknown flag or value would have stopped the process)."""
  assert FLAG in os.environ['XLA_FLAGS']
  assert jax.devices()[0].platform == 'cpu'


def test_malloc_settings_apply_where_jax_computes_on_the_cpu(monkeypatch):
  assert host_malloc.computes_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not host_malloc.computes_on_cpu({'JAX_PLATFORMS': 'tpu,cpu'})
  assert not host_malloc.computes_on_cpu({'JAX_PLATFORMS': 'cuda'})
  monkeypatch.setattr(host_malloc.importlib.util, 'find_spec', lambda name: object())
  assert not host_malloc.computes_on_cpu({})  # libtpu installed: JAX would pick the TPU
  assert host_malloc.computes_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not host_malloc.keep_host_memory({host_malloc.ENV: '0', 'JAX_PLATFORMS': 'cpu'})


_REUSE_PROBE = """
import ctypes, resource, threading
import groupdiff_jax
from groupdiff_jax import host_malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, []

def one_round():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(3):
  worker = threading.Thread(target=one_round)
  worker.start()
  worker.join()
print(host_malloc.applied, faults[-1], size // resource.getpagesize())
"""


@pytest.mark.parametrize('keep', ['1', '0'])
def test_freed_host_memory_is_reused_without_new_page_faults(keep):
  """A process that computes on the CPU imports the package with the malloc settings: a 256 MiB
  block malloc'd, written and freed on a worker thread (as XLA does its scratch) is served again
  from the process's heap, not from fresh pages. With GROUPDIFF_JAX_KEEP_HOST_MEMORY=0 (how the
  rest of this suite runs, see conftest.py) glibc maps and unmaps it each time, and every round
  faults in all 65536 pages."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', GROUPDIFF_JAX_KEEP_HOST_MEMORY=keep)
  out = subprocess.run([sys.executable, '-c', _REUSE_PROBE], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  applied, faults, pages = out[0] == 'True', int(out[1]), int(out[2])
  if keep == '1':
    assert applied and faults < 0.05 * pages, out
  else:
    assert not applied and faults > 0.9 * pages, out
