"""Real local processes (jax.distributed with a localhost coordinator on a free port, gloo
collectives, every process killed when one fails or time runs out) against one process:

- 2 x 4 CPU devices train like 1 x 8: the same loss at every step and the same parameters at the
  end, up to float summation order (synthetic GroupDiff-l; digits GroupDiff-f in the preemption
  test); the global batch, gathered from both processes, is the plan in layout order on a
  permuted mesh (tests/multiprocess_batches.py);
- SIGTERM to one of 2 processes: both save the same step and exit 143; resumes on 1 process
  (saved by 2), on 2 (saved by 1) and on 2 (saved by 2) equal one uninterrupted run;
- processes with different configs stop before any step;
- sample, encode and embed: each process takes a disjoint set of shards and the files equal a
  single-process run's; SIGTERM stops a distributed sampling job.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from groupdiff_jax import checkpoint, sharding, train, train_step

# Batch rows over ('fsdp', 'data') of a (2, 4, 1) mesh: the 4 devices of one process (a 'data'
# row of the mesh) hold every other block of the batch, not a contiguous half; a pipeline that
# read rows by process index would scramble the conditional/unconditional split here.
MESH = {'mesh.shape': (2, 4, 1),
        'mesh.rules': (('batch', ('fsdp', 'data')), ('tokens', 'context'), ('embed', 'fsdp'),
                       ('mlp', None), ('heads', None), ('layers', None), ('vocab', None))}
# tiny_config() with MESH, as command-line overrides of configs/common.py.
TINY = {**MESH, 'model.name': 'SiT-d2h32n2/2', 'model.input_size': 8, 'model.num_classes': 10,
        'model.dtype': 'float32', 'data.source': 'synthetic', 'data.global_batch': 16,
        'data.synthetic_size': 512, 'group.uncond_size': 4, 'group.uncond_fraction': 0.25,
        'optim.lr': 1e-3, 'optim.ema_decay': 0.9, 'total_steps': 4, 'log_every_steps': 1,
        'ckpt_every_steps': 2}
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, devices, extra=()):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  args = [sys.executable, '-m', 'groupdiff_jax.main', '--config=configs/common.py',
          f'--workdir={workdir}', *[f'--config.{k}={v}' for k, v in TINY.items()], *extra]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait(procs):
  """(stdout, stderr) of each, within TIMEOUT_S each; on any failure (a timeout, a hang after a
  peer died) every process still running is killed."""
  try:
    return [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _finish(procs, status=0):
  outs = _wait(procs)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == status, err[-3000:]
  return [out for out, _ in outs]


def _distributed(workdir, extra_of=lambda i: ()):
  port = _free_port()
  return [_start(workdir, 4, ('--distributed', f'--coordinator=localhost:{port}',
                              '--num_processes=2', f'--process_id={i}', *extra_of(i)))
          for i in range(2)]


def _weights(workdir, **overrides):
  """(raw parameters, EMA parameters) of a run's newest checkpoint, as numpy trees."""
  config = tiny_config(**MESH, **overrides)
  trainer = train_step.build(config, sharding.mesh_from_config(config))
  params, ema, _ = checkpoint.load_weights(workdir, params=trainer.abstract_state['params'],
                                           shardings=trainer.state_shardings['params'])
  return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, ema)


def _ema(workdir):
  return _weights(workdir)[1]


def _assert_close_trees(a, b):
  """Equal up to float summation order: gloo's cross-process all-reduce adds the 8 devices'
  partial sums in another order than the in-process one (last-bit differences, seen: 1 ulp)."""
  diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
  print('max |difference|:', max(diffs))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


