"""The sampling-throughput benchmark: forward counts at the paper's settings and a tiny CLI run
with the PyTorch reference side by side."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from groupdiff_jax.sampling import throughput


def test_forwards_per_image_count_only_the_unconditional_passes_that_run():
  s = load_config('sample_sit_xl').sample  # the paper's: SDE 250 steps, CFG in [0.25, 0.75]
  assert throughput.forwards_per_image(s) == (250, 130)
  s.guidance_low, s.guidance_high = 0.0, 1.0
  assert throughput.forwards_per_image(s) == (250, 250)
  s.cfg_scale = 1.0
  assert throughput.forwards_per_image(s) == (250, 0)
  s.sampler, s.num_steps, s.cfg_scale = 'heun', 10, 2.0
  assert throughput.forwards_per_image(s) == (19, 19)  # last step Euler-only: 2 * 10 - 1


def test_cli_times_jax_and_the_torch_reference():
  pytest.importorskip('torch', reason='the reference sampler needs torch (the test extra)')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.bench_sample', '--config=configs/sample_sit_xl.py',
       '--model=SiT-d2h32n2/2', '--input_size=8', '--num_classes=10', '--batch=8',
       '--config.sample.num_steps=4', '--config.precision=float32', '--torch',
       '--torch_threads=1'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert '4 + 2 image-forwards per image' in out
  assert '| jax (jit) | 8 |' in out and '| torch eager (1 threads) | 8 |' in out
  assert 'jax / torch throughput: ' in out
