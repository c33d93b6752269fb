"""The offline sampling job: checkpoint -> images -> `.npz` shards, resumable, any device count.

Read top to bottom: check the settings (before anything is written), find the checkpoint and its
model, lay out the plan and the output directory, restore the EMA weights onto the local mesh,
then sample shard after shard. Multi-host: every process runs the same command on a mesh of its
own devices and samples the shards k with k % process_count == process_index; no collective
crosses hosts, and `merge` (once every process is done) joins the shards.
"""
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from groupdiff_jax import image_grid, progress, sharding
from groupdiff_jax.cli import UserError
from groupdiff_jax.diffusion import registry
from groupdiff_jax.models import sit
from groupdiff_jax.sampling import shards, weights
from groupdiff_jax.sampling.plan import Plan, image_keys, initial_noise

PRECISIONS = ('bfloat16', 'float32')


# --- settings -------------------------------------------------------------------------------

def check_settings(config: ml_collections.ConfigDict) -> None:
  """Every setting the checkpoint does not decide, checked before anything is read or written."""
  s = config.sample
  if s.sampler not in registry.SAMPLERS:
    raise UserError(f'--config.sample.sampler={s.sampler!r}: unknown; known: '
                    f'{", ".join(registry.SAMPLERS)}')
  if not 0.0 <= s.guidance_low <= s.guidance_high <= 1.0:
    raise UserError(f'guidance interval [{s.guidance_low}, {s.guidance_high}] must lie in [0, 1] '
                    'with low <= high (t in [0, 1], 1 = noise)')
  lo, hi = s.group_t_range
  if not 0.0 <= lo <= hi <= 1.0:
    raise UserError(f'--config.sample.group_t_range=({lo}, {hi}) must lie in [0, 1] with '
                    'low <= high')
  for name in ('cond_group_size', 'uncond_group_size'):
    if s[name] < 1:
      raise UserError(f'--config.sample.{name}={s[name]} must be >= 1')
  g = eval_group_size(s)
  for name in ('cond_group_size', 'uncond_group_size'):
    if g % s[name]:
      raise UserError(f'--config.sample.{name}={s[name]} does not divide the eval group of {g} '
                      '(max of the two group sizes): a group of one class must split into both')
  if s.num_steps < 1:
    raise UserError(f'--config.sample.num_steps={s.num_steps} must be >= 1')
  if config.precision not in PRECISIONS:
    raise UserError(f'--config.precision={config.precision!r}: use one of {PRECISIONS}')
  if config.batch_size < 1:
    raise UserError(f'--config.batch_size={config.batch_size} must be >= 1')


def eval_group_size(s: ml_collections.ConfigDict) -> int:
  """G = max(cond, uncond): the images of a group share one class (the official eval)."""
  return max(s.cond_group_size, s.uncond_group_size)


def settings(s: ml_collections.ConfigDict, num_classes: int) -> registry.Settings:
  return registry.settings_from(s, num_classes)


def check_model(config, source: weights.Source, cfg: sit.SiTConfig) -> None:
  s = config.sample
  entry = registry.SAMPLERS[s.sampler]
  if entry.objective != source.objective:
    fitting = [n for n, e in registry.SAMPLERS.items() if e.objective == source.objective]
    raise UserError(f'--config.sample.sampler={s.sampler} samples {entry.objective} models, but '
                    f'the checkpoint is {source.objective}; use {" or ".join(fitting) or "none"}')
  if cfg.max_group_size and eval_group_size(s) > cfg.max_group_size:
    raise UserError(f'group size {eval_group_size(s)} exceeds the checkpoint\'s sample-embedding '
                    f'table ({cfg.max_group_size} rows)')
  if not config.vae and cfg.in_channels not in (1, 3):
    raise UserError(f'{cfg.in_channels}-channel latents need a decoder: pass --config.vae=DIR '
                    '(a diffusers AutoencoderKL directory, e.g. sd-vae-ft-mse)')
  if config.vae and not os.path.isdir(config.vae):
    raise UserError(f'--config.vae={config.vae}: no such directory')


