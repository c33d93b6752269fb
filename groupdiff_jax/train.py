"""The training loop: workdir, mesh and model, data, state (resume / fine-tune / fresh), steps,
checkpoints, and a sample grid at the end. Read it top to bottom."""
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from groupdiff_jax import (checkpoint, flops, generate, image_grid, multihost, progress, sharding,
                           train_step)
from groupdiff_jax import layout as batch_layout
from groupdiff_jax.data import pipeline
from groupdiff_jax.diffusion import objectives
from groupdiff_jax.evaluation import in_training
from groupdiff_jax.metrics_writer import MetricsWriter
from groupdiff_jax.models import group_attention

# Fields of config.model that make two checkpoints incompatible.
MODEL_IDENTITY = ('name', 'input_size', 'in_channels', 'num_classes', 'learn_sigma',
                  'max_group_size')


class WorkdirError(OSError):
  pass


class TrainingDiverged(RuntimeError):
  pass


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it is writable before any work starts."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'workdir {workdir} is not writable: {e.strerror or e}') from e


def run_meta(config: ml_collections.ConfigDict, mesh) -> dict:
  objective = objectives.get(config.transport.objective)  # what the sampling job matches
  return {'model': config.model.to_dict(), 'time_convention': config.model.time_convention,
          'objective': objective.checkpoint_objective,
          'mesh': {'axes': list(mesh.axis_names), 'shape': [int(s) for s in mesh.devices.shape]},
          'config': json.loads(config.to_json())}


