"""glibc malloc options for processes that compute on the CPU, set when the package is imported.

XLA:CPU allocates each execution's scratch memory (1.1 GB for SiT-S/2's train step at batch 16)
on one of its worker threads and frees it when the step ends. glibc serves an allocation that
large with a fresh mmap outside the thread's arena and unmaps it on free, so every step faults in
and zeroes 270k new pages: 0.5 s of system time per 4 s step on two cores (BENCHMARKS.md, issue
14). Three mallopt settings keep that memory in the process instead: one arena for all threads
(the main one, which grows with brk), no mmap for large blocks, and no trimming of the heap's top.
After the first steps no page is faulted in again. The costs: memory a step freed is kept for the
next one rather than returned to the system (the peak of one step stays resident), and XLA's
multi-threaded compiles contend for the one arena (SiT-S/2's train step compiles in ~6.7 s
instead of ~5.5 s), so the settings pay off from the fifth or sixth step on: a training or
sampling job, not a run of many small programs (the test suite turns them off).

Applied only on Linux with glibc, when JAX will compute on the CPU (JAX_PLATFORMS names cpu first,
or no accelerator plugin is installed), and not when GROUPDIFF_JAX_KEEP_HOST_MEMORY=0. Arenas are
per thread and made on first use, so this must run before JAX starts its thread pools.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
_ACCELERATOR_MODULES = ('libtpu',)  # GPU plugins register `jax_plugins` entry points
ENV = 'GROUPDIFF_JAX_KEEP_HOST_MEMORY'
applied = False  # whether this process runs with the settings


def computes_on_cpu(environ=os.environ) -> bool:
  """Whether JAX in this process will run on the CPU: JAX_PLATFORMS says so, or it can find no
  accelerator plugin to load."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES):
    return False
  return not list(importlib.metadata.entry_points(group='jax_plugins'))


def keep_host_memory(environ=os.environ) -> bool:
  """Sets the malloc options where they apply (see the module docstring); returns whether set."""
  global applied
  if environ.get(ENV, '1') == '0' or not sys.platform.startswith('linux'):
    return False
  if applied:
    return True
  try:
    if not os.confstr('CS_GNU_LIBC_VERSION'):
      return False
  except (ValueError, OSError):  # not glibc (musl has no such name)
    return False
  if not computes_on_cpu(environ):
    return False
  libc = ctypes.CDLL(None)
  applied = all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)
  return applied
