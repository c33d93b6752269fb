"""Throughput in the log excludes what is not training, and a run with no step writes nothing."""
import json
import os

from groupdiff_jax import metrics_writer


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_throughput_excludes_declared_time_and_first_open(tmp_path, monkeypatch):
  clock = FakeClock()
  monkeypatch.setattr(metrics_writer.time, 'perf_counter', clock)
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, images_per_step=8,
                                        flops_per_step=1e12, peak_flops=None, num_devices=2)
  writer.start(0)
  clock.now += 2.0                        # two steps of 1 s each
  out = writer.write(2, {'loss': 1.0})
  assert out['images_per_sec'] == 8.0
  assert out['tflops_per_device'] == 0.5
  clock.now += 1.0 + 30.0                 # one step, then a 30 s checkpoint write
  writer.exclude(30.0)
  out = writer.write(3, {'loss': 1.0})
  assert out['steps_per_sec'] == 1.0
  assert out['eta_sec'] == 7.0
  writer.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [2, 3]


def test_no_step_no_files(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, images_per_step=8,
                                        flops_per_step=1.0, peak_flops=None, num_devices=1)
  writer.close()
  assert os.listdir(tmp_path) == []
