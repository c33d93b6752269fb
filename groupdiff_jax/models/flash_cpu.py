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
_FORWARD_PACKED = 'groupdiff_flash_cpu_forward_packed'
_BACKWARD_PACKED = 'groupdiff_flash_cpu_backward_packed'


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


# The packed form: the model's qkv [B, L, 3, H, D] goes in whole and its gradient comes out whole.
# Slicing q, k, v out of it (forward) and joining dq, dk, dv back (XLA pads each to the packed
# shape and adds them) were copies of the whole array per layer and pass.

def _forward_packed_call(qkv):
  *batch, length, _, heads, dim = qkv.shape
  outputs = (jax.ShapeDtypeStruct((*batch, length, heads, dim), jnp.float32),
             jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD_PACKED, outputs, vmap_method='broadcast_all')(qkv)


@jax.custom_vjp
def _flash_packed(qkv):
  return _forward_packed_call(qkv)[0]


def _flash_packed_fwd(qkv):
  out, lse = _forward_packed_call(qkv)
  return out, (qkv, out, lse)


def _flash_packed_bwd(residuals, d_out):
  qkv = residuals[0]
  d_qkv = jax.ffi.ffi_call(_BACKWARD_PACKED, jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                           vmap_method='broadcast_all')(*residuals, d_out)
  return (d_qkv,)


_flash_packed.defvjp(_flash_packed_fwd, _flash_packed_bwd)


def flash_cpu_attention_packed(qkv: jax.Array) -> jax.Array:
  """flash_cpu_attention(q, k, v) for qkv [B, L, 3, H, D] (q, k, v stacked on axis 2): the same
  kernel reading the three parts in place; returns [B, L, H, D]."""
  cpu_kernels.register()
  dtype = qkv.dtype
  return _flash_packed(qkv.astype(jnp.float32)).astype(dtype)
