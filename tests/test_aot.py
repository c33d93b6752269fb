"""The AOT fit check compiled for a real TPU topology (v5e:2x2, 4 chips) on the CPU host: per-chip
memory from the parameter count, executed FLOPs against flops.py, and FSDP's collectives.
Needs libtpu (pip install -e .[aot]); skips without it."""
import math

import jax
import pytest
from conftest import tiny_config

from groupdiff_jax import flops, sharding, train_step
from groupdiff_jax.compilation import aot_run, report, topology
from groupdiff_jax.models import sit

pytestmark = pytest.mark.aot

CHIPS = 4


CONFIG = tiny_config(**{'model.name': 'SiT-d2h256n4/2', 'model.dtype': 'bfloat16',
                        'model.attention': 'splash', 'sample.cfg_scale': 2.0})


@pytest.fixture(scope='module')
def measured():
  config = CONFIG
  slice_ = topology.parse('v5e:2x2')
  lines = []
  numbers = aot_run.check(config, slice_, say=lines.append)
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(
      train_step.build(config, sharding.mesh_from_config(config, topology.devices(slice_)))
      .abstract_state['params']))
  return {n.program: n for n in numbers}, params, lines


def test_train_step_memory_follows_the_parameter_count(measured):
  numbers, params, _ = measured
  train = numbers['train step']
  state = 4 * 4 * params  # float32 params, Adam's two moments and the EMA
  assert train.chips == CHIPS and train.fits
  # Every parameter divides over fsdp = 4: each chip holds a quarter of the state (+ the batch).
  assert state / CHIPS <= train.arguments <= 1.1 * state / CHIPS + 2**20
  assert train.aliased >= 0.9 * state / CHIPS  # the donated state is updated in place
  assert train.total < state  # far below a replicated state


def test_executed_flops_match_the_analytic_count(measured):
  numbers, _, _ = measured
  cfg = sit.config_from(CONFIG.model)
  # Splash runs as Mosaic kernels whose FLOPs the HLO does not show: the visible matmuls are at
  # least everything but the attention (flops.py at group size 0), at most the padded total.
  passes = {'train step': 3, 'sampling step': 2}  # forward + backward; CFG's two forwards
  for name, n in numbers.items():
    assert n.kernels > 0, name
    visible = passes[name] * flops.forward_flops_per_image(cfg, 0)
    assert n.dense_per_image == pytest.approx(visible)
    assert 0.99 * visible <= n.flops_per_image <= 1.25 * n.analytic_per_image, name
    assert n.flops_per_image < n.analytic_per_image  # the kernels' share is not counted


def test_fsdp_gathers_weights_instead_of_all_reducing_them(measured):
  numbers, params, _ = measured
  train, sample = numbers['train step'], numbers['sampling step']
  assert train.collectives['all-gather'] > 0 and sample.collectives['all-gather'] > 0
  assert train.collectives['all-reduce'] < 4 * params  # no full float32 gradient all-reduce
  assert train.wire <= 1.5 * train.fsdp_min
  assert sample.collectives['all-reduce'] < params  # inference only gathers


def test_report_lines_name_memory_flops_collectives_and_time(measured):
  numbers, _, lines = measured
  assert any('compiling the train step for v5e:2x2' in line for line in lines)
  text = '\n'.join(report.lines(numbers['train step']))
  for part in ('of 16.00 GiB HBM, fits', 'executed FLOPs per image', 'all-gather',
               'x the minimum', 'ms per step', 'on 4 chips'):
    assert part in text


def test_the_job_reports_every_program_and_prints_the_table(capsys):
  """`python -m groupdiff_jax.aot`'s whole run (aot_run.run): the report lines of the train step
  and the closing table (its `programs` argument once shadowed the programs module and the run
  died after compiling)."""
  lines = []
  results = aot_run.run(CONFIG, topology.parse('v5e:2x2'), programs=('train',), mfu=0.4,
                        max_tries=1, label='v5e:2x2', say=lines.append)
  assert [n.program for n in results] == ['train step'] and results[0].fits
  assert any('executed FLOPs per image' in line for line in lines)
  table = capsys.readouterr().out
  assert 'GiB/chip' in table and '| v5e:2x2 |' in table
