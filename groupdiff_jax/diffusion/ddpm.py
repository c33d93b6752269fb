"""The DDPM objective DiT (and GroupDiff-DiT) train and sample with.

  * linear betas 1e-4 -> 0.02 over 1000 steps (scaled by 1000/T), float64 tables;
  * integer t in [0, T); noise at t = T - 1; the model sees t as a float in [0, 999] (DiT), so
    our model's time_convention must be 'noise_at_1' (it feeds t raw);
  * the model predicts eps (first C channels) and a variance interpolation v (last C channels,
    LEARNED_RANGE): log var = f * log(beta_t) + (1 - f) * log(posterior var), f = (v + 1) / 2;
  * loss = MSE(eps) + VLB per image: the VLB sees the mean with stop-gradient and trains only the
    variance (DiT's LossType.MSE, so it is not rescaled); decoder NLL at t = 0;
  * ancestral sampling on a respaced grid ("250" = 250 evenly spaced of 1000 steps); the model
    always sees the ORIGINAL integer timestep (timestep_map), as in DiT. `sample_loop` adds
    GroupDiff's group CFG: conditional groups of `cond_group_size`, a grouped unconditional pass
    inside the guidance interval `low * 1000 <= t <= high * 1000`, guidance on eps only.

The trainer reaches this module through diffusion/objectives.py ('ddpm'), the sampling job and
the trainer's grid through the sampler registry (diffusion/registry.py, 'ddpm').
"""
import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax.diffusion.samplers import normal_noise, split_keys

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, model timesteps [B]) -> [B,H,W,2C]
# (x, t [B], y [B], group_size (static), rng) -> [B,H,W,2C]: what the group-CFG sampler calls.
GroupModelFn = Callable[[jax.Array, jax.Array, jax.Array, int, jax.Array], jax.Array]
# (x_t, model timesteps [B], rng) -> [B,H,W,2C]: one step's (guided) output.
_StepOutput = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def linear_betas(num_steps: int = 1000) -> np.ndarray:
  scale = 1000.0 / num_steps
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """Kept steps: each of len(section_counts) equal portions gives its count, evenly spaced."""
  if isinstance(section_counts, str):
    section_counts = [int(s) for s in section_counts.split(',')]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  size_per, extra = divmod(num_steps, len(section_counts))
  start, kept = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'cannot take {count} steps from a section of {size}')
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    kept += [start + round(j * stride) for j in range(count)]
    start += size
  return sorted(set(kept))


