"""Every attention backend available here against the float32 reference, forward and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import attention as attn

CPU_BACKENDS = ['xla', 'blocked', 'splash']  # splash runs in Pallas interpret mode off TPU


def _qkv(shape=(2, 40, 3, 24), dtype=jnp.float32):
  # Length 40 and head_dim 24 are deliberately not multiples of 128: splash must pad both.
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return [jax.random.normal(k, shape, dtype) for k in keys]


@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_forward_matches_reference(backend):
  q, k, v = _qkv()
  np.testing.assert_allclose(attn.attention(q, k, v, backend), attn.reference_attention(q, k, v),
                             atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('backend', CPU_BACKENDS)
def test_gradient_matches_reference(backend):
  q, k, v = _qkv()
  probe = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * probe)
  got = jax.grad(loss(lambda *a: attn.attention(*a, backend=backend)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attn.reference_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


def test_blocked_loops_over_heads_with_a_remainder_and_any_lengths(monkeypatch):
  """Several heads per loop step and a last, partial step; queries shorter than keys (a
  context-parallel shard); bfloat16 inputs come back in bfloat16, computed in float32."""
  monkeypatch.setattr(attn, '_BLOCK_SCORES', 2 * 16 * 40)
  assert attn._heads_per_step(16, 40) == 2  # 5 heads: steps of 2, 2 and a remainder of 1
  q = _qkv((1, 16, 5, 24))[0]
  _, k, v = _qkv((1, 40, 5, 24))
  probe = jax.random.normal(jax.random.PRNGKey(2), q.shape)
  np.testing.assert_allclose(attn.blocked_attention(q, k, v), attn.reference_attention(q, k, v),
                             atol=2e-6, rtol=2e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * probe)
  got = jax.grad(loss(attn.blocked_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attn.reference_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-6, rtol=5e-5)
  low = attn.blocked_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
  assert low.dtype == jnp.bfloat16


def test_reference_is_softmax_attention():
  q, k, v = _qkv((1, 5, 1, 4))
  logits = np.einsum('qd,kd->qk', q[0, :, 0], k[0, :, 0]) / 2.0
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(attn.reference_attention(q, k, v)[0, :, 0], probs @ v[0, :, 0],
                             rtol=1e-5, atol=1e-6)


def test_auto_picks_per_platform():
  assert attn.resolve_backend('auto', 'cpu') == 'blocked'
  assert attn.resolve_backend('auto', 'gpu') == 'cudnn'
  assert attn.resolve_backend('auto', 'tpu') == 'splash'
  assert attn.resolve_backend('auto') in attn.BACKENDS


def test_unknown_backend_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
    attn.attention(*_qkv(), backend='flash')


@pytest.mark.gpu
def test_cudnn_matches_reference_in_bf16():
  q, k, v = _qkv((2, 256, 4, 72), jnp.bfloat16)
  got = attn.attention(q, k, v, 'cudnn').astype(jnp.float32)
  np.testing.assert_allclose(got, attn.reference_attention(q, k, v).astype(jnp.float32),
                             atol=2e-2, rtol=2e-2)


@pytest.mark.tpu
def test_splash_on_tpu_matches_reference():
  q, k, v = _qkv((2, 512, 4, 72))
  np.testing.assert_allclose(attn.attention(q, k, v, 'splash'), attn.reference_attention(q, k, v),
                             atol=2e-2, rtol=2e-2)
