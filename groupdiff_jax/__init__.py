"""groupdiff_jax: Group Diffusion (GroupDiff) SiT/DiT trainer for JAX/Flax on TPU/GPU meshes.

Importing the package sets one XLA:CPU option (CPU compiles only; GPU and TPU ignore xla_cpu_*
flags), before JAX starts its backends: XLA's CPU backend hands only plain dots to YNNPACK and
emits the elementwise work around them itself. YNNPACK's own fusions of layer norm and modulation
into the dense layers ran the SiT-B/2 forward 5-8% slower on two Zen 4 cores and allocated fresh
scratch on every call (1.1 GB of page faults per forward; BENCHMARKS.md, issue 14). A value the
user already put in XLA_FLAGS wins; a JAX imported and started earlier keeps its own settings.

Where JAX will compute on the CPU it also sets glibc's malloc to keep XLA's per-step scratch
memory in the process instead of faulting in fresh pages every step (host_malloc.py).
"""
import importlib.metadata
import os

_YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
_FLAG_KNOWN = ('0.10.', '0.11.', '0.12.')  # jaxlib releases tested to know the flag and value


def _set_cpu_flags() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  try:
    jaxlib = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return
  if _YNN_FLAG in flags or not jaxlib.startswith(_FLAG_KNOWN):
    return  # an unknown flag would stop XLA at start-up
  os.environ['XLA_FLAGS'] = f'{flags} --{_YNN_FLAG}=individual_dot'.strip()


_set_cpu_flags()

from groupdiff_jax import host_malloc  # pylint: disable=wrong-import-position

host_malloc.keep_host_memory()
