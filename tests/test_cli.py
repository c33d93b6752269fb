"""The CLI end to end on the demo config (tiny overrides), and bad input: exit code 2, one line
'groupdiff_jax: error: ...' on stderr, no traceback, nothing already in the workdir lost."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from groupdiff_jax import train

# 1-block SiT on 16x16 digits, batch 16, 3 steps, a 2-step sampler for an 8-image grid, no
# in-training evaluation.
DEMO_TINY = ['--config=configs/demo.py', '--config.model.name=SiT-d1h32n2/4',
             '--config.data.global_batch=16', '--config.total_steps=3',
             '--config.ckpt_every_steps=2', '--config.log_every_steps=1',
             '--config.sample.num_steps=2', '--config.sample.num_images=8',
             '--config.eval.every_steps=0']  # in-training eval: tests/test_in_training.py


def run_cli(workdir, *args, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'groupdiff_jax.main', f'--workdir={workdir}',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('demo') / 'run')
  return workdir, run_cli(workdir, *DEMO_TINY)


def test_demo_end_to_end(demo_run):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  workdir, proc = demo_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert 'step 3/3 | loss' in proc.stdout
  # The log says what it measures: compile time on its own line, throughput without it.
  out = proc.stdout
  assert out.index('compiling the train step...') < out.index('compiled the train step in ') \
      < out.index('step 1/3')
  assert 'compilation and checkpoint writes are excluded' in out
  assert '12 cond (groups of 1) + 4 uncond (groups of 4) = 25.0% unconditional' in out
  # The grid: 8 samples of 16x16, 4 columns (the sampler's group size), 2-pixel borders, a
  # 10-pixel legend margin (the class of each row), x4.
  path = os.path.join(workdir, 'samples_step3.png')
  assert f'wrote {path} (8 samples' in proc.stdout
  with Image.open(path) as image:
    assert image.size == ((10 + 4 * (16 + 2) + 2) * 4, (2 * (16 + 2) + 2) * 4)
    assert image.mode == 'L'
    assert np.asarray(image).std() > 0  # not a blank image
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]
  assert train.steps_done(workdir) == [2, 3]
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['name'] == 'SiT-d1h32n2/4'
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(os.path.join(workdir, 'tb')))


def test_rerun_of_a_finished_run_changes_nothing_but_the_grid(demo_run, tmp_path):
  earlier, _ = demo_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(earlier, workdir, copy_function=shutil.copy2)
  before = snapshot(workdir)
  mtimes = {p: os.stat(os.path.join(workdir, p)).st_mtime_ns for p in before}
  proc = run_cli(workdir, *DEMO_TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'total_steps reached: nothing to train' in proc.stdout
  assert 'compiling the train step' not in proc.stdout
  after = snapshot(workdir)
  assert set(after) == set(before)  # no new event file, no new checkpoint
  changed = {p for p in before if os.stat(os.path.join(workdir, p)).st_mtime_ns != mtimes[p]}
  assert changed <= {'samples_step3.png'}, changed
  assert after == before  # the grid is re-rendered, identically


def snapshot(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


BAD_CONFIGS = {
    # 24 images: 4 unconditional (one group of 4) leave 20 for conditional groups of 3.
    'group_size_not_dividing_batch': (['--config.data.global_batch=24',
                                       '--config.group.cond_size=3'],
                                      'group size does not divide the batch'),
    # Same model, another optimizer: the saved optimizer state does not fit (no clipping state).
    'optimizer_changed_on_resume': (['--config.optim.grad_clip=0'],
                                    'can be restored into this config'),
    # Same model, but another batch layout than the checkpoint's data-iterator state.
    'layout_changed_on_resume': (['--config.group.cond_size=3'],
                                 'data state is from another pipeline'),
    'unknown_model_name': (['--config.model.name=SiT-Q/2'], "unknown model name 'SiT-Q/2'"),
    'mesh_not_matching_devices': (['--config.mesh.shape=(3,1,1)'],
                                  'mesh shape (3, 1, 1) needs 3 devices, but 8 are present'),
    'checkpoint_of_another_model': (['--config.model.name=SiT-d2h32n2/4'],
                                    "different model (name: checkpoint 'SiT-d1h32n2/4' vs "
                                    "config 'SiT-d2h32n2/4')"),
}


def assert_one_line_error(proc, expected):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('groupdiff_jax: error: ')
  assert expected in lines[0]


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_error_and_keeps_the_workdir(demo_run, tmp_path, case):
  """Run in the workdir of an earlier run (checkpoints, config, logs) with a file of the user."""
  args, expected = BAD_CONFIGS[case]
  earlier, _ = demo_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(earlier, workdir)
  with open(os.path.join(workdir, 'notes.txt'), 'w') as f:
    f.write('my notes')
  before = snapshot(workdir)
  proc = run_cli(workdir, *DEMO_TINY, *args)
  assert_one_line_error(proc, expected)
  after = snapshot(workdir)
  assert {k: after.get(k) for k in before} == before  # nothing removed or changed
  assert train.steps_done(workdir) == [2, 3]


@pytest.mark.parametrize('where', ['under_a_file', 'is_a_file'])
def test_unwritable_workdir_is_one_line_error(tmp_path, where):
  blocker = tmp_path / 'plain_file'  # root ignores chmod; a regular file blocks even root
  blocker.write_text('keep me')
  workdir = blocker / 'run' if where == 'under_a_file' else blocker
  proc = run_cli(str(workdir), *DEMO_TINY)
  assert_one_line_error(proc, f'workdir {workdir} is not writable')
  assert blocker.read_text() == 'keep me'


def test_url_workdir_is_one_line_error():
  """The jobs write with os/open: a gs:// workdir would become a local directory named 'gs:'."""
  proc = run_cli('gs://bucket/run', *DEMO_TINY, timeout=120)
  assert_one_line_error(proc, '--workdir=gs://bucket/run: output directories must be file-system '
                        'paths, not URLs; mount the bucket')
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))