@pytest.mark.slow  # ~2 min on 2 shared cores (110 s of CPU time); the test below is the quick one
def test_two_processes_train_like_one(tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  procs = _distributed(two)
  procs.append(_start(one, 8))  # runs alongside: the three share the CPU cores
  outs = _finish(procs)

  # Each process names itself and where its devices sit in the mesh.
  for i in range(2):
    assert f'process {i}/2: 4 local cpu devices; mesh (data,fsdp,context) positions ' in outs[i]
  assert 'process 0/1: 8 local cpu devices' in outs[2]
  assert all("mesh {'data': 2, 'fsdp': 4, 'context': 1} |" in out for out in outs)
  # The rows process 0 read: those of the mesh positions it reported, not rows 0-7.
  config = tiny_config(**MESH)
  mesh = sharding.mesh_from_config(config)
  positions = re.findall(r'\d+@\((\d+),(\d+),(\d+)\)', outs[0].split('process 0/2: ')[1].split('\n')[0])
  assert len(positions) == 4
  image = sharding.batch_sharding(mesh, config.mesh.rules, 4)
  rows = sharding.batch_rows(image, (16, 8, 8, 4),
                             [mesh.devices[tuple(map(int, p))] for p in positions])
  assert len(rows) == 8 and not np.array_equal(rows, np.arange(8))

  # Equal up to float summation order: gloo's cross-process all-reduce adds the 8 devices'
  # partial sums in another order than the in-process one (last-bit differences, seen: 1 ulp).
  losses_two, losses_one = train.final_losses(two), train.final_losses(one)
  assert len(losses_one) == 4 and len(set(losses_one.tolist())) == 4
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6, atol=0)
  assert train.steps_done(two) == train.steps_done(one) == [2, 4]
  print('losses two - one:', losses_two - losses_one)
  _assert_close_trees(_ema(two), _ema(one))


# GroupDiff-f (conditional groups of 4 like the unconditional ones) on the digits (8x8x1).
DIGITS_F = {'data.source': 'digits', 'data.image_size': 8, 'model.in_channels': 1,
            'group.cond_size': 4, 'group.uncond_size': 4}


def _flags(overrides):
  return tuple(f'--config.{k}={v}' for k, v in overrides.items())


def _wait_for(proc, text):
  """Reads proc's stdout up to a line containing `text` (the rest stays for communicate)."""
  for line in proc.stdout:
    if text in line:
      return
  raise AssertionError(f'the process ended without printing {text!r}: '
                       f'{proc.communicate(timeout=TIMEOUT_S)[1][-3000:]}')


@pytest.mark.slow  # ~4 min on 2 shared cores: four runs one after the other (8 processes)
def test_preempted_processes_save_one_step_and_resume_exactly_on_one_or_two(tmp_path):
  """Digits GroupDiff-f. SIGTERM to process 1 alone: both processes save the same step and exit.
  The run then resumes on 1 process (a checkpoint saved by 2), on 2 (saved by 1) and on 2 again
  (saved by 2); its losses, step by step, and its final parameters equal those of one
  uninterrupted single-process run."""
  run, ref = str(tmp_path / 'run'), str(tmp_path / 'ref')
  quiet = {**DIGITS_F, 'sample.write_grid': False}
  procs = _distributed(run, lambda i: _flags({**quiet, 'total_steps': 1000,
                                              'ckpt_every_steps': 1000}))
  _wait_for(procs[1], 'compiled the train step')
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, status=143)  # main.EXIT_PREEMPTED: saved, not finished
  saved = [int(re.search(r'preemption signal: saved step (\d+), exiting', out).group(1))
           for out in outs]
  s = saved[0]
  assert saved == [s, s] and 0 < s < 1000, saved  # one agreed step, saved by both
  assert train.steps_done(run) == [s]

  # Resume on 1 process x 8 devices; the uninterrupted reference runs alongside.
  _finish([_start(run, 8, _flags({**quiet, 'total_steps': s + 2})),
           _start(ref, 8, _flags({**quiet, 'total_steps': s + 6}))])
  for end in (s + 4, s + 6):  # then on 2 processes, twice
    outs = _finish(_distributed(run, lambda i, end=end: _flags({**quiet, 'total_steps': end})))
    assert f'resumed from step {end - 2} ' in outs[0] and f'resumed from step {end - 2} ' in outs[1]
  assert train.steps_done(run)[-1] == train.steps_done(ref)[-1] == s + 6

  losses_run, losses_ref = train.final_losses(run), train.final_losses(ref)
  assert len(losses_run) == len(losses_ref) == s + 6  # every step logged once
  print('losses run - ref:', losses_run - losses_ref)
  np.testing.assert_allclose(losses_run, losses_ref, rtol=1e-6, atol=0)
  _assert_close_trees(_weights(run, **DIGITS_F), _weights(ref, **DIGITS_F))