def check_same_model(ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another model."""
  saved = None
  for step in reversed(ckpt.steps()):  # the newest readable metadata (skip a half-written step)
    try:
      saved = ckpt.read_meta(step).get('model', {})
      break
    except Exception:  # pylint: disable=broad-except
      continue
  if saved is None:
    return
  diff = {k: (saved.get(k), config.model[k]) for k in MODEL_IDENTITY if saved.get(k) != config.model[k]}
  if diff:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in diff.items())
    raise checkpoint.CheckpointError(
        f'checkpoints in {ckpt.directory} are from a different model ({detail}); '
        'use a new --workdir or --config.init_from to fine-tune')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics."""
  multihost.check_processes(config)  # same config and code everywhere, before anything is written
  in_training.check(config)
  prepare_workdir(workdir)
  is_main = jax.process_index() == 0

  # --- mesh, model, optimizer: nothing allocated yet ---------------------------------------
  mesh = sharding.mesh_from_config(config)
  trainer = train_step.build(config, mesh)
  layout = trainer.layout
  split, split_warning = batch_layout.describe_split(layout, config.group.uncond_fraction)
  progress.say(multihost.describe_process(mesh))  # every process: where its devices sit
  progress.say(f'mesh {dict(mesh.shape)} | model {config.model.name} | batch: {split}')
  if split_warning:
    progress.say(split_warning)
  mesh_shards = group_attention.batch_shard_counts(mesh, trainer.rules)[0]
  if trainer.batch_shards < mesh_shards:  # it works, but the attention is replicated
    progress.say(f'note: {mesh_shards} batch shards of {layout.global_batch // mesh_shards} '
                 f'images cannot each hold whole groups; group attention runs on '
                 f'{trainer.batch_shards} shards and repeats the work on the rest; choose '
                 f'data.global_batch or the group sizes so that they can')

  # --- data -------------------------------------------------------------------------------
  # This process reads exactly the plan rows its devices hold (any mesh, any process layout).
  model_shape = (config.model.input_size, config.model.input_size, config.model.in_channels)
  rows = sharding.batch_rows(trainer.batch_shardings['image'], (layout.global_batch, *model_shape))
  data = pipeline.make_train_data(config, layout, workdir=workdir, rows=rows,
                                  order=trainer.order)
  progress.say(data.summary())  # epoch 0's grouping statistics
  if tuple(data.image_shape) != model_shape:
    raise ValueError(f'data source {config.data.source!r} gives images {tuple(data.image_shape)} '
                     f'but the model expects {model_shape} (model.input_size/in_channels)')

  # --- state: resume this run, else fine-tune from init_from, else fresh ---------------------
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'), max_to_keep=config.keep_ckpts)
  check_same_model(ckpt, config)
  sh, abstract = trainer.state_shardings, trainer.abstract_state
  saved_keys = ('step', 'params', 'opt_state')
  restored = ckpt.restore_latest(
      state={k: abstract[k] for k in saved_keys}, state_shardings={k: sh[k] for k in saved_keys},
      ema=abstract['ema'], ema_shardings=sh['ema'])
  if restored is not None:
    start_step, items = restored
    state = dict(items['state'], ema=items['ema'])
    data.set_state(items['data'])
    finished = ' (total_steps reached: nothing to train)' if start_step >= config.total_steps else ''
    progress.say(f'resumed from step {start_step} in {ckpt.directory}{finished}')
  elif config.init_from:
    params, ema, meta = checkpoint.load_weights(config.init_from, params=abstract['params'],
                                                shardings=sh['params'])
    # Same shapes either way: a wrong convention would load and silently train the wrong function.
    saved_convention = meta.get('model', {}).get('time_convention')
    if saved_convention and saved_convention != config.model.time_convention:
      raise checkpoint.CheckpointError(
          f'{config.init_from} records time_convention={saved_convention!r} but the config says '
          f'{config.model.time_convention!r}; pass --config.model.time_convention='
          f'{saved_convention}')
    saved_objective = meta.get('objective')
    if saved_objective and saved_objective != trainer.objective.checkpoint_objective:
      # Allowed (an initialisation), but the output head means something else: say so.
      progress.say(f'note: {config.init_from} was trained as {saved_objective}; this run trains '
                   f'{trainer.objective.checkpoint_objective} (transport.objective='
                   f'{trainer.objective.name}), so expect a re-adaptation phase')
    state = train_step.init_state(trainer, config.seed, params=ema if ema is not None else params)
    start_step = 0
    progress.say(f'fine-tuning from {config.init_from} '
                 f'({meta.get("source", "trainer checkpoint")}, '
                 f'{"EMA" if ema is not None else "raw"} weights)')
  else:
    state = train_step.init_state(trainer, config.seed)
    start_step = 0

  if is_main:  # only now: a config refused above must not overwrite the run's config.json
    write_if_changed(os.path.join(workdir, 'config.json'), config.to_json(indent=1))

  # --- the loop ---------------------------------------------------------------------------
  step_fn = train_step.make_train_step(trainer, config)
  if start_step < config.total_steps:  # compile before the clock starts, and say so
    progress.say('compiling the train step...')
    t0 = time.perf_counter()
    step_fn = step_fn.compile(state, abstract_batch(trainer, data))
    progress.say(f'compiled the train step in {time.perf_counter() - t0:.1f}s')
  # In-training evaluation (None when eval.every_steps is 0): the digits reference trains its
  # classifier here once (cached in the workdir).
  evaluator = (in_training.build(config, trainer, workdir) if start_step < config.total_steps
               else None)
  writer = MetricsWriter(workdir, config.total_steps, images_per_step=layout.global_batch,
                         flops_per_step=flops.train_flops_per_batch(trainer.model_cfg, layout),
                         peak_flops=flops.peak_flops_per_device(), num_devices=mesh.size)
  ckpt.install_sigterm_handler()
  meta = run_meta(config, mesh)
  last, last_eval = {}, {}

  def save(step: int, metrics) -> None:
    loss = float(metrics['loss'])
    if not math.isfinite(loss):  # never write a diverged state over the last good one
      raise TrainingDiverged(f'loss is {loss} at step {step}; stopped without saving, the last '
                             f'good checkpoint in {ckpt.directory} is kept')
    t0 = time.perf_counter()
    ckpt.save(step, state={k: state[k] for k in saved_keys}, ema=state['ema'],
              data=data.get_state(), meta=dict(meta, step=step), force=True)
    writer.exclude(time.perf_counter() - t0)  # checkpoint time is not training throughput

  if start_step < config.total_steps:
    writer.start(start_step)
  step, metrics = start_step, None
  try:
    while step < config.total_steps:
      batch = {k: sharding.assemble_batch(trainer.batch_shardings[k],
                                          (layout.global_batch, *v.shape[1:]), rows, v)
               for k, v in next(data).items()}
      state, metrics = step_fn(state, batch)
      step += 1
      done = step == config.total_steps
      if step % config.log_every_steps == 0 or done:
        last = writer.write(step, jax.device_get(metrics))
        if not math.isfinite(last['loss']):
          raise TrainingDiverged(f'loss is {last["loss"]} at step {step}; stopped, the last '
                                 f'good checkpoint in {ckpt.directory} is kept')
      if evaluator and evaluator.due(step, config.total_steps):
        t0 = time.perf_counter()
        last_eval = evaluator(state['ema'])
        writer.log(step, last_eval, in_training.describe(step, last_eval, evaluator.num_samples))
        writer.exclude(time.perf_counter() - t0)  # evaluation is not training throughput
      preempted = ckpt.preempted(step)
      if step % config.ckpt_every_steps == 0 or done or preempted:
        save(step, metrics)
      if preempted:
        progress.say(f'preemption signal: saved step {step}, exiting')
        break
  finally:  # also on divergence or a crash: finish writing the async save still in flight
    ckpt.close()
    writer.close()

  # --- a grid of samples from the EMA weights -----------------------------------------------
  if config.sample.write_grid and config.sample.num_images > 0 and step == config.total_steps:
    t0 = time.perf_counter()  # every process samples (one SPMD program); process 0 writes
    images, labels = generate.generate_images(trainer, config.sample, state['ema'],
                                         config.sample.num_images, config.sample.seed)
    if is_main:
      path = os.path.join(workdir, f'samples_step{step}.png')
      columns = max(config.sample.cond_group_size, config.sample.uncond_group_size)
      # Legend: row r holds one group, all of class r (generate.group_labels).
      image_grid.save_grid(images, path, columns=columns, scale=4,
                           row_labels=[str(y) for y in labels[::columns]])
      progress.say(f'wrote {path} ({len(images)} samples, {time.perf_counter() - t0:.1f}s)')
  if last_eval:  # the run's last lines: how good its samples are
    progress.say('final ' + in_training.describe(step, last_eval, evaluator.num_samples))
  return dict(last, **last_eval, step=step)


def abstract_batch(trainer: train_step.Trainer, data: pipeline.TrainData) -> dict:
  """Global shapes, dtypes and shardings of a batch, for compiling the step ahead of time."""
  return {k: jax.ShapeDtypeStruct((trainer.layout.global_batch, *spec.shape[1:]), spec.dtype,
                                  sharding=trainer.batch_shardings[k])
          for k, spec in data.element_spec.items()}


def write_if_changed(path: str, text: str) -> None:
  """Writes `text` to `path` unless it already holds exactly that (a rerun changes nothing)."""
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def steps_done(workdir: str) -> list[int]:
  """Steps with a complete checkpoint in a workdir (for tools and tests)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'), read_only=True, async_save=False)
  try:
    return ckpt.steps()
  finally:
    ckpt.close()


def final_losses(workdir: str) -> np.ndarray:
  """The logged losses of a run, in step order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if 'loss' in r]  # not the evaluation rows
  return np.array([r['loss'] for r in sorted(rows, key=lambda r: r['step'])])
