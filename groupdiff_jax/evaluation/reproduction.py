"""A small-scale reproduction of GroupDiff's claim on the embedded digits: arms x seeds.

Every run trains the same model on the same data for the same number of steps and images (equal
training compute) and differs only in how the unconditional part of the batch is grouped:

  baseline             groups of 1 everywhere (plain SiT; the unconditional share plays the
                       role of label dropout) and sampled without groups;
  groupdiff_similarity GroupDiff-l, N = 4: unconditional groups of 4 nearest neighbours;
  groupdiff_random     GroupDiff-l, N = 4 with partners drawn uniformly at random.

Each run ends with the trainer's in-training evaluation (evaluation/in_training.py, digits
reference): samples of the EMA weights scored in the digits classifier's feature space (Fréchet
distance, class accuracy) and S_cross. Runs are independent workdirs, so the grid resumes: a
finished run is read back from its result.json, an interrupted one resumes from its checkpoint.
"""
import json
import os
import time

import ml_collections
import numpy as np

from groupdiff_jax import cli, progress
from groupdiff_jax.evaluation.evaluator import write_json

# arm -> config overrides (dotted keys)
ARMS: dict[str, dict] = {
    'baseline': {'group.cond_size': 1, 'group.uncond_size': 1,
                 'sample.cond_group_size': 1, 'sample.uncond_group_size': 1},
    'groupdiff_similarity': {'group.cond_size': 1, 'group.uncond_size': 4,
                             'group.neighbors': 'greedy',
                             'sample.cond_group_size': 1, 'sample.uncond_group_size': 4},
    'groupdiff_random': {'group.cond_size': 1, 'group.uncond_size': 4,
                         'group.neighbors': 'random',
                         'sample.cond_group_size': 1, 'sample.uncond_group_size': 4},
}
METRICS = ('eval/digits_fd', 'eval/digits_accuracy', 'eval/s_cross')


def run_config(base: ml_collections.ConfigDict, arm: str, seed: int,
               classifier_dir: str) -> ml_collections.ConfigDict:
  """The training config of one run: the base, the arm's grouping, the seed; one evaluation at
  the last step with the shared classifier."""
  c = base.copy_and_resolve_references()
  with c.unlocked():
    cli.set_dotted(c, ARMS[arm])
    c.seed = seed
    c.sample.seed = seed
    c.eval.every_steps = c.total_steps
    c.eval.reference = 'digits'
    c.eval.classifier_dir = classifier_dir
    c.sample.write_grid = False
  return c


def run_grid(base: ml_collections.ConfigDict, workdir: str, arms: list[str],
             seeds: list[int]) -> list[dict]:
  """Trains and evaluates every (arm, seed) not finished yet; returns every run's result."""
  from groupdiff_jax import train  # pylint: disable=import-outside-toplevel
  from groupdiff_jax.evaluation import digits_classifier  # pylint: disable=import-outside-toplevel
  classifier_dir = os.path.join(workdir, 'digits_classifier')
  classifier = digits_classifier.load_or_train(classifier_dir, base.model.input_size)
  progress.say(f'digits classifier: held-out accuracy {classifier.held_out_accuracy:.4f}')
  results = []
  for i, (arm, seed) in enumerate((a, s) for s in seeds for a in arms):  # seeds outermost:
    run_dir = os.path.join(workdir, 'runs', f'{arm}_seed{seed}')        # every arm early
    result_path = os.path.join(run_dir, 'result.json')
    if os.path.isfile(result_path):
      with open(result_path) as f:
        results.append(json.load(f))
      continue
    progress.say(f'--- run {i + 1}/{len(arms) * len(seeds)}: {arm}, seed {seed}')
    t0 = time.perf_counter()
    out = train.train(run_config(base, arm, seed, classifier_dir), run_dir)
    result = {'arm': arm, 'seed': seed, 'wall_seconds': time.perf_counter() - t0,
              **{k: out[k] for k in METRICS if k in out},
              'images_per_sec': out.get('images_per_sec')}
    write_json(result_path, result)
    results.append(result)
  return results


def summarise(results: list[dict], arms: list[str]) -> dict:
  """Per arm and metric: mean, sample standard deviation, min, max, n."""
  summary = {}
  for arm in arms:
    rows = [r for r in results if r['arm'] == arm]
    summary[arm] = {}
    for key in METRICS:
      values = np.array([r[key] for r in rows if r.get(key) is not None], np.float64)
      if len(values):
        summary[arm][key] = {'mean': float(values.mean()),
                             'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                             'min': float(values.min()), 'max': float(values.max()),
                             'n': int(len(values))}
  return summary


def table(summary: dict) -> str:
  lines = ['| arm | Fréchet distance | class accuracy | S_cross | runs |', '|---|---|---|---|---|']
  for arm, stats in summary.items():
    cells = []
    for key, fmt in (('eval/digits_fd', '{:.2f}'), ('eval/digits_accuracy', '{:.3f}'),
                     ('eval/s_cross', '{:.3f}')):
      s = stats.get(key)
      cells.append(f'{fmt.format(s["mean"])} ± {fmt.format(s["std"])}' if s else 'n/a')
    n = stats.get('eval/digits_fd', {}).get('n', 0)
    lines.append(f'| {arm} | ' + ' | '.join(cells) + f' | {n} |')
  return '\n'.join(lines)
