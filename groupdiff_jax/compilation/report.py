"""Per-chip numbers of a compiled program, and what to change when it does not fit.

Everything is per chip (one SPMD program runs on every chip):
  memory      XLA's buffer assignment: arguments + outputs - donated (aliased) + temporaries,
              against the chip's HBM.
  FLOPs       HLO matmuls weighted by loop trip counts (compilation/hlo.py), per image =
              per chip x chips / images, next to flops.py's analytic count.
  collectives bytes by kind; 'wire' weights all-reduce 2x (a ring all-reduce is a
              reduce-scatter plus an all-gather).
  FSDP min    the least an FSDP train step must move: every parameter gathered twice in the
              compute dtype (forward, and again for the backward pass) plus one reduce-scatter of
              the gradients in the parameter dtype, plus a ring all-reduce of the sharded
              gradients over the pure data-parallel axes.
  step time   the program's FLOPs at a stated MFU (model FLOPs utilisation) of the chip's peak.
"""
import dataclasses
import math
import re

import jax
import numpy as np

from groupdiff_jax.compilation import hlo, programs
from groupdiff_jax.compilation.topology import Topology

GB = 1e9


def gb(nbytes: float) -> str:
  """'1,999', '5.57', '0.0023', '<0.001': GB without scientific notation."""
  v = nbytes / GB
  if v >= 100:
    return f'{v:,.0f}'
  return f'{v:.3g}' if v >= 0.01 or v == 0 else f'{v:.4f}' if v >= 0.001 else '<0.001'


@dataclasses.dataclass
class Numbers:
  program: str
  chips: int
  images: int
  arguments: float          # bytes per chip
  outputs: float
  aliased: float
  temporaries: float
  hbm: float
  flops_per_chip: float
  flops_per_image: float
  analytic_per_image: float
  collectives: dict[str, float]  # bytes per chip by kind
  wire: float
  kernels: float                 # Mosaic kernel calls per step (FLOPs not in the HLO parse)
  step_s: float
  mfu: float
  compile_s: float
  fsdp_min: float | None = None
  error: str = ''                # XLA's message when it could not fit the program at all
  dense_per_image: float = float('nan')  # flops.py without attention (what kernels leave)

  @property
  def total(self) -> float:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self) -> bool:
    return not self.error and self.total <= self.hbm


def fsdp_minimum(trainer, compute_bytes: int) -> float:
  """Bytes per chip the FSDP train step must move at least (see the module docstring)."""
  params = jax.tree.leaves(trainer.abstract_state['params'])
  count = sum(math.prod(p.shape) for p in params)
  param_bytes = sum(math.prod(p.shape) * np.dtype(p.dtype).itemsize for p in params)
  mesh = trainer.mesh
  sharded_axes = {a for s in jax.tree.leaves(trainer.state_shardings['params'])
                  for e in s.spec if e for a in ((e,) if isinstance(e, str) else e)}
  batch_rule = dict(trainer.rules).get('batch')
  batch_axes = (batch_rule,) if isinstance(batch_rule, str) else tuple(batch_rule or ())
  fsdp = math.prod(mesh.shape[a] for a in sharded_axes)
  data = math.prod(mesh.shape[a] for a in batch_axes if a not in sharded_axes)
  total = 0.0
  if fsdp > 1:
    total += 2 * count * compute_bytes + param_bytes
  if data > 1:
    total += 2 * param_bytes / fsdp
  return total


def measure(program: programs.Program, topology: Topology, mfu: float,
            fsdp_min: float | None = None) -> Numbers:
  memory = program.compiled.memory_analysis()
  analysis = hlo.analyze(program.compiled.as_text(), program.branch_weights)
  chips = topology.chips
  return Numbers(
      program=program.name, chips=chips, images=program.images,
      arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
      aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
      hbm=topology.chip.hbm_bytes, flops_per_chip=analysis.flops,
      flops_per_image=analysis.flops * chips / program.images,
      analytic_per_image=program.analytic_flops / program.images,
      collectives=dict(analysis.collective_bytes), wire=analysis.wire_bytes,
      kernels=analysis.custom_calls, step_s=analysis.flops / (topology.chip.peak_flops * mfu),
      mfu=mfu, compile_s=program.compile_s, fsdp_min=fsdp_min,
      dense_per_image=program.dense_flops / program.images)


