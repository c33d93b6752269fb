"""'flash_cpu': exact softmax attention as a hand-written CPU kernel (flash_cpu.cc), an XLA FFI
custom call with a custom VJP.

The C++ source ships with the package and is compiled on first use with the machine's C++
compiler (`$CXX`, else `c++`; -O3 -march=native) against the FFI headers of the installed
jaxlib, then cached: `$GROUPDIFF_JAX_KERNEL_CACHE`, else `~/.cache/groupdiff_jax/kernels`, one
file per (source, compiler, jaxlib, CPU) so a cache shared between machines never hands one CPU
another's instructions. Where no compiler works, `available()` is False and 'auto' attention keeps
the 'blocked' XLA loop (attention.py); asking for 'flash_cpu' by name then fails with the
compiler's message.
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
import jax.numpy as jnp

from groupdiff_jax import progress

_SOURCE = pathlib.Path(__file__).with_name('flash_cpu.cc')
_FORWARD, _BACKWARD = 'groupdiff_flash_cpu_forward', 'groupdiff_flash_cpu_backward'
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')


class KernelUnavailable(RuntimeError):
  """The CPU attention kernel could not be built on this machine (no working C++ compiler)."""


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
  """Compiles flash_cpu.cc once per machine (cached) and returns the shared library's path.
  Raises KernelUnavailable with the compiler's complaint when it cannot."""
  compiler = _compiler()
  try:
    version = subprocess.run([*compiler, '--version'], capture_output=True, text=True,
                             check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelUnavailable(f'no working C++ compiler ({shlex.join(compiler)}): {e}') from e
  key = hashlib.sha256('\0'.join([
      _SOURCE.read_text(), version, ' '.join(_FLAGS), importlib.metadata.version('jaxlib'),
      _cpu_signature(),
  ]).encode()).hexdigest()[:16]
  target = _cache_dir() / f'flash_cpu_{key}.so'
  if target.exists():
    return target
  progress.say(f'building the CPU attention kernel (once per machine): {target}')
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      partial = pathlib.Path(tmp) / target.name
      command = [*compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o',
                 str(partial)]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode:
        raise KernelUnavailable(f'compiling {_SOURCE.name} failed ({shlex.join(command)}):\n'
                                f'{result.stderr.strip()[-2000:]}')
      os.replace(partial, target)
  except OSError as e:  # an unwritable cache directory, a full disk
    raise KernelUnavailable(f'cannot write the kernel cache {target.parent}: {e} (set '
                            'GROUPDIFF_JAX_KERNEL_CACHE to a writable directory)') from e
  return target


@functools.lru_cache(maxsize=1)
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(build()))
  for name, symbol in ((_FORWARD, library.GroupdiffFlashCpuForward),
                       (_BACKWARD, library.GroupdiffFlashCpuBackward)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform='cpu')


@functools.lru_cache(maxsize=1)
def available() -> bool:
  """Whether the kernel is built and registered (building it if needed)."""
  try:
    _register()
  except KernelUnavailable as e:
    progress.say(f"CPU attention falls back to 'blocked': {str(e).splitlines()[0]}")
    return False
  return True


def _forward_call(q, k, v):
  *batch, q_len, heads, _ = q.shape
  outputs = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
             jax.ShapeDtypeStruct((*batch, heads, q_len), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, outputs, vmap_method='broadcast_all')(q, k, v)


@jax.custom_vjp
def _flash(q, k, v):
  return _forward_call(q, k, v)[0]


def _flash_fwd(q, k, v):
  out, lse = _forward_call(q, k, v)
  return out, (q, k, v, out, lse)


def _flash_bwd(residuals, d_out):
  q, k, v, _, _ = residuals
  outputs = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
  return jax.ffi.ffi_call(_BACKWARD, outputs, vmap_method='broadcast_all')(*residuals, d_out)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention (scale head_dim**-0.5) of q [B, Lq, H, D] over k, v [B, Lk, H, D], in
  float32, by the hand-written CPU kernel; the backward pass recomputes the scores from the saved
  log-sum-exp, as 'blocked' does. CPU only: it is an FFI target registered for the host."""
  _register()
  dtype = q.dtype
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  return _flash(q, k, v).astype(dtype)
