"""Training objectives by name: what the network learns, `config.transport.objective`.

  OBJECTIVES['flow']  flow matching, noise at t = 1, velocity target (diffusion/flow.py)
  OBJECTIVES['ddpm']  DiT's DDPM: integer t, eps + learned variance, hybrid loss (diffusion/ddpm.py)

The train step uses an objective in three moves, so the model call in between is the step's own
(one call over the whole GroupDiff batch, or one per branch) and is the same for every objective:

  noised = objective.inputs(x, rng, layout, t_spread, rows)  # x_t, model t, the loss's state
  pred = model(noised.x_t, noised.t, labels, ...)
  per_image, terms = objective.per_image_loss(pred, noised.target)

`rows[r]` is the layout index of batch row r (a batch in shard order; default: layout order).
Times are drawn per group in layout order and noise per layout index, so an image gets the same
draws whatever the row order or the mesh. What is shared by construction: the batch layout (conditional groups, then unconditional groups,
members contiguous) and the group time spread (one base time per group, members within +-spread
of it; DDPM in integer steps, window round(spread * 1000)). Each objective also names the sampler
family that samples its checkpoints (diffusion/registry.py) and the `objective` string its
checkpoints record, which the sampling job matches against the sampler.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from groupdiff_jax.diffusion import ddpm, flow, registry
from groupdiff_jax.layout import BatchLayout


class ObjectiveError(ValueError):
  """An unknown objective, or a model / sampler that cannot serve it."""


class Noised(NamedTuple):
  x_t: jax.Array     # the model's input [B, H, W, C]
  t: jax.Array       # the model's time input, float32 [B]
  target: Any        # whatever per_image_loss needs besides the prediction


# (rng, num_images, group_size) -> times of contiguous groups.
GroupTimes = Callable[[jax.Array, int, int], jax.Array]


def batch_times(rng: jax.Array, layout: BatchLayout, group_times: GroupTimes) -> jax.Array:
  """Times for a whole GroupDiff batch: the conditional groups, then the unconditional groups,
  each part drawn per group by `group_times`."""
  k_cond, k_uncond = jax.random.split(rng)
  parts = []
  if layout.num_cond:
    parts.append(group_times(k_cond, layout.num_cond, layout.cond_group_size))
  if layout.num_uncond:
    parts.append(group_times(k_uncond, layout.num_uncond, layout.uncond_group_size))
  return jnp.concatenate(parts)


def row_noise(rng: jax.Array, rows: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal noise per batch row, keyed by the row's layout index: the same image gets
  the same noise on any mesh (whatever the row order), and each device draws only its rows."""
  keys = jax.vmap(lambda r: jax.random.fold_in(rng, r))(jnp.asarray(rows, jnp.int32))
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _draws(x: jax.Array, rng: jax.Array, layout: BatchLayout, rows: np.ndarray | None,
           group_times: GroupTimes) -> tuple[jax.Array, jax.Array]:
  """(t, noise) of every batch row: times per group in layout order, noise per layout index."""
  rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
  k_time, k_noise = jax.random.split(rng)
  t = batch_times(k_time, layout, group_times)[rows]
  return t, row_noise(k_noise, rows, x.shape[1:])


@dataclasses.dataclass(frozen=True)
class Flow:
  """Flow matching (REPA / GroupDiff-SiT): x_t = (1 - t) x + t eps, v = eps - x, t ~ U[0, 1)."""
  name: str = 'flow'
  checkpoint_objective: str = registry.FLOW
  samplers: tuple[str, ...] = ('sde', 'euler', 'heun')

  def check_model(self, model_cfg) -> None:
    del model_cfg  # any head: learned-sigma channels simply get no loss

  def inputs(self, x: jax.Array, rng: jax.Array, layout: BatchLayout, t_spread: float,
             rows: np.ndarray | None = None) -> Noised:
    t, noise = _draws(x, rng, layout, rows,
                      lambda k, n, g: flow.group_times(k, n, g, t_spread))
    return Noised(flow.interpolate(x, noise, t), t, flow.velocity_target(x, noise))

  def per_image_loss(self, pred: jax.Array, target: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    return flow.per_image_mse(pred, target), {}


class DdpmTarget(NamedTuple):
  x0: jax.Array
  x_t: jax.Array
  t: jax.Array      # integer steps [B]
  noise: jax.Array


@dataclasses.dataclass(frozen=True)
class Ddpm:
  """DiT's DDPM: t ~ randint[0, 1000), x_t = sqrt(a) x + sqrt(1 - a) eps, eps-MSE + VLB."""
  name: str = 'ddpm'
  checkpoint_objective: str = registry.DDPM_EPS
  samplers: tuple[str, ...] = ('ddpm',)
  num_steps: int = 1000

  @functools.cached_property
  def diffusion(self) -> ddpm.DDPM:
    return ddpm.DDPM.create(self.num_steps)

  def check_model(self, model_cfg) -> None:
    if not model_cfg.learn_sigma:
      raise ObjectiveError('the ddpm objective learns the variance: set '
                           '--config.model.learn_sigma=True (2C output channels)')
    if model_cfg.time_convention != 'noise_at_1':
      raise ObjectiveError('the ddpm objective feeds integer t raw: set '
                           "--config.model.time_convention=noise_at_1")

  def inputs(self, x: jax.Array, rng: jax.Array, layout: BatchLayout, t_spread: float,
             rows: np.ndarray | None = None) -> Noised:
    window = int(round(t_spread * self.num_steps))
    t, noise = _draws(x, rng, layout, rows,
                      lambda k, n, g: ddpm.group_steps(k, n, g, window, self.num_steps))
    diffusion = self.diffusion
    x_t = diffusion.q_sample(x.astype(jnp.float32), t, noise)
    return Noised(x_t, diffusion.model_t(t), DdpmTarget(x.astype(jnp.float32), x_t, t, noise))

  def per_image_loss(self, pred: jax.Array, target: DdpmTarget
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    terms = self.diffusion.training_losses(pred.astype(jnp.float32), *target)
    return terms['loss'], {'mse': terms['mse'], 'vb': terms['vb']}


OBJECTIVES = {'flow': Flow(), 'ddpm': Ddpm()}


def get(name: str) -> Flow | Ddpm:
  if name not in OBJECTIVES:
    raise ObjectiveError(f'--config.transport.objective={name!r}: unknown; known: '
                         f'{", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]


def from_config(config) -> Flow | Ddpm:
  """The objective of a training config, checked against its model and sampler."""
  objective = get(config.transport.objective)
  if config.sample.sampler not in objective.samplers:
    raise ObjectiveError(f'--config.sample.sampler={config.sample.sampler!r} does not sample the '
                         f'{objective.name} objective; use {" or ".join(objective.samplers)}')
  return objective
