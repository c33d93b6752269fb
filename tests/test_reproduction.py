"""The reproduction driver: arm configs differ only in grouping, the summary's mean/std, the dot
plot, resuming a grid from finished runs, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_config

from groupdiff_jax.evaluation import dot_plot, reproduction


def test_arms_differ_only_in_grouping():
  base = load_config('reproduce_digits')
  configs = {a: reproduction.run_config(base, a, 1, '/clf') for a in reproduction.ARMS}
  flat = {a: json.loads(c.to_json()) for a, c in configs.items()}
  for c in flat.values():  # equal compute: same model, steps, batch, unconditional share
    assert (c['model'], c['total_steps'], c['data']['global_batch'], c['seed']) == (
        flat['baseline']['model'], base.total_steps, base.data.global_batch, 1)
    assert c['group']['uncond_fraction'] == base.group.uncond_fraction
    assert c['eval']['every_steps'] == base.total_steps and c['eval']['reference'] == 'digits'
  assert flat['baseline']['group']['uncond_size'] == 1
  assert flat['groupdiff_similarity']['group']['neighbors'] == 'greedy'
  assert flat['groupdiff_random']['group']['neighbors'] == 'random'
  assert flat['groupdiff_random']['group']['uncond_size'] == 4
  assert base.group.uncond_size == 4 and base.seed == 0  # the base is untouched


def test_summary_mean_and_sample_std():
  runs = [{'arm': 'a', 'seed': s, 'eval/digits_fd': v, 'eval/digits_accuracy': 0.5}
          for s, v in enumerate([1.0, 2.0, 4.0])]
  summary = reproduction.summarise(runs, ['a'])
  fd = summary['a']['eval/digits_fd']
  assert fd['mean'] == pytest.approx(7 / 3)
  assert fd['std'] == pytest.approx(np.std([1, 2, 4], ddof=1))
  assert (fd['min'], fd['max'], fd['n']) == (1.0, 4.0, 3)
  assert 'eval/s_cross' not in summary['a']  # absent metric: no entry, 'n/a' in the table
  assert '| a | 2.33 ± 1.53 | 0.500 ± 0.000 | n/a | 3 |' in reproduction.table(summary)


def test_dot_plot_writes_png(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / 'plot.png')
  dot_plot.save(path, [('fd', {'baseline': [3.0, 3.5, 2.9], 'groupdiff_random': [3.1, 3.1, 3.1]}),
                       ('acc', {'baseline': [0.9, 0.92, 0.91], 'groupdiff_random': [1, 1, 1]})],
                title='t')
  image = np.asarray(Image.open(path))
  assert image.shape[1] > 2 * 300 and (image != 255).any()


def test_finished_runs_are_read_back_not_retrained(tmp_path, monkeypatch):
  from groupdiff_jax.evaluation import digits_classifier  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(digits_classifier, 'load_or_train',
                      lambda d, s: digits_classifier.Classifier(None, s, 0.97, None, None))
  done = {'arm': 'baseline', 'seed': 0, 'eval/digits_fd': 1.5}
  os.makedirs(tmp_path / 'runs' / 'baseline_seed0')
  with open(tmp_path / 'runs' / 'baseline_seed0' / 'result.json', 'w') as f:
    json.dump(done, f)
  base = load_config('reproduce_digits')
  assert reproduction.run_grid(base, str(tmp_path), ['baseline'], [0]) == [done]


def test_unknown_arm_is_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.reproduce', '--config=configs/reproduce_digits.py',
       f'--workdir={tmp_path}/out', "--config.reproduce.arms=('baseline','groupdiff_x')"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith('groupdiff_jax: error: --config.reproduce.arms: unknown')
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'out')
