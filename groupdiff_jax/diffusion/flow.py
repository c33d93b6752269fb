"""Linear interpolant with noise at t = 1 (REPA / official GroupDiff convention) and the loss.

  x_t = (1 - t) x + t eps,   target velocity  d x_t / dt = eps - x,   t ~ U[0, 1).

The trainer reaches it through diffusion/objectives.py ('flow'), which also lays the times out
over a GroupDiff batch.
"""
import jax
import jax.numpy as jnp


def group_times(rng: jax.Array, num_images: int, group_size: int, spread: float) -> jax.Array:
  """t for `num_images` images in contiguous groups: a shared base per group, then each member
  (the first included) drawn uniformly within +-spread of it, clipped to [0, 1)."""
  base_key, member_key = jax.random.split(rng)
  base = jax.random.uniform(base_key, (num_images // group_size,))
  base = jnp.repeat(base, group_size)
  if spread <= 0 or group_size == 1:
    return base
  lo = jnp.maximum(base - spread, 0.0)
  hi = jnp.minimum(base + spread, 1.0)
  t = lo + (hi - lo) * jax.random.uniform(member_key, (num_images,))
  return jnp.minimum(t, 1.0 - 1e-6)  # keep t < 1 like the base draw


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  return (1.0 - t) * x + t * noise


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
  return noise - x


def per_image_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over pixels and channels of each image (the model's extra sigma channels get no loss)."""
  pred = pred[..., :target.shape[-1]]
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))
