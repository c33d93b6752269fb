"""Checkpoints of the trainer: save on SIGTERM (the real CLI, as a subprocess), keep-last-N, and
load_weights from a trainer workdir (what fine-tuning and the sampling job read)."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ROOT, tiny_config

from groupdiff_jax import checkpoint, sharding, train, train_step

# A small demo run: 1-block SiT on 16x16 digits, batch 16, one progress line per step.
DEMO_TINY = ['--config=configs/demo.py', '--config.model.name=SiT-d1h32n2/4',
             '--config.data.global_batch=16', '--config.log_every_steps=1',
             '--config.eval.every_steps=0']


def cli_env():
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
              JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_exits_0(tmp_path):
  workdir = str(tmp_path / 'run')
  stderr_path = tmp_path / 'stderr.txt'
  with open(stderr_path, 'w') as stderr:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'groupdiff_jax.main', f'--workdir={workdir}', *DEMO_TINY,
         '--config.total_steps=100000', '--config.ckpt_every_steps=100000'],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
  lines: queue.Queue = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True)
  reader.start()
  out, seen, deadline = [], None, time.monotonic() + 400
  try:
    while seen is None:
      try:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
      except queue.Empty:
        pytest.fail(f'no progress line in time; stdout: {"".join(out)}; stderr: '
                    f'{stderr_path.read_text()[-2000:]}')
      out.append(line)
      if m := re.match(r'step (\d+)/100000 \| loss', line):
        seen = int(m[1])
    proc.send_signal(signal.SIGTERM)  # what a preemption / scheduler does
    rc = proc.wait(timeout=180)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  reader.join(timeout=10)
  while not lines.empty():
    out.append(lines.get())
  stdout, stderr_text = ''.join(out), stderr_path.read_text()
  assert rc == 143, f'exit code {rc} (143: preempted, saved); stderr: {stderr_text[-3000:]}'
  assert 'Traceback' not in stderr_text
  m = re.search(r'preemption signal: saved step (\d+), exiting', stdout)
  assert m, stdout[-2000:]
  saved = int(m[1])
  assert seen <= saved < 100000
  assert train.steps_done(workdir) == [saved]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert json.loads(f.readlines()[-1])['step'] == saved  # it stopped at the step it saved
  with open(os.path.join(workdir, 'ckpt', str(saved), 'meta', 'metadata')) as f:
    assert json.load(f)['step'] == saved
  assert not any(name.endswith('.png') for name in os.listdir(workdir))  # no grid: not finished


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """3 steps, a checkpoint every step, keep the last 2; a fast EMA (0.5) so it differs a lot."""
  workdir = str(tmp_path_factory.mktemp('ema_run') / 'run')
  config = tiny_config(total_steps=3, ckpt_every_steps=1, keep_ckpts=2,
                       **{'optim.ema_decay': 0.5})
  train.train(config, workdir)
  return workdir, config


def test_keep_last_n_checkpoints(ema_run):
  workdir, _ = ema_run
  assert train.steps_done(workdir) == [2, 3]
  ckpt_dir = os.path.join(workdir, 'ckpt')
  assert sorted(n for n in os.listdir(ckpt_dir) if n[0].isdigit()) == ['2', '3']


def test_load_weights_from_a_trainer_workdir_gives_the_ema(ema_run):
  workdir, config = ema_run
  trainer = train_step.build(config, sharding.mesh_from_config(config))
  abstract, shardings = trainer.abstract_state['params'], trainer.state_shardings['params']
  params, ema, meta = checkpoint.load_weights(workdir, params=abstract, shardings=shardings)
  assert meta['step'] == 3 and meta['model']['name'] == config.model.name
  assert ema is not None
  kernel = ema['blocks']['qkv']['kernel']
  assert kernel.sharding == shardings['blocks']['qkv']['kernel']  # placed on the current mesh

  # EMA at step 3 = d * EMA at step 2 + (1 - d) * parameters at step 3 (d = 0.5).
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'ckpt'), read_only=True, async_save=False)
  try:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    ema_2 = ckpt.manager.restore(2, args=ocp.args.Composite(
        ema=ocp.args.StandardRestore(target)))['ema']
  finally:
    ckpt.close()
  ema, params, ema_2 = jax.device_get((ema, params, ema_2))
  for (path, e3), e2, p3 in zip(jax.tree_util.tree_leaves_with_path(ema), jax.tree.leaves(ema_2),
                                jax.tree.leaves(params)):
    np.testing.assert_allclose(e3, 0.5 * e2 + 0.5 * p3, rtol=1e-6, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(ema['blocks']['qkv']['kernel'], params['blocks']['qkv']['kernel'])

  # The checkpoint directory itself works too; prefer_ema=False gives the raw weights only.
  raw, no_ema, _ = checkpoint.load_weights(os.path.join(workdir, 'ckpt'), params=abstract,
                                           shardings=shardings, prefer_ema=False)
  assert no_ema is None
  np.testing.assert_array_equal(jax.device_get(raw['blocks']['qkv']['kernel']),
                                params['blocks']['qkv']['kernel'])


def test_load_weights_into_another_model_names_the_problem(ema_run):
  workdir, _ = ema_run
  other = tiny_config(**{'model.name': 'SiT-d2h64n2/2'})
  trainer = train_step.build(other, sharding.mesh_from_config(other))
  with pytest.raises(checkpoint.CheckpointError, match=r'model SiT-d2h32n2/2\) does not fit'):
    checkpoint.load_weights(workdir, params=trainer.abstract_state['params'],
                            shardings=trainer.state_shardings['params'])
