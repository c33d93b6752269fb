"""Samplers for a velocity model with group CFG and a guidance interval.

Time convention (the whole project): x_t = (1 - t) x + t eps, so t = 1 is pure noise, and the
velocity is v = d x_t / dt = eps - x. Sampling integrates from t = 1 down to t = 0.

The samplers see the model only through a `VelocityFn`:
  velocity_fn(x [B,H,W,C], t float32 [B], y int32 [B], group_size (static int), rng) -> [B,H,W,C']
where `group_size` contiguous images attend to each other (GroupDiff), `rng` is a fresh key per
model call (the model draws per-group sample-embedding ids from it), and C' >= C: with learned
sigma the model returns 2C channels and only the first C are the velocity.

`rng` is one key for the batch, or one typed key per image (`jax.random.key` array of shape [B]).
With per-image keys every random draw of image i (step noise, the keys velocity_fn gets) derives
from its own key only, so a sample does not depend on the batch it was drawn in (the offline
sampling job relies on this; velocity_fn then receives per-image keys too).

Each sampler is one `lax.scan` over its steps, so a call is one compiled loop.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, int, jax.Array], jax.Array]
# The guided velocity at one step: (x, scalar t, rng) -> v with x's channels.
_StepVelocity = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def per_image_keys(rng: jax.Array) -> bool:
  return jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1


def split_keys(rng: jax.Array, num: int) -> jax.Array:
  """jax.random.split along a new leading axis, per image for per-image keys ([num, B])."""
  if per_image_keys(rng):
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(rng), 0, 1)
  return jax.random.split(rng, num)


def normal_noise(rng: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  if per_image_keys(rng):
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(rng)
  return jax.random.normal(rng, shape, dtype)


def _sbdm_diffusion(t: jax.Array) -> jax.Array:
  """w(t) = t / (1 - t), the SBDM form in this convention; clamped because it is 1/0 at t = 1."""
  t = jnp.clip(t, 1e-4, 0.999)
  return t / (1.0 - t)


def _sde(vel: _StepVelocity, x: jax.Array, rng: jax.Array, num_steps: int,
         last_step_size: float) -> jax.Array:
  """Euler-Maruyama on t_k = 1 - linspace(0, 1 - last, num_steps), then a noise-free 'Mean' step.

  Reverse SDE dx = [v - w s] dt + sqrt(2w) dW with the score s recovered from v:
  x_t = (1-t) x + t eps  =>  s = -E[eps|x_t] / t = (-(1-t) v - x_t) / t.
  The last step (last_step_size -> 0) uses the drift only, so no noise is added at t = 0.
  """
  ts = 1.0 - jnp.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=jnp.float32)
  keys = split_keys(rng, num_steps)

  def drift(x, t, key):
    v = vel(x, t, key)
    score = (-(1.0 - t) * v - x) / t
    return v - _sbdm_diffusion(t) * score

  def step(x, inputs):
    t_cur, t_next, key = inputs
    key_v, key_z = split_keys(key, 2)
    dt = t_cur - t_next
    noise = normal_noise(key_z, x.shape, x.dtype)
    x = x - drift(x, t_cur, key_v) * dt + jnp.sqrt(2.0 * _sbdm_diffusion(t_cur) * dt) * noise
    return x, None

  x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:], keys[:-1]))
  return x - drift(x, ts[-1], keys[-1]) * ts[-1]


def _euler(vel: _StepVelocity, x: jax.Array, rng: jax.Array, num_steps: int,
           last_step_size: float) -> jax.Array:
  """Euler ODE on linspace(1, 0, num_steps + 1); `last_step_size` is unused (ODE ends at 0)."""
  del last_step_size
  ts = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)

  def step(x, inputs):
    t_cur, t_next, key = inputs
    return x + (t_next - t_cur) * vel(x, t_cur, key), None

  x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:], split_keys(rng, num_steps)))
  return x


def _heun(vel: _StepVelocity, x: jax.Array, rng: jax.Array, num_steps: int,
          last_step_size: float) -> jax.Array:
  """Heun ODE on linspace(1, 0, num_steps + 1), the last step Euler-only (as REPA's sampler does).

  The final corrector would evaluate the model at exactly t = 0, where score-based formulas
  divide by t and samplers in the SiT/REPA family never evaluate; an Euler last step costs one
  O(h^2) local error and saves one evaluation: NFE = 2 * num_steps - 1.
  """
  del last_step_size
  ts = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  keys = split_keys(rng, 2 * num_steps)
  keys_pred, keys_corr = keys[0::2], keys[1::2]

  def step(x, inputs):
    t_cur, t_next, key_pred, key_corr = inputs
    dt = t_next - t_cur
    v_cur = vel(x, t_cur, key_pred)
    v_next = vel(x + dt * v_cur, t_next, key_corr)
    return x + 0.5 * dt * (v_cur + v_next), None

  x, _ = jax.lax.scan(step, x, (ts[:-2], ts[1:-1], keys_pred[:-1], keys_corr[:-1]))
  return x + (ts[-1] - ts[-2]) * vel(x, ts[-2], keys_pred[-1])


class _Sampler(NamedTuple):
  loop: Callable[..., jax.Array]
  nfe: Callable[[int], int]  # model evaluations per branch for num_steps steps
  min_steps: int


SAMPLERS = {
    'sde': _Sampler(_sde, lambda n: n, 2),  # one step would be the Mean step from t = 1
    'euler': _Sampler(_euler, lambda n: n, 1),
    'heun': _Sampler(_heun, lambda n: 2 * n - 1, 1),
}


def num_function_evals(sampler: str, num_steps: int, cfg_scale: float = 1.0) -> int:
  """Upper bound on model calls for one batch (x2 with CFG, reached when the interval is [0, 1])."""
  _check_sampler(sampler, num_steps)
  return SAMPLERS[sampler].nfe(num_steps) * (1 if cfg_scale == 1.0 else 2)


def _check_sampler(sampler: str, num_steps: int) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}')
  if num_steps < SAMPLERS[sampler].min_steps:
    raise ValueError(f'sampler {sampler!r} needs num_steps >= {SAMPLERS[sampler].min_steps}, '
                     f'got {num_steps}')


def _guided_velocity(velocity_fn: VelocityFn, labels: jax.Array, *, cfg_scale: float,
                     guidance_low: float, guidance_high: float, cond_group_size: int,
                     uncond_group_size: int, null_label: int,
                     guided_channels: int) -> _StepVelocity:
  """Builds (x, t, rng) -> v: the conditional velocity, CFG-guided inside [low, high].

  Both branches see the same x; the unconditional one groups `uncond_group_size` contiguous
  images. Outside the interval `lax.cond` skips the unconditional model call entirely (it is not
  computed and discarded), which halves the cost there and keeps the images of a group from
  interacting, as in the official sampler.
  """
  null_labels = jnp.full_like(labels, null_label)

  def vel(x, t, rng):
    channels = x.shape[-1]
    t_batch = jnp.full((x.shape[0],), t, jnp.float32)
    key_c, key_u = split_keys(rng, 2)
    cond = velocity_fn(x, t_batch, labels, cond_group_size, key_c)[..., :channels]
    cond = cond.astype(x.dtype)
    if cfg_scale == 1.0:
      return cond

    def guided(cond):
      uncond = velocity_fn(x, t_batch, null_labels, uncond_group_size, key_u)[..., :channels]
      uncond = uncond.astype(x.dtype)
      out = uncond + cfg_scale * (cond - uncond)
      if 0 < guided_channels < channels:  # DiT/SiT legacy: the rest comes from cond
        out = jnp.concatenate([out[..., :guided_channels], cond[..., guided_channels:]], -1)
      return out

    inside = (t >= guidance_low) & (t <= guidance_high)
    return jax.lax.cond(inside, guided, lambda c: c, cond)

  return vel


def sample_loop(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, rng: jax.Array,
                *, sampler: str = 'sde', num_steps: int = 250, cfg_scale: float = 1.0,
                guidance_low: float = 0.0, guidance_high: float = 1.0, cond_group_size: int = 1,
                uncond_group_size: int = 4, null_label: int = 1000, guided_channels: int = 0,
                last_step_size: float = 0.04) -> jax.Array:
  """Un-jitted body of `sample`, for use inside the caller's own `jax.jit`.

  Prefer this when velocity_fn closes over parameters: under the caller's jit the parameters stay
  arguments, whereas `sample` (velocity_fn static) would bake them in as constants.
  """
  _check_sampler(sampler, num_steps)
  if noise.ndim != 4:
    raise ValueError(f'noise must be [B, H, W, C], got shape {noise.shape}')
  batch = noise.shape[0]
  if labels.shape != (batch,):
    raise ValueError(f'labels must have shape ({batch},), got {labels.shape}')
  if not 0.0 <= guidance_low <= guidance_high <= 1.0:
    raise ValueError(f'guidance interval must satisfy 0 <= low <= high <= 1, '
                     f'got [{guidance_low}, {guidance_high}]')
  if not 0.0 < last_step_size < 1.0:
    raise ValueError(f'last_step_size must be in (0, 1), got {last_step_size}')
  if guided_channels < 0:
    raise ValueError(f'guided_channels must be >= 0 (0 = all), got {guided_channels}')
  # The uncond group size only matters when the unconditional branch can run.
  sizes = [('cond', cond_group_size)] + ([('uncond', uncond_group_size)] if cfg_scale != 1.0
                                         else [])
  for name, size in sizes:
    if size < 1 or batch % size:
      raise ValueError(f'{name} group size {size} does not divide the batch of {batch}')

  vel = _guided_velocity(
      velocity_fn, labels.astype(jnp.int32), cfg_scale=cfg_scale, guidance_low=guidance_low,
      guidance_high=guidance_high, cond_group_size=cond_group_size,
      uncond_group_size=uncond_group_size, null_label=null_label,
      guided_channels=guided_channels)
  # float32 state whatever the noise dtype: 250 bf16 accumulations lose visible precision.
  return SAMPLERS[sampler].loop(vel, noise.astype(jnp.float32), rng, num_steps, last_step_size)


_STATIC = ('sampler', 'num_steps', 'cfg_scale', 'guidance_low', 'guidance_high',
           'cond_group_size', 'uncond_group_size', 'null_label', 'guided_channels',
           'last_step_size')


@functools.partial(jax.jit, static_argnums=0, static_argnames=_STATIC)
def sample(velocity_fn: VelocityFn, noise: jax.Array, labels: jax.Array, rng: jax.Array,
           *, sampler: str = 'sde', num_steps: int = 250, cfg_scale: float = 1.0,
           guidance_low: float = 0.0, guidance_high: float = 1.0, cond_group_size: int = 1,
           uncond_group_size: int = 4, null_label: int = 1000, guided_channels: int = 0,
           last_step_size: float = 0.04) -> jax.Array:
  """Generates x_0 from `noise` (x at t = 1) as one compiled loop; returns float32 [B,H,W,C].

  sampler: 'sde' (Euler-Maruyama, SBDM diffusion, num_steps model steps incl. the final Mean
  step of `last_step_size`), 'euler' or 'heun' (ODE on num_steps uniform steps).
  cfg_scale: guided v = uncond + s (cond - uncond) for guidance_low <= t <= guidance_high
  (t = 1 is noise); elsewhere, and always when s == 1, only the conditional pass runs.
  guided_channels: 0 guides all channels; k > 0 only the first k (DiT/SiT legacy uses 3).
  velocity_fn is static (hashed by identity); every other argument but noise/labels/rng is static,
  so changing one recompiles.
  """
  return sample_loop(velocity_fn, noise, labels, rng, sampler=sampler, num_steps=num_steps,
                     cfg_scale=cfg_scale, guidance_low=guidance_low,
                     guidance_high=guidance_high, cond_group_size=cond_group_size,
                     uncond_group_size=uncond_group_size, null_label=null_label,
                     guided_channels=guided_channels, last_step_size=last_step_size)
