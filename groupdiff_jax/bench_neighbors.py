"""Scale benchmark of the neighbours command on synthetic embeddings shaped like real ones.

  python -m groupdiff_jax.bench_neighbors --workdir=/tmp/bench_neighbors            # ImageNet size
  python -m groupdiff_jax.bench_neighbors --workdir=/tmp/bn128k --n=128000

Generates n unit vectors of width dim (retrieval/synthetic.py; `--data=realistic`: overlapping
classes of Zipf-distributed sizes with sub-modes, near-duplicates and outliers, top-1 cosine
median ~0.7 and 16th ~0.57 like DINOv2 on ImageNet; `--data=clustered`: the well-separated
clusters of issue 4, which hide recall problems), float16 shards, in a child process so its
memory is not counted. Then times `groupdiff_jax.neighbors` on them in this process: the complete
neighbour file with recall@K and @16 measured against exact search on a sample. Reports wall
time, peak RSS (getrusage ru_maxrss of this process) and recall, and writes them to
WORKDIR/bench_result.json. The target: n=1,281,167, dim=1024, K=100 in <= 15 min on 2 CPU cores,
peak RSS <= 16 GB, recall@16 and recall@100 >= 0.95 on the realistic data.
"""
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import time

from absl import flags

from groupdiff_jax import cli, neighbors, progress
from groupdiff_jax.retrieval import synthetic


def default_config():
  """configs/neighbors_default.py of this checkout (configs/ is not an installed package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'neighbors_default.py')
  spec = importlib.util.spec_from_file_location('neighbors_default_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _generate(data: str, directory: str, n: int, dim: int, groups: int, seed: int) -> None:
  synthetic.GENERATORS[data](directory, n, dim, groups, seed)


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def bench(workdir: str, n: int, dim: int, clusters: int, k: int, recall_queries: int,
          seed: int = 0, overrides: tuple[str, ...] = (), data: str = 'realistic') -> dict:
  """clusters: classes (realistic) or clusters (clustered); 0 means n / 1281 (ImageNet's)."""
  if data not in synthetic.GENERATORS:
    raise cli.UserError(f'--data={data}: unknown; known: {", ".join(synthetic.GENERATORS)}')
  clusters = clusters or max(2, round(n / 1281))
  emb_dir = os.path.join(workdir, f'embeddings_{data}')
  out_dir = os.path.join(workdir, f'neighbors_{data}')
  t = time.time()
  child = multiprocessing.get_context('spawn').Process(
      target=_generate, args=(data, emb_dir, n, dim, clusters, seed))
  child.start()
  child.join()
  if child.exitcode != 0:
    raise RuntimeError(f'generating embeddings failed (exit code {child.exitcode})')
  gen_s = time.time() - t
  progress.say(f'bench: {data} embeddings ready in {progress.duration(gen_s)} (child peak RSS '
              f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GB)')

  config = default_config()
  config.embeddings, config.k, config.recall_queries = emb_dir, k, recall_queries
  for item in overrides:  # key.sub=value
    key, value = item.split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = _parse_value(value)
  rss_before = neighbors.peak_rss_gb()
  t0, cpu0 = time.time(), os.times()
  header = neighbors.run(config, out_dir)
  wall, cpu1 = time.time() - t0, os.times()
  result = {
      'data': data, 'n': n, 'dim': dim, 'k': k, 'clusters': clusters,
      'recall_queries': recall_queries,
      'wall_s': round(wall, 1),
      'cpu_s': round(cpu1.user + cpu1.system - cpu0.user - cpu0.system, 1),
      'peak_rss_gb': round(neighbors.peak_rss_gb(), 2), 'rss_before_gb': round(rss_before, 2),
      'recall': header['recall'], 'index': header['index'], 'seconds': header['seconds'],
      'grouping': header['grouping'], 'generate_s': round(gen_s, 1),
      'machine': f'{platform.machine()}, {os.cpu_count()} cores, load avg at end '
                 f'{os.getloadavg()[0]:.1f}',
  }
  with open(os.path.join(workdir, 'bench_result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  progress.say(f'bench: {data} n={n} dim={dim} K={k}: {progress.duration(wall)} wall '
               f'({result["cpu_s"]:.0f} CPU s), peak RSS {result["peak_rss_gb"]:.2f} GB, '
               f'recall {header["recall"]}')
  return result


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  bench(f.workdir, f.n, f.dim, f.clusters, f.k, f.recall_queries, f.seed, tuple(f.set), f.data)


if __name__ == '__main__':
  flags.DEFINE_string('workdir', '/tmp/bench_neighbors', 'Embeddings and neighbour file go here.')
  flags.DEFINE_integer('n', 1_281_167, 'Number of embeddings (ImageNet-1k train).')
  flags.DEFINE_integer('dim', 1024, 'Embedding width (DINOv2-L).')
  flags.DEFINE_string('data', 'realistic', 'Generator: realistic | clustered.')
  flags.DEFINE_integer('clusters', 0, 'Classes (realistic) or clusters; 0: n / 1281.')
  flags.DEFINE_integer('k', 100, 'Neighbours per image.')
  flags.DEFINE_integer('recall_queries', 1000, 'Queries checked against exact search.')
  flags.DEFINE_integer('seed', 0, 'Generator seed.')
  flags.DEFINE_multi_string('set', [], 'neighbours config override, e.g. scann.num_leaves=1500')
  cli.run(main, dirs=())
