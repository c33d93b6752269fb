"""Generating images from a trained state: one jitted sampler call with the params as arguments."""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from groupdiff_jax import sharding
from groupdiff_jax.diffusion import registry
from groupdiff_jax.train_step import Trainer, model_apply


def group_labels(num_images: int, group_size: int, num_classes: int, offset: int = 0) -> np.ndarray:
  """Each group of `group_size` consecutive images shares a class; classes cycle (official eval)."""
  return ((np.arange(num_images) // group_size + offset) % num_classes).astype(np.int32)


def make_generate_fn(trainer: Trainer, sample_cfg) -> Callable:
  """(params, noise, labels, rng) -> samples, jitted once; params stay traced arguments."""
  entry = registry.SAMPLERS[sample_cfg.sampler]  # flow samplers or DDPM, by name
  settings = registry.settings_from(sample_cfg, trainer.model_cfg.num_classes)
  apply = model_apply(trainer)

  @jax.jit
  def generate(params, noise, labels, rng):
    return entry.run(functools.partial(apply, params), noise, labels, rng, settings)

  def run(params, noise, labels, rng):
    with sharding.use_mesh(trainer.mesh, trainer.rules):
      return generate(params, noise, labels, rng)
  return run


def generate_images(trainer: Trainer, sample_cfg, params, num_images: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Samples `num_images` images (class per group of max(cond, uncond) group size)."""
  cfg = trainer.model_cfg
  group = max(sample_cfg.cond_group_size, sample_cfg.uncond_group_size)
  labels = group_labels(num_images, group, cfg.num_classes)
  key = jax.random.PRNGKey(seed)
  noise = jax.random.normal(key, (num_images, cfg.input_size, cfg.input_size, cfg.in_channels))
  images = make_generate_fn(trainer, sample_cfg)(params, noise, jnp.asarray(labels),
                                                 jax.random.fold_in(key, 1))
  return gather(images), labels


def gather(images: jax.Array) -> np.ndarray:
  """A batch sharded over the devices as one host array; on several hosts, on every process."""
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))
