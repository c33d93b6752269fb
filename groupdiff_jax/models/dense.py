"""Dense layers whose gradients can come from the hand-written CPU kernel.

`Linear` is flax's nnx.Linear (same parameters, same forward) with one per-platform choice,
`grads` (config `model.dense_grads`): 'xla' differentiates the layer as XLA lowers it; 'cpu_kernel'
computes dx = dy W^T, then dW = x^T dy and db = sum(dy), in one call (kernels/dense.cc). XLA:CPU
first copies an operand of dW's dot into a transposed layout and sums db in a separate slow pass;
and beside a dW kernel of our own it ran its dx dot at the same time, the two sharing the cores
and slower together than one after the other (SiT-S/2 train step, BENCHMARKS.md). 'auto' picks
the kernel on a one-device CPU run and XLA everywhere else: the custom call has no partitioning
rule, so on a multi-device mesh XLA would gather its operands onto every device, and
accelerators never see it.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from groupdiff_jax import sharding
from groupdiff_jax.models import cpu_kernels
from groupdiff_jax.models.group_attention import active_platform

GRADS = ('auto', 'xla', 'cpu_kernel')
# The layer's output under the kernel path carries this name, so a `jax.checkpoint` policy can keep
# it: the dot that computes it hides inside a custom_vjp, out of sight of the dot policies.
OUTPUT_NAME = 'dense_output'
_TARGET = 'groupdiff_dense_backward'
# Rows (tokens) below which XLA's own lowering is kept: the timestep MLP and the adaLN layers
# (one row per image) cost nothing either way.
MIN_ROWS = 256


def resolve_grads(name: str, platform: str) -> str:
  """'auto' -> 'cpu_kernel' or 'xla' for `platform` and the enclosing mesh; checks the name."""
  if name not in GRADS:
    raise ValueError(f'unknown model.dense_grads {name!r}; known: {", ".join(GRADS)}')
  if name == 'auto':
    return ('cpu_kernel' if platform == 'cpu' and sharding.one_device()
            and cpu_kernels.available() else 'xla')
  if name == 'cpu_kernel' and platform != 'cpu':  # an FFI target registered for the host only
    raise ValueError(f"model.dense_grads='cpu_kernel' runs on CPU only, not on {platform}; use "
                     "'auto'")
  return name


def _affine(x, kernel, bias):
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
  return y + bias


@jax.custom_vjp
def _dense(x, kernel, bias):
  return _affine(x, kernel, bias)


def _dense_fwd(x, kernel, bias):
  return _affine(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, d_y):
  x, kernel = residuals
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
            jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32))
  return jax.ffi.ffi_call(_TARGET, shapes, vmap_method='sequential')(x, d_y, kernel)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, N] + bias [N] in float32; its backward computes all three gradients
  with the CPU kernel (N a multiple of 16). CPU only: an FFI target for the host."""
  cpu_kernels.register()
  return checkpoint_name(_dense(x, kernel, bias), OUTPUT_NAME)


def kernel_fits(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> bool:
  """Whether `dense` takes these operands: float32, N a multiple of the widest vector (16
  floats), enough rows to be worth it."""
  rows = x.size // max(x.shape[-1], 1)
  return (all(a.dtype == jnp.float32 for a in (x, kernel) + (() if bias is None else (bias,)))
          and kernel.ndim == 2 and kernel.shape[1] % 16 == 0 and rows >= MIN_ROWS)


class Linear(nnx.Linear):
  """nnx.Linear whose backward pass runs on the CPU kernel where `grads` resolves to it."""

  def __init__(self, *args, grads: str = 'auto', **kwargs):
    super().__init__(*args, **kwargs)
    self.grads = grads

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.bias is not None and (self.dtype is None or jnp.dtype(self.dtype) == jnp.float32):
      kernel, bias = self.kernel[...], self.bias[...]
      if (kernel_fits(inputs, kernel, bias)
          and resolve_grads(self.grads, active_platform()) == 'cpu_kernel'):
        return dense(inputs, kernel, bias)
    return super().__call__(inputs)
