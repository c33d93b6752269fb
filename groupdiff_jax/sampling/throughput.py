"""Sampling throughput: images/s and image-forwards/s of the sampling job's jitted sampler.

An image-forward is one image through the model once. A trajectory of the flow SDE with CFG costs
`num_steps` conditional forwards plus one unconditional forward per step whose t lies inside the
guidance interval (outside it the unconditional pass is skipped, not computed and discarded), so
at the paper's settings (250 steps, [0.25, 0.75]) an image costs 250 + 130 = 380 forwards.
The model has random weights: the cost does not depend on their values.
"""
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from groupdiff_jax import sharding
from groupdiff_jax.models import sit
from groupdiff_jax.sampling import job
from groupdiff_jax.sampling.plan import Plan


def eval_times(sampler: str, num_steps: int, last_step_size: float = 0.04) -> np.ndarray:
  """The t in [0, 1] (1 = noise) of every model evaluation of one trajectory, per branch."""
  if sampler == 'sde':
    return 1.0 - np.linspace(0.0, 1.0 - last_step_size, num_steps)
  grid = np.linspace(1.0, 0.0, num_steps + 1)
  if sampler == 'euler':
    return grid[:-1]
  if sampler == 'heun':  # predictor on every step, corrector on all but the last
    return np.concatenate([grid[:-1], grid[1:-1]])
  if sampler == 'ddpm':
    from groupdiff_jax.diffusion import ddpm  # pylint: disable=import-outside-toplevel
    return ddpm.DDPM.create(respacing=str(num_steps)).timestep_map / 1000.0
  raise ValueError(f'unknown sampler {sampler!r}')


def forwards_per_image(s: ml_collections.ConfigDict) -> tuple[int, int]:
  """(conditional, unconditional) image-forwards of one image's trajectory."""
  ts = eval_times(s.sampler, s.num_steps, s.last_step_size)
  uncond = 0 if s.cfg_scale == 1.0 else int(((ts >= s.guidance_low) & (ts <= s.guidance_high)).sum())
  return len(ts), uncond


def random_params(cfg: sit.SiTConfig, mesh, rules) -> tuple[Any, Any]:
  graphdef, abstract = nnx.split(jax.eval_shape(lambda: sit.create(cfg)))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(sit.create(cfg))),
                   out_shardings=shardings)()
  return graphdef, params


def time_jax(cfg: sit.SiTConfig, config: ml_collections.ConfigDict, batch: int, reps: int
             ) -> dict:
  """Seconds per batch of the job's jitted sampler (compile excluded), on all local devices."""
  s = config.sample
  group = job.eval_group_size(s)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape, jax.local_devices())
  rules = tuple(config.mesh.rules)
  graphdef, params = random_params(cfg, mesh, rules)
  plan = Plan(cfg.num_classes * group, cfg.num_classes, group, group, seed=0)
  sample = job.make_sample_fn(graphdef, cfg, config, plan, mesh, rules)
  batch = job.batch_for(batch, group, mesh.size)
  t0 = time.perf_counter()
  sample.compile(params, batch)
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(sample(params, np.arange(batch)))  # warm-up run
  t0 = time.perf_counter()
  for r in range(reps):
    jax.block_until_ready(sample(params, np.arange((r + 1) * batch, (r + 2) * batch)))
  secs = (time.perf_counter() - t0) / reps
  return {'batch': batch, 's/batch': secs, 'compile s': compile_s}


def report(name: str, batch: int, secs: float, forwards: int) -> dict:
  images_per_s = batch / secs
  return {'sampler': name, 'batch': batch, 'img/s': images_per_s,
          'image-forwards/s': images_per_s * forwards, 's per 1k images': 1000.0 / images_per_s}