def run_identity(config, source: weights.Source, plan: Plan) -> dict:
  """What makes two runs produce the same images: recorded in the manifest, checked on restart.
  Batch size, device count and attention kernel are absent: the images do not depend on them."""
  return {'checkpoint': os.path.abspath(source.path), 'step': source.step,
          'model': source.meta['model']['name'], 'objective': source.objective,
          'use_ema': bool(config.use_ema), 'sample': json.loads(config.sample.to_json()),
          'num_samples': plan.num_samples, 'num_generated': plan.num_generated,
          'group_size': plan.group_size, 'round_groups': plan.round_groups,
          'shard_size': plan.shard_size, 'seed': plan.seed, 'precision': config.precision,
          'vae': os.path.abspath(config.vae) if config.vae else ''}


# --- the jitted sampler ---------------------------------------------------------------------

def group_sample_ids(keys: jax.Array, group_size: int, cfg: sit.SiTConfig) -> jax.Array | None:
  """The model's per-group sample-embedding ids (the first M of a random permutation), drawn from
  the key of each group's first image, so they too depend only on (seed, id)."""
  if not cfg.max_group_size or cfg.fixed_sample_ids:
    return None  # no table, or the model's fixed ids 0..M-1 (no randomness)
  u = jax.vmap(lambda k: jax.random.uniform(k, (cfg.max_group_size,)))(keys[::group_size])
  return jnp.argsort(u, axis=-1)[:, :group_size].reshape(-1)


def make_model_fn(graphdef: Any, cfg: sit.SiTConfig, *, time_scale: float,
                  group_t_range: tuple[float, float], group_blocks: int) -> Callable:
  """(params, x, t, y, group_size, keys) -> output, with the inference group schedule: group
  attention only while t (in [0, 1], 1 = noise) is inside `group_t_range` and only in the first
  `group_blocks` blocks (-1 = all); group size 1 elsewhere."""
  lo, hi = group_t_range
  blocks = None if group_blocks < 0 else group_blocks

  def model_fn(params, x, t, y, group_size, keys):
    model = nnx.merge(graphdef, params)

    def call(size):
      return model(x, t, y, group_size=size, sample_ids=group_sample_ids(keys, size, cfg),
                   group_blocks=blocks)

    if group_size == 1 or (lo, hi) == (0.0, 1.0):
      return call(group_size)
    frac = t[0] / time_scale
    return jax.lax.cond((frac >= lo) & (frac <= hi), lambda: call(group_size), lambda: call(1))
  return model_fn


