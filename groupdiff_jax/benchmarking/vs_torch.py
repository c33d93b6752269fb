"""This project against PyTorch on the same CPU, in one process, interleaved.

Each case builds a jax callable (the project's jitted train step / model / sampler, compiled ahead
of time) and the same work in PyTorch (benchmarking/torch_dit.py: diffusers' DiT with group
attention), eager and optionally torch.compile'd. After one warm-up call of each, the callables
run in turn, jax, torch eager, torch.compile, jax, ..., `reps` times, so a change in the
machine's load hits every column alike; the table reports medians, and compile times apart.
"""
import dataclasses
import importlib.util
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from groupdiff_jax import progress, sharding, train_step
from groupdiff_jax.diffusion import samplers
from groupdiff_jax.models import sit


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str          # train | forward | sample | attention (forward + backward of the kernel)
  model: str         # SiT-S/2, ...
  batch: int
  group: int         # train / sample: unconditional group size (GroupDiff-l); forward: all rows
  input_size: int = 32
  channels: int = 4
  steps: int = 50    # sample: SDE steps

  @property
  def name(self) -> str:
    what = {'train': 'train step', 'forward': 'forward', 'sample': f'SDE {self.steps} steps CFG',
            'attention': 'attention fwd+bwd'}
    group = ('GroupDiff-l N=%d' if self.kind in ('train', 'sample') else 'N=%d') % self.group
    if self.kind == 'train' and self.group == 1:
      group = 'N=1'
    return (f'{what[self.kind]} {self.model} {self.input_size}x{self.input_size} '
            f'b{self.batch} {group}')


# The table (its forwards at batch 16 instead of 32, to keep the whole run to minutes on
# two cores; images/s of a 256-token model hardly change between the two), plus the SDE sampler
# with CFG and unconditional groups of 4 on 16x16 latents.
CASES = (
    Case('train', 'SiT-S/2', 16, 1),
    Case('train', 'SiT-S/2', 16, 4),
    Case('forward', 'SiT-S/2', 16, 1),
    Case('forward', 'SiT-S/2', 16, 4),
    Case('forward', 'SiT-B/2', 16, 1),
    Case('forward', 'SiT-B/2', 16, 4),
    Case('sample', 'SiT-S/2', 8, 4, input_size=16),
    # The attention kernel alone ('auto': flash_cpu on CPU) against torch's CPU SDPA, per layer.
    Case('attention', 'SiT-S/2', 16, 1),
    Case('attention', 'SiT-S/2', 16, 4),
    Case('attention', 'SiT-B/2', 16, 4),
)
NUM_CLASSES = 1000


def base_config() -> ml_collections.ConfigDict:
  """configs/common.py: the optimizer, EMA and mesh defaults every trainer config starts from."""
  path = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'common.py')
  spec = importlib.util.spec_from_file_location('_vs_torch_common_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def shrink(case: Case, model: str, input_size: int, batch: int, steps: int) -> Case:
  """The case on another model/size (tests and smoke runs use a tiny model); 0/'' keep."""
  return dataclasses.replace(case, model=model or case.model,
                             input_size=input_size or case.input_size,
                             batch=batch or case.batch, steps=steps or case.steps)


@dataclasses.dataclass
class Side:
  """One column: a callable doing one unit of timed work (blocking), and its compile seconds."""
  name: str
  run: Callable[[], None]
  compile_s: float


# --- jax -----------------------------------------------------------------------------------------

def _jax_config(base: ml_collections.ConfigDict, case: Case) -> ml_collections.ConfigDict:
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.model.name, c.model.input_size = case.model, case.input_size
    c.model.in_channels = case.channels
    c.model.num_classes, c.model.dtype, c.model.attention = NUM_CLASSES, 'float32', 'auto'
    c.model.max_group_size = max(4, case.group)
    c.data.global_batch = case.batch
    c.group.cond_size, c.group.uncond_size = 1, case.group
    c.mesh.shape = (1, 1, 1)
  return c


def _timed_compile(lowered) -> tuple[Callable, float]:
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0


def jax_train(base, case: Case) -> Side:
  config = _jax_config(base, case)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape, jax.devices()[:1])
  trainer = train_step.build(config, mesh)
  state = train_step.init_state(trainer, config.seed)
  step = train_step.make_train_step(trainer, config)
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.standard_normal((case.batch, case.input_size, case.input_size, case.channels),
                                   np.float32),
      'label': rng.integers(0, NUM_CLASSES, case.batch, dtype=np.int32)}, trainer.batch_shardings)
  t0 = time.perf_counter()
  compiled = step.compile(state, batch)
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)  # the state is donated
    jax.block_until_ready(metrics)

  return Side('jax', run, compile_s)


