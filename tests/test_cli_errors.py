"""Every `python -m groupdiff_jax.X` job answers a user's mistake with one line
'groupdiff_jax: error: ...' on stderr and exit status 2, no traceback, and leaves no directory
behind (groupdiff_jax/cli.py)."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# job -> (its config file, or None for jobs without one; the output-directory flag)
JOBS = {
    'main': ('configs/demo.py', '--workdir'),
    'bench': ('configs/demo.py', None),
    'bench_data': ('configs/sit_xl.py', '--workdir'),
    'bench_sample': ('configs/sample_sit_xl.py', None),
    'embed': ('configs/embed_dinov2_folder.py', '--workdir'),
    'encode': ('configs/encode_imagenet.py', '--workdir'),
    'neighbors': ('configs/neighbors_default.py', '--workdir'),
    'convert': (None, '--out'),
    'bench_neighbors': (None, '--workdir'),
    'evaluate': (None, None),
    'sample': ('configs/sample_sit_xl.py', '--workdir'),
    'diagnose': (None, '--out'),
    'digits_classifier': (None, '--out'),
}


def run_job(job: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', f'groupdiff_jax.{job}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('groupdiff_jax: error: '), lines[0]
  for e in expected:
    assert e in lines[0], lines[0]
  return lines[0]


def job_args(job: str, tmp_path, *extra: str) -> list[str]:
  config, out = JOBS[job]
  args = [f'--config={config}'] if config else []
  if out:
    args.append(f'{out}={tmp_path}/new_dir')
  return args + list(extra)


@pytest.mark.parametrize('job', sorted(JOBS))
def test_unknown_flag(job, tmp_path):
  proc = run_job(job, *job_args(job, tmp_path, '--no_such_flag=1'))
  assert_one_line(proc, "Unknown command line flag 'no_such_flag'")
  assert not os.path.exists(tmp_path / 'new_dir')


@pytest.mark.parametrize('job', sorted(j for j, (c, _) in JOBS.items() if c))
def test_misspelled_config_key_names_the_key_and_suggests(job, tmp_path):
  key, suggestion = {'main': ('optim.lrr', 'optim.lr'), 'bench': ('optim.lrr', 'optim.lr'),
                     'embed': ('batch_sizee', 'batch_size'), 'neighbors': ('kk', 'k'),
                     'encode': ('resolutin', 'resolution'), 'bench_data': ('optim.lrr', 'optim.lr'),
                     'sample': ('sample.cfg_scal', 'sample.cfg_scale'),
                     'bench_sample': ('sample.num_step', 'sample.num_steps')}[job]
  proc = run_job(job, *job_args(job, tmp_path, f'--config.{key}=1'))
  assert_one_line(proc, f"--config.{key}: unknown config key '{key}'",
                  f"did you mean '{suggestion}'?")
  assert '\\n' not in proc.stderr  # no escaped newlines from ml_collections' message


@pytest.mark.parametrize('job', sorted(j for j, (c, _) in JOBS.items() if c))
@pytest.mark.parametrize('with_override', [False, True])
def test_missing_config_file(job, tmp_path, with_override):
  args = [a if not a.startswith('--config=') else '--config=configs/nonexistent.py'
          for a in job_args(job, tmp_path)]
  if with_override:
    args.append('--config.seed=1')
  proc = run_job(job, *args)
  assert_one_line(proc, '--config=configs/nonexistent.py: no such config file')
  assert not os.path.exists(tmp_path / 'new_dir')


@pytest.mark.parametrize('job,bad,expected', [
    ('main', '--config.optim.lr=abc', "could not convert string to float: 'abc'"),
    ('bench', '--group_sizes=1,x', 'group_sizes'),
    ('embed', '--config.batch_size=many', 'batch_size'),
    ('encode', '--config.resolution=big', 'resolution'),
    ('neighbors', '--config.k=ten', 'config.k'),
    ('convert', '--kind=bogus', 'kind'),
    ('bench_neighbors', '--n=abc', 'abc'),
    ('bench_data', '--n=many', 'many'),
    ('bench_sample', '--batch=big', 'big'),
    ('sample', '--config.num_samples=lots', 'num_samples'),
])
def test_bad_value(job, bad, expected, tmp_path):
  proc = run_job(job, *job_args(job, tmp_path, bad))
  assert_one_line(proc, expected)
  assert not os.path.exists(tmp_path / 'new_dir')


def test_missing_required_flag_and_stray_argument(tmp_path):
  assert_one_line(run_job('main', '--config=configs/demo.py'), '--workdir is required')
  proc = run_job('main', '--config=configs/demo.py', f'--workdir={tmp_path}/w', 'stray')
  assert_one_line(proc, "unexpected arguments 'stray'")


def test_failed_start_leaves_no_new_directory(tmp_path):
  """A config the data cannot serve fails after the workdir was prepared: it is removed again."""
  workdir = tmp_path / 'deep' / 'run'
  proc = run_job('main', '--config=configs/demo.py', f'--workdir={workdir}',
                 '--config.data.source=no_such_source')
  assert_one_line(proc, 'no_such_source')
  assert not os.path.exists(workdir)
  # An existing directory the user made stays, with its files.
  workdir.mkdir(parents=True)
  (workdir / 'notes.txt').write_text('mine')
  proc = run_job('main', '--config=configs/demo.py', f'--workdir={workdir}',
                 '--config.data.source=no_such_source')
  assert_one_line(proc, 'no_such_source')
  assert (workdir / 'notes.txt').read_text() == 'mine'


def test_config_file_that_raises_on_its_argument(tmp_path):
  """A config file's own error (here: an unknown Table 1 row after the colon) is its last line."""
  proc = run_job('main', '--config=configs/dit_xl_table1.py:uc3', f'--workdir={tmp_path}/new_dir')
  assert_one_line(proc, '--config=configs/dit_xl_table1.py:uc3: the config file does not load',
                  'unknown row')
  assert not os.path.exists(tmp_path / 'new_dir')
