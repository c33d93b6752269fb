"""GPU-only checks (skipped elsewhere): the cuDNN attention's gradient and a whole train step with
cuDNN attention against the same step with XLA's attention, on the GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupdiff_jax import sharding
from groupdiff_jax.models import attention as attn

from conftest import run_steps, tiny_config

pytestmark = pytest.mark.gpu


def test_cudnn_gradient_matches_reference():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (2, 256, 4, 72), jnp.bfloat16) for key in keys[:3])
  probe = jax.random.normal(keys[3], q.shape, jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe)
  got = jax.grad(loss(lambda *a: attn.attention(*a, backend='cudnn')), argnums=(0, 1, 2))(q, k, v)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  want = jax.grad(loss(attn.reference_attention), argnums=(0, 1, 2))(*f32)
  for g, w in zip(got, want):
    g = np.asarray(g.astype(jnp.float32))
    # bf16 inputs and outputs: compare against the gradient's scale, not element by element.
    assert np.abs(g - np.asarray(w)).max() <= 3e-2 * np.abs(np.asarray(w)).max()


def _losses(attention: str, steps: int = 3) -> np.ndarray:
  c = tiny_config(**{'model.attention': attention, 'mesh.shape': (1, 1, 1),
                     'model.name': 'SiT-d2h64n2/2'})
  return run_steps(c, sharding.make_mesh(c.mesh.axes, c.mesh.shape, jax.devices()[:1]), steps)[0]


def test_train_steps_with_cudnn_attention_match_xla_attention():
  """GroupDiff-l groups of 4 in the tiny model: cuDNN computes attention in bf16, so the losses
  agree to bf16's precision, step after step."""
  np.testing.assert_allclose(_losses('cudnn'), _losses('xla'), rtol=2e-2)