def _jax_model(base, case: Case):
  """(model config, graphdef, parameters on the first device), random initialisation."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = sit.config_from(_jax_config(base, case).model)
  graphdef, state = nnx.split(sit.create(cfg))
  return cfg, graphdef, jax.device_put(nnx.to_pure_dict(state), jax.devices()[0])


def jax_forward(base, case: Case) -> Side:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg, graphdef, params = _jax_model(base, case)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((case.batch, case.input_size, case.input_size,
                                       case.channels), np.float32))
  t = jnp.asarray(rng.uniform(size=case.batch).astype(np.float32))
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, case.batch, dtype=np.int32))
  key = jax.random.PRNGKey(0)

  def apply(params, x, t, y, key):
    return nnx.merge(graphdef, params)(x, t, y, group_size=case.group, rng=key)

  compiled, compile_s = _timed_compile(jax.jit(apply).lower(params, x, t, y, key))
  return Side('jax', lambda: jax.block_until_ready(compiled(params, x, t, y, key)), compile_s)


# The paper's sampling settings (configs/sample_sit_xl.py) but the number of steps.
SAMPLE_SETTINGS = dict(cfg_scale=2.585, guidance_low=0.25,
                       guidance_high=0.75, guided_channels=3, last_step_size=0.04)


def jax_sample(base, case: Case, settings: dict) -> Side:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg, graphdef, params = _jax_model(base, case)
  rng = np.random.default_rng(0)
  noise = jnp.asarray(rng.standard_normal((case.batch, case.input_size, case.input_size,
                                           case.channels), np.float32))
  labels = jnp.asarray(np.arange(case.batch) // case.group % NUM_CLASSES, jnp.int32)

  def run(params, noise, labels, key):
    def velocity(x, t, y, group_size, rng):
      return nnx.merge(graphdef, params)(x, t, y, group_size=group_size, rng=rng)
    return samplers.sample_loop(velocity, noise, labels, key, sampler='sde', cond_group_size=1,
                                uncond_group_size=case.group, null_label=cfg.num_classes,
                                **settings)

  key = jax.random.PRNGKey(0)
  compiled, compile_s = _timed_compile(jax.jit(run).lower(params, noise, labels, key))
  return Side('jax', lambda: jax.block_until_ready(compiled(params, noise, labels, key)),
              compile_s)


def attention_inputs(case: Case) -> list[np.ndarray]:
  """q, k, v and the output cotangent of one layer's group attention: [groups, N*T, heads, hd]."""
  _, _, hidden, heads, patch = sit.parse_name(case.model)
  length = case.group * (case.input_size // patch) ** 2
  shape = (case.batch // case.group, length, heads, hidden // heads)
  rng = np.random.default_rng(0)
  return [rng.standard_normal(shape, np.float32) for _ in range(4)]


def jax_attention(case: Case) -> Side:
  """The project's attention ('auto'), forward and the gradients of q, k and v."""
  from groupdiff_jax.models import attention  # pylint: disable=import-outside-toplevel
  q, k, v, probe = (jnp.asarray(a) for a in attention_inputs(case))
  grads = jax.grad(lambda q, k, v: jnp.sum(attention.attention(q, k, v) * probe), (0, 1, 2))
  compiled, compile_s = _timed_compile(jax.jit(grads).lower(q, k, v))
  return Side('jax', lambda: jax.block_until_ready(compiled(q, k, v)), compile_s)


# --- torch ---------------------------------------------------------------------------------------

def torch_sides(base, case: Case, compiled: bool, settings: dict) -> list[Side]:
  """The eager column, and the torch.compile column when `compiled` (its compile time is the
  first call's time: compilation plus one run)."""
  import torch  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.benchmarking import torch_dit  # pylint: disable=import-outside-toplevel
  _, depth, hidden, heads, patch = sit.parse_name(case.model)
  x, t, y = torch_dit.random_inputs(case.batch, case.channels, case.input_size, NUM_CLASSES)
  sides = []
  for name in ('torch eager', 'torch.compile') if compiled else ('torch eager',):
    model = torch_dit.build(depth, hidden, heads, patch, case.input_size, case.channels,
                            NUM_CLASSES)
    use_compile = name == 'torch.compile'
    if case.kind == 'train':
      o = base.optim
      step = torch_dit.make_train_step(
          model, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay,
          grad_clip=o.grad_clip, ema_decay=o.ema_decay, compiled=use_compile)
      layout = _layout(base, case)
      labels = y.clone()
      labels[layout.num_cond:] = NUM_CLASSES  # the unconditional part gets the null label
      groups = torch_dit.Groups(layout.num_cond, 1, case.group)
      run = lambda step=step, labels=labels, groups=groups: step(x, labels, groups)
    elif case.kind == 'attention':
      if use_compile:
        continue  # one library kernel: nothing for torch.compile to fuse
      run = torch_dit.make_attention(*attention_inputs(case))[0]
    elif case.kind == 'forward':
      fwd = torch_dit.make_forward(model, use_compile)
      groups = torch_dit.Groups(case.batch, case.group, case.group)
      run = lambda fwd=fwd, groups=groups: fwd(x, t, y, groups)
    else:
      if use_compile:
        continue  # the plain loop is the reference; a compiled sampler is not part of the case
      sample = torch_dit.make_sampler(model, cond_group=1, uncond_group=case.group,
                                      null_label=NUM_CLASSES, **settings)
      labels = torch.arange(case.batch) // case.group % NUM_CLASSES
      run = lambda sample=sample, labels=labels: sample(x, labels)
    compile_s = 0.0
    if use_compile:
      t0 = time.perf_counter()
      run()
      compile_s = time.perf_counter() - t0
    sides.append(Side(name, run, compile_s))
  return sides


def _layout(base, case: Case):
  return train_step.layout_from_config(_jax_config(base, case))


# --- the interleaved run -------------------------------------------------------------------------

def time_case(sides: list[Side], reps: int, warmup: int = 3) -> list[float]:
  """Median seconds per call of each side: `warmup` untimed calls each, then `reps` rounds in
  turn.

  Several warm-up calls, not one: both frameworks' first calls fault in fresh memory until the
  allocator's heap settles around what a step frees and takes. The jax SiT-S/2 train step (1.7
  GiB of temporaries) faulted in 2 GB of pages in calls 1, 2 and 4 of one run, each such call
  1-3 s slower, and none after (BENCHMARKS.md, session 7).

  The order alternates round by round (A B, B A, ...): whatever one framework leaves behind for
  the next call (its worker threads still spinning, caches filled with its data) falls on each
  side equally often, not always on the side that runs second."""
  for side in sides:
    for _ in range(warmup):
      side.run()
  times = [[] for _ in sides]
  for round_ in range(reps):
    order = list(zip(sides, times))
    for side, ts in (order if round_ % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      side.run()
      ts.append(time.perf_counter() - t0)
  return [statistics.median(ts) for ts in times]


def run_cases(base, cases: list[Case], reps: int, torch_compile: bool, warmup: int = 3
              ) -> list[dict]:
  rows = []
  bar = progress.Progress('vs_torch', total=len(cases), unit='cases', every_s=0.0)
  for case in cases:
    settings = dict(SAMPLE_SETTINGS, num_steps=case.steps)
    if case.kind == 'train':
      jax_side = jax_train(base, case)
    elif case.kind == 'forward':
      jax_side = jax_forward(base, case)
    elif case.kind == 'attention':
      jax_side = jax_attention(case)
    else:
      jax_side = jax_sample(base, case, settings)
    sides = [jax_side] + torch_sides(base, case, torch_compile, settings)
    medians = time_case(sides, reps, warmup)
    rate = {s.name: case.batch / m for s, m in zip(sides, medians)}
    row = {'case': case.name, 'torch eager img/s': rate['torch eager']}
    if torch_compile:  # the sampler has no compiled column
      row['torch.compile img/s'] = rate.get('torch.compile', 'n/a')
    row.update({'jax img/s': rate['jax'], 'jax / eager': rate['jax'] / rate['torch eager'],
                'jax compile s': jax_side.compile_s})
    if torch_compile:
      row['torch.compile s'] = sides[-1].compile_s if 'torch.compile' in rate else 'n/a'
    row['load'] = f'{os.getloadavg()[0]:.1f}'
    rows.append(row)
    bar.update(1, f'{case.name}: jax / eager {row["jax / eager"]:.2f}x')
  return rows
