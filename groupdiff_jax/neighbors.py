"""Builds the neighbour file: each image's top-K most similar images by embedding cosine.

  python -m groupdiff_jax.neighbors --config=configs/neighbors_default.py \
      --config.embeddings=EMB_DIR --workdir=OUT_DIR

Reads the shards written by groupdiff_jax.embed, searches with a backend from
retrieval/backends.py (ScaNN for large n, exact for small), writes OUT_DIR/{ids,sims}.npy +
header.json (retrieval/neighbor_file.py), and prints recall against exact search on a random
sample plus grouping statistics. Every input check runs before any work: a bad input exits with a
one-line error and leaves the output directory untouched. The file is written into a temporary
directory and renamed into place, header last; an existing file in --workdir is replaced only
when it was built from the same embeddings (dataset name, n and a fingerprint of the rows).
"""
import concurrent.futures
import datetime
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from groupdiff_jax import cli, progress
from groupdiff_jax.retrieval import backends, neighbor_file, stats
from groupdiff_jax.retrieval.embedding_store import EmbeddingSet
from groupdiff_jax.retrieval.errors import InputError


def peak_rss_gb() -> float:
  """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _memory() -> str:
  return f'(RSS peak so far {peak_rss_gb():.2f} GB)'


def _warn(msg: str) -> None:
  print(f'neighbors: warning: {msg}', file=sys.stderr, flush=True)


def _check_output(workdir: str, emb: EmbeddingSet, fingerprint: str) -> None:
  """Refuses to replace a neighbour file that belongs to other embeddings: another dataset, or
  the same dataset name with other data (n, or the fingerprint of the rows, differs)."""
  if not os.path.exists(os.path.join(workdir, 'header.json')):
    return
  try:
    old = neighbor_file.read_header(workdir)
  except (neighbor_file.NeighborFileError, ValueError) as e:
    raise InputError(f'{workdir} holds an unreadable neighbour file ({e}); choose another '
                     'workdir or remove it') from None
  if old.get('dataset') != emb.dataset:
    raise InputError(f'{workdir} holds a neighbour file for dataset {old.get("dataset")!r}, not '
                     f'{emb.dataset!r}; choose another workdir or remove it')
  if old.get('n') != emb.n or old.get('fingerprint', fingerprint) != fingerprint:
    raise InputError(f'{workdir} holds a neighbour file for dataset {emb.dataset!r} built from '
                     f'other embeddings (n={old.get("n")}, fingerprint '
                     f'{old.get("fingerprint")}; these: n={emb.n}, fingerprint {fingerprint}); '
                     'choose another workdir or remove it')


def _overrides(config: ml_collections.ConfigDict, backend: str) -> dict[str, Any]:
  if backend == 'scann':
    return {k: v for k, v in config.scann.to_dict().items() if v is not None}
  return {'block': config.exact_block}


def run(config: ml_collections.ConfigDict, workdir: str,
        log: Callable[[str], None] = progress.say,
        warn: Callable[[str], None] = _warn) -> dict[str, Any]:
  """Checks the inputs, builds and writes the neighbour file; returns its header."""
  t_start = time.time()
  if not config.embeddings:
    raise InputError('config.embeddings is not set (the embed job\'s workdir)')
  if not workdir:
    raise InputError('--workdir is not set')
  k = int(config.k)
  if k < 1:
    raise InputError(f'K={k} must be at least 1')
  emb = EmbeddingSet(config.embeddings)           # structure: manifest, shard counts and widths
  if k >= emb.n:
    raise InputError(f'K={k} must be smaller than the number of images n={emb.n}')
  try:
    name = backends.resolve(config.backend, emb.n, config.exact_max_n)
    params = backends.BACKENDS[name].params(emb.n, k, _overrides(config, name))
  except KeyError as e:
    raise InputError(f'config: unknown backend or parameter {e}; backends: auto, '
                     f'{", ".join(backends.BACKENDS)}') from None
  log(f'neighbors: {emb.dataset} ({emb.encoder}) n={emb.n} dim={emb.dim} K={k} backend={name}')
  norms = emb.check_values()                       # NaN/Inf and zero norms: one streamed pass
  fingerprint = emb.fingerprint()
  _check_output(workdir, emb, fingerprint)
  if norms['not_unit']:
    warn(f'{norms["not_unit"]} of {emb.n} embeddings are not L2-normalised (norms '
         f'{norms["min_norm"]:.3g} to {norms["max_norm"]:.3g}); they are normalised here, but '
         'check the job that wrote them')
  t_loaded = time.time()
  log(f'neighbors: embeddings checked in {progress.duration(t_loaded - t_start)} {_memory()}')

  # The exact reference for the recall check needs no index: compute it alongside the build.
  measure = name != 'exact' and config.recall_queries > 0
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    truth = pool.submit(stats.exact_truth, emb, k, config.recall_queries, config.seed) \
        if measure else None
    ids, sims = backends.BACKENDS[name].run(emb, k, params, log)
    t_index = time.time()
    log(f'neighbors: top-{k} of {emb.n} images in {progress.duration(t_index - t_loaded)} '
        f'{_memory()}')
    if measure:
      rec: dict[str, Any] = stats.recall(ids, truth.result(), config.seed,
                                         tuple(config.recall_at))
      log('neighbors: recall vs exact search on %d queries: %s' % (rec['num_queries'], ', '.join(
          f'{key.replace("at_", "@")}={val:.4f}' for key, val in rec.items()
          if key.startswith('at_'))))
    else:
      rec = {'exact': True} if name == 'exact' else {}
  t_recall = time.time()

  group = stats.grouping(sims, config.group_size, config.threshold)
  for line in stats.format_grouping(group):
    log(line)
  header = {
      'dataset': emb.dataset, 'encoder': emb.encoder, 'fingerprint': fingerprint,
      'embeddings': os.path.abspath(config.embeddings),
      'index': dict(params, backend=name), 'recall': rec, 'grouping': group,
      'ids': emb.manifest.get('ids', ''),
      'id_list_sha1': emb.manifest.get('id_list_sha1', ''),  # the id order, checked by training
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'seconds': {'load': round(t_loaded - t_start, 1), 'index': round(t_index - t_loaded, 1),
                  'recall': round(t_recall - t_index, 1)},
  }
  neighbor_file.write_neighbors(workdir, ids, sims, header)
  total = time.time() - t_start
  log(f'neighbors: wrote {workdir} in {progress.duration(total)} total, peak RSS '
      f'{peak_rss_gb():.2f} GB')
  return neighbor_file.read_header(workdir)


def main(argv: list[str]) -> None:
  del argv
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags are defined only when run as a program: importing this module (tests, other
  # commands that also define --config) must not register them.
  config_flags.DEFINE_config_file('config', None, 'neighbours config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory that receives the neighbour file.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main, dirs=('workdir',))
