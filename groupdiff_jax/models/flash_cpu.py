"""'flash_cpu': exact softmax attention as a hand-written CPU kernel (kernels/attention.cc), an
XLA FFI custom call with a custom VJP.

Built on first use and cached by cpu_kernels.py. Where no compiler works, 'auto' attention keeps
the 'blocked' XLA loop (attention.py); asking for 'flash_cpu' by name then fails with the
compiler's message.
"""
import jax
import jax.numpy as jnp

from groupdiff_jax.models import cpu_kernels

_FORWARD, _BACKWARD = 'groupdiff_flash_cpu_forward', 'groupdiff_flash_cpu_backward'


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
  cpu_kernels.register()
  dtype = q.dtype
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  return _flash(q, k, v).astype(dtype)
