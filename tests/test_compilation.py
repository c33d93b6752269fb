"""AOT machinery that needs no libtpu: TPU slice names, and the trip-count-weighted HLO analysis
on a program compiled for the 8 CPU devices."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from groupdiff_jax.compilation import hlo, topology


@pytest.mark.parametrize('name, grid, chips', [
    ('v5p-128', (4, 4, 4), 64),    # Cloud names count TensorCores on v5p: 128 cores = 64 chips
    ('v5p-64', (2, 4, 4), 32),
    ('v4-8', (2, 2, 1), 4),
    ('v5e-256', (16, 16), 256),    # ... and chips on v5e / v6e
    ('v6e-64', (8, 8), 64),
    ('v5litepod-16', (4, 4), 16),
    ('v5p:4x4x8', (4, 4, 8), 128),
    ('v5e:2x2', (2, 2), 4),
])
def test_slice_names_give_the_chip_grid(name, grid, chips):
  t = topology.parse(name)
  assert (t.grid, t.chips) == (grid, chips)
  assert t.libtpu_name == f'{t.generation}:{"x".join(map(str, grid))}'
  assert f'{chips} chips' in t.describe()


@pytest.mark.parametrize('name', ['v5p-7', 'v5p:4x4', 'v7x-8', 'v5e-48', 'gpu4'])
def test_bad_slice_names_are_refused(name):
  with pytest.raises(topology.TopologyError):
    topology.parse(name)


def scanned_grad(depth: int, width: int, rows: int):
  """d/dw of a `depth`-layer scan whose bf16 weights are gathered per layer on 8 devices."""
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))

  def loss(w, x):
    def layer(h, wl):
      wl = jax.lax.with_sharding_constraint(wl.astype(jnp.bfloat16), NamedSharding(mesh, P()))
      return jnp.tanh(h @ wl), None
    return (jax.lax.scan(layer, x, w)[0].astype(jnp.float32) ** 2).sum()

  w = jax.ShapeDtypeStruct((depth, width, width), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, 'x')))
  x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, P('x')))
  return jax.jit(jax.grad(loss), out_shardings=w.sharding).lower(w, x).compile()


def test_hlo_analysis_counts_every_trip_of_a_scan():
  depth, width, rows = 3, 256, 64
  analysis = hlo.analyze(scanned_grad(depth, width, rows).as_text())
  # Per device: 8 of the rows; each layer runs h @ w forward and two matmuls backward.
  assert analysis.flops == depth * 3 * 2 * (rows // 8) * width * width
  assert analysis.collective_count['all-gather'] == depth  # one gather per layer, every trip
  assert analysis.collective_bytes['all-gather'] >= depth * width * width * 2
  assert depth in analysis.while_trips


def test_hlo_analysis_scales_with_depth_where_cost_analysis_does_not():
  one, two = (scanned_grad(d, 128, 16) for d in (2, 4))
  assert hlo.analyze(two.as_text()).flops == 2 * hlo.analyze(one.as_text()).flops


def test_trip_count_reads_the_loop_bound():
  text = '''HloModule m
%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %c = s32[] constant(28)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p.1 = (s32[], f32[4]{0}) parameter(0)
  %a = f32[4,8]{1,0} parameter(1)
  %b = f32[8,4]{1,0} parameter(2)
  %d = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %g = f32[64]{0} all-gather(%a), dimensions={0}
  ROOT %t = (s32[], f32[4]{0}) tuple(%p.1)
}

ENTRY %main (x: (s32[], f32[4])) -> (s32[], f32[4]) {
  %x = (s32[], f32[4]{0}) parameter(0)
  ROOT %w = (s32[], f32[4]{0}) while(%x), condition=%cond, body=%body
}
'''
  analysis = hlo.analyze(text)
  assert analysis.while_trips == [28]
  assert analysis.flops == 28 * 2 * 16 * 8
  assert analysis.collective_bytes['all-gather'] == 28 * 64 * 4


def test_batched_matmul_written_as_a_padded_window_counts_one_tap_per_output():
  # TPU's form of a 16-head batched matmul: the head axis is a spatial window of 16 over an
  # input of size 1 padded by 15 on each side, so each output position meets one real element.
  text = '''HloModule m
ENTRY %main (a: bf16[1024,1152,1], b: bf16[16,72,1152]) -> bf16[1024,16,72] {
  %a = bf16[1024,1152,1]{2,1,0} parameter(0)
  %b = bf16[16,72,1152]{2,1,0} parameter(1)
  ROOT %c = bf16[1024,16,72]{2,1,0} convolution(%a, %b), window={size=16 pad=15_15 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
}
'''
  assert hlo.analyze(text).flops == 2 * 1024 * 16 * 72 * 1152


def test_a_program_xla_cannot_fit_is_reported_with_its_temporaries():
  from groupdiff_jax.compilation import report  # pylint: disable=import-outside-toplevel
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (22.30G) exceeds available HBM (15.75G).\nmore detail')
  n = report.out_of_memory('train step', topology.parse('v5e-256'), message, None, 0.4)
  assert not n.fits and n.temporaries == pytest.approx(22.30 * 2**30)
  assert report.lines(n) == [f'train step: DOES NOT FIT, XLA: {message.splitlines()[0]}']
  assert report.table_row('v5e', n)['GiB/chip'] == 'OOM: temporaries alone 22.3'


@pytest.mark.parametrize('topology_name, message', [
    ('v9-8', "unknown TPU generation 'v9'"), ('v5p-6', 'power of two')])
def test_aot_job_answers_a_bad_slice_name_with_one_line(topology_name, message, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.aot', '--config=configs/sit_xl.py',
       f'--topology={topology_name}', f'--hlo_dir={tmp_path}/hlo'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2 and proc.stderr.count('\n') == 1, proc.stderr[-2000:]
  assert proc.stderr.startswith('groupdiff_jax: error: ') and message in proc.stderr
  assert not os.path.exists(tmp_path / 'hlo')


def test_one_pass_step_with_two_shard_kinds_executes_the_analytic_flops():
  """28 conditional singles + one unconditional group of 4 over 8 batch shards of 4: one shard
  attends as a group, seven as singles, each through its branch of a `lax.switch`. Weighted by
  the share of shards per branch, the executed FLOPs are flops.py's count; counting every
  branch (what the HLO alone says) overstates them."""
  from conftest import tiny_config
  from groupdiff_jax import flops, sharding, train_step
  from groupdiff_jax.compilation import programs
  config = tiny_config(**{'data.global_batch': 32, 'group.uncond_fraction': 0.125,
                          'model.attention': 'xla'})
  trainer = train_step.build(config, sharding.mesh_from_config(config))
  program = programs.compile_train(trainer, config)
  assert program.branch_weights == (7 / 8, 1 / 8) or program.branch_weights == (1 / 8, 7 / 8)
  text, chips = program.compiled.as_text(), len(jax.devices())
  analytic = flops.train_flops_per_batch(trainer.model_cfg, trainer.layout)
  executed = hlo.analyze(text, program.branch_weights).flops * chips
  every_branch = hlo.analyze(text).flops * chips
  assert 0.98 * analytic <= executed <= 1.05 * analytic, executed / analytic
  assert every_branch > 1.1 * executed