def make_sample_fn(graphdef: Any, cfg: sit.SiTConfig, config, plan: Plan, mesh: Mesh,
                   rules: Any) -> Callable[[Any, np.ndarray], jax.Array]:
  """(params, ids [B]) -> x_0 float32 [B, H, W, C] for those ids, jitted once per batch size."""
  s = config.sample
  entry = registry.SAMPLERS[s.sampler]
  run_settings = settings(s, cfg.num_classes)
  model_fn = make_model_fn(graphdef, cfg, time_scale=entry.time_scale,
                           group_t_range=tuple(s.group_t_range), group_blocks=s.group_blocks)
  shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
  ids_sharding = NamedSharding(mesh, sharding.logical_to_spec(('batch',), rules, mesh))
  out_sharding = sharding.batch_sharding(mesh, rules, 4)

  @jax.jit
  def sample(params, ids):
    labels = ((ids // plan.group_size) % plan.num_classes).astype(jnp.int32)
    noise_keys, keys = image_keys(plan.seed, ids)
    noise = initial_noise(noise_keys, shape)
    fn = lambda x, t, y, size, k: model_fn(params, x, t, y, size, k)  # noqa: E731
    return jax.lax.with_sharding_constraint(
        entry.run(fn, noise, labels, keys, run_settings), out_sharding)

  compiled = {}  # batch size -> executable, compiled ahead of time (timed apart from sampling)

  def compile_for(params, batch: int):
    if batch not in compiled:
      ids = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=ids_sharding)
      with sharding.use_mesh(mesh, rules):  # activation constraints bind at trace time
        compiled[batch] = sample.lower(params, ids).compile()
    return compiled[batch]

  def run(params, ids):
    ids = jax.device_put(np.asarray(ids, np.int32), ids_sharding)
    return compile_for(params, ids.shape[0])(params, ids)  # params arrive sharded on the mesh
  run.compile = compile_for
  return run


def batch_for(requested: int, group_size: int, num_devices: int) -> int:
  """The batch actually run: whole groups, split evenly over the devices."""
  unit = math.lcm(group_size, num_devices)
  return max(unit, -(-requested // unit) * unit)


# --- the job --------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples every shard of this process that is not written yet; merges when all are."""
  check_settings(config)
  source = weights.locate(config.ckpt, config.step)
  weights.check_weights(source, config.use_ema)
  cfg = weights.model_config(source, dtype=config.precision, attention=config.attention)
  check_model(config, source, cfg)
  plan = Plan(config.num_samples, cfg.num_classes, eval_group_size(config.sample),
              config.shard_size, config.sample.seed, config.round_groups)
  pi, pc = jax.process_index(), jax.process_count()
  shards.prepare(workdir, shards.manifest(run_identity(config, source, plan), plan),
                 write=pi == 0)
  if pc > 1:  # the others read the manifest only after process 0 wrote it
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('groupdiff_sample_manifest')
  done = shards.finished(workdir, plan)
  todo = [k for k in plan.shards_of(pi, pc) if k not in done]
  entry = registry.SAMPLERS[config.sample.sampler]
  nfe = entry.nfe(config.sample.num_steps) * (1 if config.sample.cfg_scale == 1.0 else 2)
  progress.say(f'checkpoint {source.path} step {source.step} | {source.meta["model"]["name"]} '
               f'({source.objective}, {"EMA" if config.use_ema else "raw"} weights, '
               f'{config.precision}) | {config.sample.sampler} {config.sample.num_steps} steps, '
               f'<= {nfe} NFE | {plan.num_samples} images ({plan.num_generated} drawn) in '
               f'{plan.num_shards} shards, {len(done)} already written, {len(todo)} to do here')
  if todo:
    _sample_shards(config, source, cfg, plan, todo, workdir)
  if pc == 1 and len(shards.finished(workdir, plan)) == plan.num_shards:
    path = shards.merge(workdir, grid_images=config.grid_images)
    progress.say(f'wrote {path} ({plan.num_samples} images)')
  return {'done': len(done), 'sampled': len(todo), 'num_shards': plan.num_shards}


def _sample_shards(config, source, cfg, plan, todo, workdir) -> None:
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape, jax.local_devices())
  rules = tuple(config.mesh.rules)
  graphdef, params = weights.restore(source, cfg, mesh, rules, use_ema=config.use_ema)
  sample = make_sample_fn(graphdef, cfg, config, plan, mesh, rules)
  decode = make_decoder(config.vae, mesh)
  batch = batch_for(config.batch_size, plan.group_size, mesh.size)
  if batch != config.batch_size:
    progress.say(f'note: batch {config.batch_size} -> {batch} (whole groups of '
                 f'{plan.group_size}, split over {mesh.size} devices)')
  t0 = time.perf_counter()
  sample.compile(params, batch)  # apart, so that the rate below is sampling only
  progress.say(f'compiled the sampler (batch {batch}) in '
               f'{progress.duration(time.perf_counter() - t0)}')
  total = sum(plan.num_kept(*plan.shard_range(k)) for k in todo)
  bar = progress.Progress('sample', total, unit='images')
  for k in todo:
    start, end = plan.shard_range(k)
    images = []
    for lo in range(start, end, batch):
      ids = np.arange(lo, lo + batch)  # ids past `end` pad the last batch and are dropped
      images.append(decode(sample(params, ids))[:end - lo])
    ids = np.arange(start, end)
    keep = plan.kept(ids)
    shards.write_shard(workdir, k, start, end, np.concatenate(images)[keep],
                       plan.labels(ids)[keep], ids[keep].astype(np.int64))
    bar.update(int(keep.sum()), extra=f'shard {k + 1}/{plan.num_shards}')


def make_decoder(vae_path: str, mesh: Mesh) -> Callable[[jax.Array], np.ndarray]:
  """x_0 -> uint8 NHWC: the SD-VAE decode of latents (x / scaling factor), or the pixels."""
  if not vae_path:
    return lambda x: image_grid.to_uint8(np.asarray(x))
  from groupdiff_jax.models import vae  # pylint: disable=import-outside-toplevel
  model = vae.load(vae_path, mesh=jax.sharding.Mesh(mesh.devices.reshape(-1), ('batch',)))
  return lambda x: image_grid.to_uint8(np.asarray(model.decode(x)))
