"""Every attention backend available here against the float32 reference, forward and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax.models import attention as attn

from groupdiff_jax.models import cpu_kernels, flash_cpu

# splash runs in Pallas interpret mode off TPU; flash_cpu needs a C++ compiler (every CI machine
# has one: a missing compiler must fail here, not skip).
CPU_BACKENDS = ['xla', 'blocked', 'flash_cpu', 'splash']


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


@pytest.mark.parametrize('q_shape,kv_length', [
    ((3, 50, 2, 64), 70),     # queries shorter than keys (context parallelism), rows in place
    ((1, 20, 2, 72), 33),     # SiT-XL's head_dim 72: rows packed to whole vectors
    ((2, 256, 6, 64), 256),   # SiT-S/2's shape: several row tiles and key blocks
    ((1, 7, 1, 8), 5),        # fewer tokens than one vector: everything is padding but 5 keys
])
def test_flash_cpu_any_lengths_and_head_dims(q_shape, kv_length):
  """The C++ kernel pads lengths and head_dim to whole vectors internally: padded keys must get
  no weight and padded queries no gradient, for lengths and dims that are not multiples of 16."""
  q = 2 * _qkv(q_shape)[0]  # sharper softmax than unit logits
  _, k, v = _qkv((q_shape[0], kv_length, *q_shape[2:]))
  probe = jax.random.normal(jax.random.PRNGKey(2), q.shape)
  np.testing.assert_allclose(flash_cpu.flash_cpu_attention(q, k, v),
                             attn.reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * probe)
  got = jax.grad(loss(flash_cpu.flash_cpu_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(attn.reference_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.abs(w).max()), rtol=1e-4)


@pytest.mark.parametrize('shape', [
    (2, 256, 3, 6, 64),  # SiT-S/2's qkv: rows read in place at a stride of 3 * H * D
    (1, 20, 3, 2, 72),   # SiT-XL's head_dim 72: rows packed to whole vectors
    (3, 7, 3, 1, 8),     # fewer tokens than one vector
])
def test_flash_cpu_packed_qkv_equals_the_sliced_call(shape):
  """The packed entry reads q, k, v out of qkv [B, L, 3, H, D] in place and writes the gradient
  of qkv whole: the same numbers as slicing q, k, v and calling the kernel on them."""
  qkv = 2 * jax.random.normal(jax.random.PRNGKey(0), shape)
  probe = jax.random.normal(jax.random.PRNGKey(1), shape[:2] + shape[3:])
  sliced = lambda a: flash_cpu.flash_cpu_attention(a[:, :, 0], a[:, :, 1], a[:, :, 2])
  np.testing.assert_allclose(flash_cpu.flash_cpu_attention_packed(qkv), sliced(qkv),
                             atol=1e-6, rtol=1e-6)
  grad = lambda fn: jax.jit(jax.grad(lambda a: jnp.sum(fn(a) * probe)))(qkv)
  want = grad(lambda a: attn.reference_attention(a[:, :, 0], a[:, :, 1], a[:, :, 2]))
  np.testing.assert_allclose(grad(flash_cpu.flash_cpu_attention_packed), want,
                             atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-4)
  got = jax.vmap(flash_cpu.flash_cpu_attention_packed)(jnp.stack([qkv, -qkv]))
  np.testing.assert_allclose(got[1], sliced(-qkv), atol=1e-6, rtol=1e-6)


def test_only_flash_cpu_has_a_packed_form():
  assert attn.packed_attention('flash_cpu', 'cpu') is flash_cpu.flash_cpu_attention_packed
  assert attn.packed_attention('auto', 'cpu') is flash_cpu.flash_cpu_attention_packed
  assert attn.packed_attention('auto', 'tpu') is None and attn.packed_attention('xla') is None


def test_flash_cpu_under_vmap_and_in_bfloat16():
  q, k, v = _qkv((3, 2, 24, 2, 16))  # a leading vmapped axis over [B, L, H, D]
  got = jax.vmap(flash_cpu.flash_cpu_attention)(q, k, v)
  np.testing.assert_allclose(got, jax.vmap(attn.reference_attention)(q, k, v), atol=1e-5)
  low = flash_cpu.flash_cpu_attention(*(a[0].astype(jnp.bfloat16) for a in (q, k, v)))
  assert low.dtype == jnp.bfloat16


def test_cpu_kernels_are_built_once_per_machine_and_cached(tmp_path, monkeypatch):
  """The build is keyed by sources, compiler, jax and CPU: a second build is the cached file; a
  broken compiler is a one-line KernelUnavailable naming it, and the 'auto' choices then keep
  XLA's lowerings ('blocked' attention, XLA's dense gradients)."""
  from groupdiff_jax.models import dense
  monkeypatch.setenv('GROUPDIFF_JAX_KERNEL_CACHE', str(tmp_path))
  first = cpu_kernels.build()
  assert first.parent == tmp_path and first.exists()
  stamp = first.stat().st_mtime_ns
  assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(cpu_kernels.KernelUnavailable, match='no working C[+][+] compiler'):
    cpu_kernels.build()
  monkeypatch.delenv('CXX')
  (tmp_path / 'file').write_text('')
  monkeypatch.setenv('GROUPDIFF_JAX_KERNEL_CACHE', str(tmp_path / 'file' / 'cache'))
  with pytest.raises(cpu_kernels.KernelUnavailable, match='cannot write the kernel cache'):
    cpu_kernels.build()
  monkeypatch.setattr(cpu_kernels, 'available', lambda: False)
  assert attn.resolve_backend('auto', 'cpu') == 'blocked'
  assert dense.resolve_grads('auto', 'cpu') == 'xla'


def test_reference_is_softmax_attention():
  q, k, v = _qkv((1, 5, 1, 4))
  logits = np.einsum('qd,kd->qk', q[0, :, 0], k[0, :, 0]) / 2.0
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(attn.reference_attention(q, k, v)[0, :, 0], probs @ v[0, :, 0],
                             rtol=1e-5, atol=1e-6)


def test_auto_picks_per_platform():
  assert attn.resolve_backend('auto', 'cpu') == 'flash_cpu'
  assert attn.resolve_backend('auto', 'gpu') == 'cudnn'
  assert attn.resolve_backend('auto', 'tpu') == 'splash'
  assert attn.resolve_backend('auto') in attn.BACKENDS


def test_flash_cpu_on_an_accelerator_is_a_clear_error():
  with pytest.raises(ValueError, match="'flash_cpu' runs on CPU only, not on tpu"):
    attn.resolve_backend('flash_cpu', 'tpu')
  assert attn.resolve_backend('flash_cpu', 'cpu') == 'flash_cpu'


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
