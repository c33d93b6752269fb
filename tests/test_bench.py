"""The benchmark entry runs end to end on a tiny config and prints its table."""
from test_cli_errors import run_job


def test_bench_prints_a_row_per_group_size():
  proc = run_job('bench', '--config=configs/demo.py', '--config.model.name=SiT-d1h32n2/4',
                 '--config.data.global_batch=16', '--group_sizes=4', '--steps=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith('| ')]
  assert rows[0].startswith('| group | cond/uncond | img/s |')
  assert [r.split(' | ')[0] for r in rows[1:]] == ['| 4']
  assert all(float(r.split(' | ')[2]) > 0 for r in rows[1:])  # images/s measured
  # Each row is also printed as soon as it is measured, before the table: a run cut short (a
  # lease's time limit) keeps the rows it had.
  lines = proc.stdout.splitlines()
  early = [i for i, line in enumerate(lines) if line.startswith('group 4 | cond/uncond ')]
  assert early and early[0] < lines.index(rows[0]), proc.stdout[-2000:]
