"""Process-wide CPU settings for our own entry points (never applied on import).

XLA's CPU runtime allocates each execution's temporaries afresh (gigabytes per SiT-S/2 train
step). glibc serves blocks above 32 MiB with mmap and unmaps them on free, so every step
page-faults its whole working set in again (zero-filled by the kernel): ~0.5M minor faults per
step. Keeping freed memory in the heap instead makes later steps reuse warm pages.
"""
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """glibc only: serve large blocks from the heap and never return freed memory to the OS (the
  process then keeps its peak footprint). Returns whether it applied."""
  name = ctypes.util.find_library('c')
  if not name:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure(threads: int) -> None:
  """Call before jax creates its CPU client."""
  del threads
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