def out_of_memory(name: str, topology: Topology, error: str, fsdp_min: float | None,
                  mfu: float) -> Numbers:
  """Numbers of a program XLA refused to compile for lack of HBM: its temporaries (from the
  message) and nothing else."""
  need = re.search(r'temporaries \(([0-9.]+)([KMG])', error)
  temporaries = float(need.group(1)) * 2 ** {'K': 10, 'M': 20, 'G': 30}[need.group(2)] if need \
      else float('nan')
  nan = float('nan')
  return Numbers(name, topology.chips, 0, nan, nan, nan, temporaries, topology.chip.hbm_bytes,
                 nan, nan, nan, {}, nan, 0.0, nan, mfu, nan, fsdp_min,
                 error=error.strip().splitlines()[0])


def lines(n: Numbers) -> list[str]:
  """The human-readable report of one program."""
  gib = lambda b: f'{b / 2**30:.2f} GiB'  # noqa: E731
  if n.error:
    return [f'{n.program}: DOES NOT FIT, XLA: {n.error}']
  verdict = 'fits' if n.fits else 'DOES NOT FIT'
  out = [f'{n.program} (compiled in {n.compile_s:.0f} s), per chip:',
         f'  memory: {gib(n.total)} of {gib(n.hbm)} HBM, {verdict} '
         f'(arguments {gib(n.arguments)} + outputs {gib(n.outputs)} - donated {gib(n.aliased)} '
         f'+ temporaries {gib(n.temporaries)})',
         f'  executed FLOPs per image: {n.flops_per_image / 1e9:.1f} G = '
         f'{n.flops_per_image / n.analytic_per_image:.3f}x the analytic '
         f'{n.analytic_per_image / 1e9:.1f} G (flops.py)']
  if n.kernels:
    out.append(f'  ({n.kernels:.0f} Mosaic kernel calls per step, FLOPs not in the HLO: the '
               f'matmuls outside them are {n.flops_per_image / n.dense_per_image:.3f}x flops.py '
               f'without attention, {n.dense_per_image / 1e9:.1f} G)')
  kinds = ', '.join(f'{k} {gb(v)}' for k, v in n.collectives.items() if v)
  out.append(f'  collectives: {kinds or "none"} GB; wire {gb(n.wire)} GB '
             f'(all-reduce counted 2x)')
  if n.fsdp_min:
    out.append(f'  FSDP minimum {gb(n.fsdp_min)} GB: wire = '
               f'{n.wire / n.fsdp_min:.2f}x the minimum')
  out.append(f'  estimated time at {100 * n.mfu:.0f}% MFU: {1e3 * n.step_s:.0f} ms per step, '
             f'{n.images / n.step_s:,.0f} images/s on {n.chips} chips')
  return out


def table_row(label: str, n: Numbers) -> dict:
  """One row of BENCHMARKS.md's AOT table."""
  if n.error:
    return {'run': label, 'program': n.program,
            'GiB/chip': f'OOM: temporaries alone {n.temporaries / 2**30:.1f}',
            'HBM GiB': f'{n.hbm / 2**30:.0f}', 'GFLOP/img exec': '-', 'analytic': '-',
            'exec/analytic': '-', 'coll. GB/chip (wire)': '-', 'by kind': '-',
            'x FSDP min': '-'}
  return {'run': label, 'program': n.program, 'GiB/chip': f'{n.total / 2**30:.2f}',
          'HBM GiB': f'{n.hbm / 2**30:.0f}',
          'GFLOP/img exec': f'{n.flops_per_image / 1e9:.1f}',
          'analytic': f'{n.analytic_per_image / 1e9:.1f}',
          'exec/analytic': (f'{n.flops_per_image / n.analytic_per_image:.2f}' if not n.kernels
                            else f'{n.flops_per_image / n.dense_per_image:.2f} w/o attn'),
          'coll. GB/chip (wire)': gb(n.wire),
          'by kind': ' '.join(f'{k.replace("collective-", "")}:{gb(v)}'
                              for k, v in n.collectives.items() if v) or '-',
          'x FSDP min': f'{n.wire / n.fsdp_min:.2f}' if n.fsdp_min else '-'}
