"""The hand-written CPU kernels (kernels/*.cc): built once per machine, registered as XLA FFI
targets for the host.

attention.cc is 'flash_cpu' attention (flash_cpu.py); dense.cc the gradients of dense
layers (dense.py). The C++ sources ship with the package and are compiled together on first
use with the machine's C++ compiler (`$CXX`, else `c++`; -O3 -march=native) against the FFI
headers of the installed jaxlib, then cached: `$GROUPDIFF_JAX_KERNEL_CACHE`, else
`~/.cache/groupdiff_jax/kernels`, one file per (sources, compiler, jaxlib, CPU) so a cache shared
between machines never hands one CPU another's instructions. Where no compiler works,
`available()` is False and the 'auto' choices keep XLA's own lowering; asking for a kernel by name
then fails with the compiler's message.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile

import jax

from groupdiff_jax import progress

_DIR = pathlib.Path(__file__).with_name('kernels')
_SOURCES = ('attention.cc', 'dense.cc')
_HEADERS = ('common.h',)
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    'groupdiff_flash_cpu_forward': 'GroupdiffFlashCpuForward',
    'groupdiff_flash_cpu_backward': 'GroupdiffFlashCpuBackward',
    'groupdiff_flash_cpu_forward_packed': 'GroupdiffFlashCpuForwardPacked',
    'groupdiff_flash_cpu_backward_packed': 'GroupdiffFlashCpuBackwardPacked',
    'groupdiff_dense_backward': 'GroupdiffDenseBackward',
}
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')


class KernelUnavailable(RuntimeError):
  """The CPU kernels could not be built on this machine (no working C++ compiler)."""


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's model and feature flags."""
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return platform.processor() or platform.machine()
  lines = [l for l in info.splitlines() if l.startswith(('model name', 'flags', 'Features'))]
  return '\n'.join(sorted(set(lines)))


def _cache_dir() -> pathlib.Path:
  root = os.environ.get('GROUPDIFF_JAX_KERNEL_CACHE')
  return pathlib.Path(root) if root else pathlib.Path.home() / '.cache' / 'groupdiff_jax' / 'kernels'


def _compiler() -> list[str]:
  return shlex.split(os.environ.get('CXX', 'c++'))


def build() -> pathlib.Path:
  """Compiles kernels/*.cc once per machine (cached) and returns the shared library's path.
  Raises KernelUnavailable with the compiler's complaint when it cannot."""
  compiler = _compiler()
  try:
    version = subprocess.run([*compiler, '--version'], capture_output=True, text=True,
                             check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelUnavailable(f'no working C++ compiler ({shlex.join(compiler)}): {e}') from e
  key = hashlib.sha256('\0'.join([
      *((_DIR / name).read_text() for name in _HEADERS + _SOURCES), version, ' '.join(_FLAGS),
      importlib.metadata.version('jaxlib'), _cpu_signature(),
  ]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'cpu_kernels_{key}.so'
  if target.exists():
    return target
  progress.say(f'building the CPU kernels (once per machine): {target}')
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      partial = pathlib.Path(tmp) / target.name
      command = [*compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}',
                 *(str(_DIR / name) for name in _SOURCES), '-o', str(partial)]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode:
        raise KernelUnavailable(f'compiling the CPU kernels failed ({shlex.join(command)}):\n'
                                f'{result.stderr.strip()[-2000:]}')
      os.replace(partial, target)
  except OSError as e:  # an unwritable cache directory, a full disk
    raise KernelUnavailable(f'cannot write the kernel cache {target.parent}: {e} (set '
                            'GROUPDIFF_JAX_KERNEL_CACHE to a writable directory)') from e
  return target


@functools.lru_cache(maxsize=1)
def register() -> None:
  """Builds (if needed) and registers every kernel as an FFI target for the host."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')


@functools.lru_cache(maxsize=1)
def available() -> bool:
  """Whether the kernels are built and registered (building them if needed); says once why not."""
  try:
    register()
  except KernelUnavailable as e:
    progress.say(f"the CPU kernels are unavailable, XLA's lowering is used instead: "
                 f'{str(e).splitlines()[0]}')
    return False
  return True