def test_global_batch_is_the_plan_in_layout_order_across_processes(tmp_path):
  """2 processes x 4 devices, a permuted device order, digits GroupDiff-f: the assembled global
  batch, gathered from both processes, is the planned ids in layout order
  (tests/multiprocess_batches.py asserts it in each process)."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'multiprocess_batches.py'),
                             str(i), '2', str(port), str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = _finish(procs)
  rows = [np.array(re.search(r'rows: ([\d ]+)', out).group(1).split(), int) for out in outs]
  assert all('checked 3 batches' in out for out in outs)
  assert sorted(np.concatenate(rows).tolist()) == list(range(16))
  assert not np.array_equal(rows[0], np.arange(8))  # the mesh scatters each process's rows


def test_processes_with_different_configs_stop_before_any_step(tmp_path):
  workdir = str(tmp_path / 'run')
  procs = _distributed(workdir, lambda i: ('--config.optim.lr=0.5',) if i == 1 else ())
  for p, (out, err) in zip(procs, _wait(procs)):
    assert p.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        'groupdiff_jax: error: process(es) 1 run a different config than process 0 ')
    assert 'Traceback' not in err and 'step 1/' not in out
  assert not os.path.exists(os.path.join(workdir, 'ckpt'))


# --- the sampling job: each process samples its own shards ------------------------------------

def _sample(workdir, ckpt, devices, extra=()):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  args = [sys.executable, '-m', 'groupdiff_jax.sample', '--config=configs/sample_sit_xl.py',
          f'--config.ckpt={ckpt}', f'--workdir={workdir}', '--config.num_samples=40',
          '--config.shard_size=8', '--config.batch_size=4', '--config.precision=float32',
          '--config.sample.num_steps=4', *extra]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_two_sampling_processes_write_what_one_writes(tmp_path):
  """2 processes x 2 devices split the shards (k % 2) and, merged, equal 1 process x 4 devices."""
  from test_sample import _save_converted  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  cfg = sit.SiTConfig(depth=2, hidden=32, heads=2, patch=2, input_size=8, in_channels=1,
                      num_classes=10, max_group_size=4, dtype='float32')
  ckpt = _save_converted(str(tmp_path / 'ckpt'), cfg, 'SiT-d2h32n2/2',
                         objective='flow_velocity', ema=True)
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  port = _free_port()
  procs = [_sample(one, ckpt, 4)] + [
      _sample(two, ckpt, 2, ('--distributed', f'--coordinator=localhost:{port}',
                             '--num_processes=2', f'--process_id={i}')) for i in range(2)]
  outs = _finish(procs)
  assert '5 shards, 0 already written, 5 to do here' in outs[0]
  assert '3 to do here' in outs[1] and '2 to do here' in outs[2]  # shards 0, 2, 4 | 1, 3
  shard_files = sorted(n for n in os.listdir(two) if n.startswith('shard_') and n.endswith('.npz'))
  assert len(shard_files) == 5  # every index written once, by one of the two processes
  merge = subprocess.run([sys.executable, '-m', 'groupdiff_jax.sample', 'merge', two], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert merge.returncode == 0, merge.stderr[-3000:]
  a, b = np.load(os.path.join(one, 'samples.npz')), np.load(os.path.join(two, 'samples.npz'))
  np.testing.assert_array_equal(a['arr_1'], b['arr_1'])
  np.testing.assert_array_equal(a['arr_0'], b['arr_0'])


def test_sigterm_stops_a_distributed_sampling_job(tmp_path):
  """jax.distributed's preemption notifier would catch SIGTERM and let the job run on; a job
  that does not save on it (sampling resumes by shards) gets the default action back."""
  from test_sample import _save_converted  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.models import sit  # pylint: disable=import-outside-toplevel
  cfg = sit.SiTConfig(depth=1, hidden=32, heads=2, patch=2, input_size=8, in_channels=1,
                      num_classes=10, max_group_size=4, dtype='float32')
  ckpt = _save_converted(str(tmp_path / 'ckpt'), cfg, 'SiT-d1h32n2/2',
                         objective='flow_velocity', ema=True)
  proc = _sample(str(tmp_path / 'out'), ckpt, 2, (
      '--config.num_samples=100000', '--distributed', f'--coordinator=localhost:{_free_port()}',
      '--num_processes=1', '--process_id=0'))
  _wait_for(proc, 'compiled the sampler')
  proc.send_signal(signal.SIGTERM)
  try:
    proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
      pytest.fail('the sampling job ran on after SIGTERM')
  assert proc.returncode == -signal.SIGTERM


# --- the offline jobs: each process takes a disjoint set of shards ------------------------------

def _job(module, args, workdir, devices=2, process=None, port=None):
  """`python -m groupdiff_jax.MODULE` on `devices` CPU devices; process i of 2 when given."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  if process is not None:
    args = (*args, '--distributed', f'--coordinator=localhost:{port}', '--num_processes=2',
            f'--process_id={process}')
  return subprocess.Popen([sys.executable, '-m', f'groupdiff_jax.{module}', *args,
                           f'--workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_and_two(module, args, tmp_path):
  """Runs the job as 1 process and as 2 (2 devices each: the same per-device batch shapes);
  returns (one's workdir, two's workdir, the three outputs)."""
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  port = _free_port()
  outs = _finish([_job(module, args, one)] + [_job(module, args, two, process=i, port=port)
                                              for i in range(2)])
  return one, two, outs


def _assert_same_files(one, two):
  names = sorted(os.listdir(one))
  assert sorted(os.listdir(two)) == names
  for name in names:
    with open(os.path.join(one, name), 'rb') as a, open(os.path.join(two, name), 'rb') as b:
      assert a.read() == b.read(), name


def test_two_embed_processes_write_what_one_writes(tmp_path):
  """5 images (one unreadable, in process 1's shard) in 3 shards of 2: process 0 embeds shards
  0 and 2, process 1 shard 1; manifest (with the unreadable image), id list and shards are
  byte for byte the single-process ones."""
  from conftest import random_dinov2_folder  # pylint: disable=import-outside-toplevel
  from test_retrieval import _image_folder  # pylint: disable=import-outside-toplevel
  images = _image_folder(tmp_path / 'images')
  (images / 'b' / 'img3.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')  # id 3
  args = ('--config=configs/embed_dinov2_folder.py',
          f'--config.model_dir={random_dinov2_folder(str(tmp_path / "model"))}',
          f'--config.data.path={images}', '--config.batch_size=2', '--config.shard_size=2')
  one, two, outs = _one_and_two('embed', args, tmp_path)
  assert "(0 of this process's 3 already done)" in outs[0]
  assert "(0 of this process's 2 already done)" in outs[1] and 'process 0 of 2' in outs[1]
  assert "(0 of this process's 1 already done)" in outs[2] and 'process 1 of 2' in outs[2]
  with open(os.path.join(two, 'manifest.json')) as f:
    assert [x['id'] for x in json.load(f)['failed']] == [3]
  _assert_same_files(one, two)  # no side file left behind either


def test_two_encode_processes_write_what_one_writes(tmp_path):
  """96 images (one corrupt) in 3 shards of 40: process 0 encodes shards 0 and 2, process 1
  shard 1; every file equals the single-process job's."""
  from conftest import random_vae_folder  # pylint: disable=import-outside-toplevel
  from test_latents_e2e import _image_folder  # pylint: disable=import-outside-toplevel
  images = _image_folder(str(tmp_path / 'images'))
  args = ('--config=configs/encode_imagenet.py',
          f'--config.vae_dir={random_vae_folder(str(tmp_path / "vae"))}',
          '--config.data.kind=folder', f'--config.data.path={images}', '--config.resolution=16',
          '--config.batch_size=16', '--config.shard_size=40')
  one, two, outs = _one_and_two('encode', args, tmp_path)
  assert "(0 of this process's 2 already done)" in outs[1] and 'process 0 of 2' in outs[1]
  assert "(0 of this process's 1 already done)" in outs[2] and 'process 1 of 2' in outs[2]
  _assert_same_files(one, two)
