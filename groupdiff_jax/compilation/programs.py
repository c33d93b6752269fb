"""The two programs a run executes, compiled ahead of time for any device set: the train step
(exactly the trainer's jitted step) and one sampling step (the sampler's guided model call:
conditional groups plus, with CFG, unconditional groups, on the EMA parameters).

Arguments are abstract (`jax.ShapeDtypeStruct` with their shardings), so nothing is allocated:
with libtpu's topology devices this compiles for a TPU slice on a CPU host.
"""
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp

from groupdiff_jax import flops, sharding, train_step
from groupdiff_jax.models import group_attention

# The programs the AOT tool compiles, by --programs name.
NAMES = {'train': 'train step', 'sample': 'sampling step'}


@dataclasses.dataclass
class Program:
  name: str
  compiled: Any             # jax.stages.Compiled
  images: int               # images one execution processes (the global batch)
  analytic_flops: float     # flops.py's count for those images
  compile_s: float
  dense_flops: float = 0.0  # the same without attention: what runs outside attention kernels
  # Share of chips that take each branch of group attention's per-shard `lax.switch`: a chip
  # executes one branch, so its FLOPs are weighted by these (None: no switch in the program).
  branch_weights: tuple[float, ...] | None = None


def abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def batch_args(trainer: train_step.Trainer) -> dict:
  cfg, n = trainer.model_cfg, trainer.layout.global_batch
  shapes = {'image': ((n, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32),
            'label': ((n,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_shardings[k])
          for k, (s, d) in shapes.items()}


def compile_train(trainer: train_step.Trainer, config) -> Program:
  step = train_step.make_train_step(trainer, config)
  state = abstract(trainer.abstract_state, trainer.state_shardings)
  t0 = time.perf_counter()
  compiled = step.compile(state, batch_args(trainer))
  n, cfg = trainer.layout.global_batch, trainer.model_cfg
  return Program(NAMES['train'], compiled, n, flops.train_flops_per_batch(cfg, trainer.layout),
                 time.perf_counter() - t0, 3 * n * flops.forward_flops_per_image(cfg, 0),
                 group_attention.branch_shares(trainer.mesh, trainer.rules, trainer.groups))


def sample_group_sizes(config) -> tuple[int, int | None]:
  """(conditional, unconditional or None without CFG) group sizes of the sampler's model call."""
  s = config.sample
  return s.cond_group_size, (s.uncond_group_size if s.cfg_scale != 1.0 else None)


def compile_sample(trainer: train_step.Trainer, config) -> Program:
  """One guided sampling step over a global batch of images (inside the guidance interval)."""
  cond_size, uncond_size = sample_group_sizes(config)
  apply, null = train_step.model_apply(trainer), trainer.model_cfg.num_classes
  scale = float(config.sample.cfg_scale)

  def velocity(params, x, t, y, rng):
    k_cond, k_uncond = jax.random.split(rng)
    v = apply(params, x, t, y, cond_size, k_cond)
    if uncond_size:
      v_null = apply(params, x, t, jnp.full_like(y, null), uncond_size, k_uncond)
      v = v_null + scale * (v - v_null)
    return v

  batch = batch_args(trainer)
  params = abstract(trainer.abstract_state['params'], trainer.state_shardings['params'])
  t = jax.ShapeDtypeStruct(batch['label'].shape, jnp.float32,
                           sharding=trainer.batch_shardings['label'])
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(trainer.mesh))
  jitted = jax.jit(velocity, out_shardings=trainer.batch_shardings['image'])
  t0 = time.perf_counter()
  with sharding.use_mesh(trainer.mesh, trainer.rules):
    compiled = jitted.lower(params, batch['image'], t, batch['label'], rng).compile()
  n, cfg = trainer.layout.global_batch, trainer.model_cfg
  analytic = n * flops.forward_flops_per_image(cfg, cond_size)
  if uncond_size:
    analytic += n * flops.forward_flops_per_image(cfg, uncond_size)
  dense = (2 if uncond_size else 1) * n * flops.forward_flops_per_image(cfg, 0)
  return Program(NAMES['sample'], compiled, n, analytic, time.perf_counter() - t0, dense)
