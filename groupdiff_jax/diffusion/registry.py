"""Samplers by name, one registry for every kind of checkpoint the sampling job reads.

  SAMPLERS['sde' | 'euler' | 'heun']  flow models (velocity, noise at t = 1): diffusion/samplers.py
  SAMPLERS['ddpm']                    DiT-family DDPM checkpoints (eps + learned variance):
                                      ancestral sampling on a respaced grid, diffusion/ddpm.py

Each entry runs a whole sampling trajectory for one batch:
  run(model_fn, noise [B,H,W,C], labels [B], keys [B], settings) -> x_0 float32 [B,H,W,C]
with `model_fn(x, t, y, group_size, keys) -> output` and `keys` one typed key per image, so every
random draw of image i derives from its own key (the job's batch-independence contract).
`time_scale` maps the model's time input to [0, 1] with 1 = noise (the guidance interval and the
group window are given in that unit): 1 for flow models, 1000 for the DDPM's integer steps.
"""
import dataclasses
from typing import Callable, NamedTuple

import jax

from groupdiff_jax.diffusion import ddpm, samplers

ModelFn = Callable[[jax.Array, jax.Array, jax.Array, int, jax.Array], jax.Array]

FLOW = 'flow_velocity'
DDPM_EPS = 'ddpm_eps_learned_variance'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a trajectory needs besides the model; every field is static under jit."""
  num_steps: int = 250
  cfg_scale: float = 1.0
  guidance_low: float = 0.0
  guidance_high: float = 1.0
  cond_group_size: int = 1
  uncond_group_size: int = 4
  guided_channels: int = 0
  null_label: int = 1000
  last_step_size: float = 0.04


def settings_from(s, num_classes: int) -> Settings:
  """Settings from a `config.sample` block; the null label is the model's class count."""
  return Settings(
      num_steps=s.num_steps, cfg_scale=float(s.cfg_scale), guidance_low=float(s.guidance_low),
      guidance_high=float(s.guidance_high), cond_group_size=s.cond_group_size,
      uncond_group_size=s.uncond_group_size, guided_channels=s.guided_channels,
      null_label=num_classes, last_step_size=float(s.get('last_step_size', 0.04)))


class Sampler(NamedTuple):
  objective: str                       # the checkpoint objective it samples (meta['objective'])
  run: Callable[..., jax.Array]
  nfe: Callable[[int], int]            # model evaluations per branch for num_steps
  time_scale: float


def _flow(name: str) -> Callable[..., jax.Array]:
  def run(model_fn: ModelFn, noise, labels, keys, s: Settings):
    return samplers.sample_loop(
        model_fn, noise, labels, keys, sampler=name, num_steps=s.num_steps,
        cfg_scale=s.cfg_scale, guidance_low=s.guidance_low, guidance_high=s.guidance_high,
        cond_group_size=s.cond_group_size, uncond_group_size=s.uncond_group_size,
        null_label=s.null_label, guided_channels=s.guided_channels,
        last_step_size=s.last_step_size)
  return run


def _ddpm(model_fn: ModelFn, noise, labels, keys, s: Settings) -> jax.Array:
  """DiT's ancestral sampler on `num_steps` respaced steps with group CFG on eps inside the
  interval (in t/1000 with 1 = noise, as GroupDiff-DiT), the variance from cond."""
  return ddpm.sample_loop(
      model_fn, noise, labels, keys, num_steps=s.num_steps, cfg_scale=s.cfg_scale,
      guidance_low=s.guidance_low, guidance_high=s.guidance_high,
      cond_group_size=s.cond_group_size, uncond_group_size=s.uncond_group_size,
      null_label=s.null_label, guided_channels=s.guided_channels)


SAMPLERS = {
    'sde': Sampler(FLOW, _flow('sde'), samplers.SAMPLERS['sde'].nfe, 1.0),
    'euler': Sampler(FLOW, _flow('euler'), samplers.SAMPLERS['euler'].nfe, 1.0),
    'heun': Sampler(FLOW, _flow('heun'), samplers.SAMPLERS['heun'].nfe, 1.0),
    'ddpm': Sampler(DDPM_EPS, _ddpm, lambda n: n, 1000.0),
}
