"""The fit check of `python -m groupdiff_jax.aot`: compile, measure, report, propose."""
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from groupdiff_jax import progress, sharding, train_step
from groupdiff_jax.compilation import fit, report, topology
from groupdiff_jax.compilation import programs as program_lib  # run() takes a `programs` tuple
from groupdiff_jax.compilation.topology import Topology

COMPILERS = {'train': program_lib.compile_train, 'sample': program_lib.compile_sample}


def check(config, slice_: Topology, *, devices: list | None = None,
          which: tuple[str, ...] = ('train', 'sample'), mfu: float = 0.4,
          say: Callable[[str], None] = progress.say, hlo_dir: str = '') -> list[report.Numbers]:
  """Compiles `which` programs of `config` for the slice and measures them."""
  devices = topology.devices(slice_) if devices is None else devices
  mesh = sharding.mesh_from_config(config, devices)
  trainer = train_step.build(config, mesh)
  fsdp_min = report.fsdp_minimum(trainer, jnp.dtype(trainer.model_cfg.dtype).itemsize)
  out = []
  for name in which:
    say(f'compiling the {program_lib.NAMES[name]} for {slice_.libtpu_name} on mesh '
        f'{dict(mesh.shape)} (SiT-XL/2 takes minutes on a CPU host) ...')
    minimum = fsdp_min if name == 'train' else None
    try:
      program = COMPILERS[name](trainer, config)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      out.append(report.out_of_memory(program_lib.NAMES[name], slice_, str(e), minimum, mfu))
      continue
    if hlo_dir:
      path = os.path.join(hlo_dir, f'{slice_.libtpu_name.replace(":", "_")}_{name}.hlo.txt')
      with open(path + '.tmp', 'w') as f:
        f.write(program.compiled.as_text())
      os.replace(path + '.tmp', path)
    out.append(report.measure(program, slice_, mfu, minimum))
  return out


def run(config, slice_: Topology, *, programs: tuple[str, ...], mfu: float, max_tries: int,
        label: str, say: Callable[[str], None] = progress.say,
        hlo_dir: str = '') -> list[report.Numbers]:
  devices = topology.devices(slice_)
  say(f'{slice_.describe()}; {len(devices)} devices')
  say(f'model {config.model.name} | batch {config.data.global_batch} | groups '
      f'{config.group.cond_size}/{config.group.uncond_size} (cond/uncond) | attention '
      f'{config.model.attention} | remat {config.model.remat} | mesh {tuple(config.mesh.axes)} '
      f'{tuple(config.mesh.shape)}')
  results = check(config, slice_, devices=devices, which=programs, mfu=mfu, say=say,
                  hlo_dir=hlo_dir)
  for n in results:
    for line in report.lines(n):
      say(line)
  rows = [report.table_row(label, n) for n in results]
  train = next((n for n in results if n.program == program_lib.NAMES['train']), None)
  if train is not None and not train.fits and max_tries > 0:
    rows += _try_proposals(config, slice_, devices, mfu, max_tries, label, say)
  progress.print_table(rows)
  return results


def _try_proposals(config, slice_, devices, mfu, max_tries, label, say) -> list[dict]:
  candidates = fit.proposals(config, devices)[:max_tries]
  if not candidates:
    say('no proposal: every parameter is sharded and remat is on; use more chips or a '
        'smaller per-chip batch')
    return []
  rows = []
  for overrides in candidates:
    say(f'trying {fit.flags_for(overrides)}')
    n = check(fit.apply(config, overrides), slice_, devices=devices, which=('train',), mfu=mfu,
              say=say)[0]
    for line in report.lines(n):
      say(line)
    rows.append(report.table_row(f'{label} {fit.flags_for(overrides)}', n))
    if n.fits:
      say(f'fits with: {fit.flags_for(overrides)}')
      return rows
  say('none of the proposals fits: use more chips or a smaller per-chip batch')
  return rows