def group_steps(rng: jax.Array, num_images: int, group_size: int, window: int,
                num_steps: int = 1000) -> jax.Array:
  """Integer t for `num_images` images in contiguous groups: a shared base ~ randint[0, T) per
  group, then each member (the first included) drawn uniformly from [base - window, base +
  window] clipped to [0, T - 1]. window = round(t_spread * T): the paper's "100 timesteps" is
  t_spread 0.1, as the official code's int(offset * 1000)."""
  base_key, member_key = jax.random.split(rng)
  base = jax.random.randint(base_key, (num_images // group_size,), 0, num_steps)
  base = jnp.repeat(base, group_size)
  if window <= 0 or group_size == 1:
    return base
  lo = jnp.maximum(base - window, 0)
  hi = jnp.minimum(base + window, num_steps - 1)
  return jax.random.randint(member_key, (num_images,), lo, hi + 1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) for x in [-1, 1] quantised to 256 bins (the t = 0 decoder term)."""
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x):
  return x.mean(axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class DDPM:
  """Tables of one (possibly respaced) diffusion; index t runs over its own steps."""
  betas: np.ndarray
  timestep_map: np.ndarray  # the original step each of our steps stands for

  @classmethod
  def create(cls, num_steps: int = 1000, respacing: str | int | Sequence[int] | None = None
             ) -> 'DDPM':
    betas = linear_betas(num_steps)
    if respacing is None:
      return cls(betas, np.arange(num_steps))
    kept = space_timesteps(num_steps, respacing)
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev, new_betas = 1.0, []
    for i in kept:  # same cumulative alphas on the kept steps
      new_betas.append(1.0 - alphas_cumprod[i] / prev)
      prev = alphas_cumprod[i]
    return cls(np.asarray(new_betas), np.asarray(kept))

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @functools.cached_property
  def _tables(self) -> dict[str, np.ndarray]:
    b = self.betas
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    return dict(
        sqrt_ac=np.sqrt(ac), sqrt_1m_ac=np.sqrt(1.0 - ac),
        sqrt_recip_ac=np.sqrt(1.0 / ac), sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        post_var=post_var,
        # log of the posterior variance with the t=0 entry (0) replaced by t=1's, as DiT
        post_log_var=np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1
        else np.log(np.maximum(post_var, 1e-20)),
        post_c1=b * np.sqrt(ac_prev) / (1.0 - ac),
        post_c2=(1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        log_betas=np.log(b))

  def _at(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
    table = jnp.asarray(self._tables[name], jnp.float32)
    return table[t].reshape((-1,) + (1,) * (ndim - 1))

  def model_t(self, t: jax.Array) -> jax.Array:
    """The timestep the network sees for our step index t (original integer step, as float)."""
    return jnp.asarray(self.timestep_map, jnp.float32)[t]

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    return self._at('sqrt_ac', t, x0.ndim) * x0 + self._at('sqrt_1m_ac', t, x0.ndim) * noise

  def q_posterior(self, x0, x_t, t):
    mean = self._at('post_c1', t, x_t.ndim) * x0 + self._at('post_c2', t, x_t.ndim) * x_t
    return mean, self._at('post_log_var', t, x_t.ndim)

  def p_mean_variance(self, model_out: jax.Array, x_t: jax.Array, t: jax.Array):
    """(mean, log variance, predicted x0) of p(x_{t-1} | x_t) from an 8-channel output."""
    c = x_t.shape[-1]
    eps, v = model_out[..., :c], model_out[..., c:]
    if v.shape[-1] != c:
      raise ValueError(f'the DDPM needs eps + variance channels ({2 * c}); got '
                       f'{model_out.shape[-1]} (convert with learn_sigma, no --drop_sigma)')
    frac = (v + 1.0) / 2.0
    log_var = (frac * self._at('log_betas', t, x_t.ndim)
               + (1.0 - frac) * self._at('post_log_var', t, x_t.ndim))
    x0 = (self._at('sqrt_recip_ac', t, x_t.ndim) * x_t
          - self._at('sqrt_recipm1_ac', t, x_t.ndim) * eps)
    mean, _ = self.q_posterior(x0, x_t, t)
    return mean, log_var, x0

  def training_losses(self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array,
                      noise: jax.Array) -> dict[str, jax.Array]:
    """Per-sample {'loss', 'mse', 'vb'}: eps MSE + VLB in bits/dim (variance only)."""
    c = x0.shape[-1]
    frozen = jnp.concatenate([jax.lax.stop_gradient(model_out[..., :c]), model_out[..., c:]], -1)
    mean, log_var, _ = self.p_mean_variance(frozen, x_t, t)
    true_mean, true_log_var = self.q_posterior(x0, x_t, t)
    kl = _mean_flat(_normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    mse = _mean_flat(jnp.square(noise - model_out[..., :c]))
    return {'loss': mse + vb, 'mse': mse, 'vb': vb}

  def p_sample(self, model_out: jax.Array, x_t: jax.Array, t: jax.Array, noise: jax.Array
               ) -> jax.Array:
    mean, log_var, _ = self.p_mean_variance(model_out, x_t, t)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * log_var) * noise

  def sample(self, model_fn: ModelFn, x_T: jax.Array, rng: jax.Array) -> jax.Array:
    """Ancestral sampling from x_T (pure noise) through every step of this diffusion."""
    return self.sample_with(lambda x, t, key: model_fn(x, t), x_T, rng)

  def sample_with(self, output_fn: _StepOutput, x_T: jax.Array, rng: jax.Array) -> jax.Array:
    """Ancestral sampling where step i calls output_fn(x, model t, key_i); `rng` may be one key
    per image (see diffusion/samplers.py), then every draw of image i comes from its own key."""
    n = x_T.shape[0]

    def step(x, inputs):
      i, key = inputs
      key_model, key_z = split_keys(key, 2)
      t = jnp.full((n,), i, jnp.int32)
      out = output_fn(x, self.model_t(t), key_model).astype(jnp.float32)
      return self.p_sample(out, x, t, normal_noise(key_z, x.shape, x.dtype)), None

    steps = jnp.arange(self.num_steps - 1, -1, -1)
    x, _ = jax.lax.scan(step, x_T.astype(jnp.float32),
                        (steps, split_keys(rng, self.num_steps)))
    return x


def guided_output(cond: jax.Array, uncond: jax.Array, scale: float, in_channels: int,
                  guided_channels: int = 0) -> jax.Array:
  """DiT CFG on an 8-channel output: eps = u + s (c - u) on the first `guided_channels` (0 = all
  eps channels; 3 = DiT's legacy quirk); the rest of eps and the variance come from `cond`."""
  k = guided_channels or in_channels
  guided = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
  return jnp.concatenate([guided, cond[..., k:]], axis=-1)


def sample_loop(model_fn: GroupModelFn, noise: jax.Array, labels: jax.Array, rng: jax.Array, *,
                num_steps: int = 250, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                guidance_high: float = 1.0, cond_group_size: int = 1,
                uncond_group_size: int = 4, null_label: int = 1000, guided_channels: int = 0
                ) -> jax.Array:
  """GroupDiff-DiT sampling: `num_steps` respaced ancestral steps from `noise` (x at t = 999).

  Each step runs the conditional pass (groups of cond_group_size); when cfg_scale != 1 and the
  original step t satisfies low * 1000 <= t <= high * 1000, also the unconditional pass on the
  same x with null labels in groups of uncond_group_size (outside the interval it is skipped,
  not computed and discarded, so the images of a group do not interact there). Guidance acts on
  the first `guided_channels` eps channels (0 = all, GroupDiff-DiT; 3 = DiT's legacy quirk); the
  variance always comes from the conditional pass. Returns float32 [B, H, W, C]. Un-jitted:
  call it inside the caller's jit.
  """
  diffusion = DDPM.create(respacing=str(num_steps))
  channels = noise.shape[-1]
  null = jnp.full_like(labels, null_label)

  def output(x, t_model, key):
    key_c, key_u = split_keys(key, 2)
    cond = model_fn(x, t_model, labels, cond_group_size, key_c).astype(jnp.float32)
    if cfg_scale == 1.0:
      return cond

    def guided(cond):
      uncond = model_fn(x, t_model, null, uncond_group_size, key_u).astype(jnp.float32)
      return guided_output(cond, uncond, cfg_scale, channels, guided_channels)

    frac = t_model[0] / 1000.0  # the original DDPM step, whatever the respacing
    inside = (frac >= guidance_low) & (frac <= guidance_high)
    return jax.lax.cond(inside, guided, lambda c: c, cond)

  return diffusion.sample_with(output, noise, rng)
