"""Offline retrieval path on small data: embed job, neighbour file, bad-input errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, apply_overrides, load_config, random_dinov2_folder
from groupdiff_jax import embed, neighbors
from groupdiff_jax.retrieval import (embedding_store, exact, neighbor_file, scann_index,
                                     synthetic)
from groupdiff_jax.retrieval.errors import InputError

pytest.importorskip('scann', reason='the ScaNN backend needs the scann wheel (Linux)')


def _nb_config(embeddings, **kw):
  c = load_config('neighbors_default')
  c.embeddings = str(embeddings)
  return apply_overrides(c, kw)


@pytest.fixture(scope='module')
def clustered(tmp_path_factory):
  d = tmp_path_factory.mktemp('emb')
  synthetic.write_clustered(str(d), 3000, 64, num_clusters=30, shard_size=1000, log=None)
  return d


@pytest.fixture(scope='module')
def exact_file(clustered, tmp_path_factory):
  out = tmp_path_factory.mktemp('exact')
  neighbors.run(_nb_config(clustered, k=20, backend='exact'), str(out), log=lambda m: None)
  return out


@pytest.mark.parametrize('sample', [None, 700])  # 700 < n: trained on a sample, rest upserted
def test_scann_neighbour_file_matches_exact(clustered, exact_file, tmp_path, sample):
  config = _nb_config(clustered, k=20, backend='scann')
  config.scann.training_sample_size = sample
  header = neighbors.run(config, str(tmp_path), log=lambda m: None)
  ids, sims, h = neighbor_file.read_neighbors(str(tmp_path))
  eids, esims, _ = neighbor_file.read_neighbors(str(exact_file))
  assert ids.dtype == np.int32 and sims.dtype == np.float16 and ids.shape == (3000, 20)
  assert h['dataset'] == header['dataset'] and h['encoder'] == 'synthetic' and h['k'] == 20
  assert h['index']['backend'] == 'scann' and h['index']['num_leaves'] > 1
  assert h['recall']['at_20'] >= 0.99 and h['recall']['at_16'] >= 0.99
  assert 0 < h['grouping']['share_groupable'] <= 1
  assert not (ids == np.arange(3000)[:, None]).any()             # self excluded
  assert (np.diff(sims.astype(np.float32), axis=1) <= 0).all()   # best first
  agree = np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(ids, eids)])
  assert agree >= 0.99
  same = ids == eids                                             # exact reorder: exact sims
  np.testing.assert_allclose(sims[same].astype(np.float32), esims[same].astype(np.float32),
                             atol=1e-3)


def test_exact_file_matches_numpy(clustered, exact_file):
  ids, sims, _ = neighbor_file.read_neighbors(str(exact_file))
  x = embedding_store.EmbeddingSet(str(clustered)).load_float32()
  full = x[:200] @ x.T
  full[np.arange(200), np.arange(200)] = -np.inf
  ref = np.sort(full, axis=1)[:, ::-1][:, :20]
  np.testing.assert_allclose(sims[:200].astype(np.float32), ref, atol=1e-3)


def test_scann_is_deterministic(clustered, tmp_path):
  for out in ('a', 'b'):
    config = _nb_config(clustered, k=10, backend='scann', recall_queries=0)
    config.scann.training_sample_size = 1000  # the upsert path too
    neighbors.run(config, str(tmp_path / out), log=lambda m: None)
  a, b = (neighbor_file.read_neighbors(str(tmp_path / o)) for o in ('a', 'b'))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_streamed_exact_equals_blocked_exact(clustered):
  emb = embedding_store.EmbeddingSet(str(clustered))
  qids = np.array([0, 5, 999, 1000, 2999])
  ids, sims = exact.exact_topk_streamed(emb.take(qids), qids, emb.unit_blocks(block=700), 7)
  ref_ids, ref_sims = exact.exact_topk(emb.load_float32(), 7, query_ids=qids)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_drop_self_handles_duplicates_and_misses():
  ids = np.array([[0, 7, 8], [5, 1, 9], [4, 6, 2]])   # row 2 lacks itself: drop its last
  sims = np.array([[1., .9, .8], [1., 1., .7], [.9, .8, .7]])
  out_ids, out_sims = scann_index.drop_self(ids, sims)
  np.testing.assert_array_equal(out_ids, [[7, 8], [5, 9], [4, 6]])
  np.testing.assert_array_equal(out_sims, [[.9, .8], [1., .7], [.9, .8]])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error before any work, nothing overwritten.
def _write_embeddings(d, rows, *, dataset='toy', counts=None, dim=None):
  counts = counts or [len(rows)]
  m = embedding_store.plan_manifest(dataset=dataset, encoder='toy', n=sum(counts),
                                    dim=dim or rows.shape[1], shard_size=counts[0], ids='row')
  embedding_store.write_manifest(str(d), m)
  start = 0
  for shard, count in zip(m['shards'], counts):
    with open(os.path.join(str(d), shard['file']), 'wb') as f:
      np.save(f, rows[start:start + count].astype(np.float16))
    start += count
  return m


def _unit(n, d, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('case,match', [
    ('nan', 'NaN/Inf'), ('inf', 'NaN/Inf'), ('zero', 'zero norm'),
    ('count', 'rows at start'), ('width', 'width 8'), ('missing', 'is missing'),
    ('k', 'K=40 must be smaller'), ('other_dataset', "for dataset 'other'"),
])
def test_bad_input_is_rejected_before_work(tmp_path, case, match):
  emb, out = tmp_path / 'emb', tmp_path / 'out'
  rows = _unit(40, 8)
  if case == 'nan':
    rows[17, 3] = np.nan
  elif case == 'inf':
    rows[3, 0] = np.inf
  elif case == 'zero':
    rows[21] = 0
  if case == 'count':    # manifest plans 20 + 20, the second file holds 19
    m = _write_embeddings(emb, rows, counts=[20, 20])
    np.save(os.path.join(str(emb), m['shards'][1]['file']), rows[20:39].astype(np.float16))
  elif case == 'width':  # one shard 7 wide
    m = _write_embeddings(emb, rows, counts=[20, 20])
    np.save(os.path.join(str(emb), m['shards'][1]['file']), rows[20:, :7].astype(np.float16))
  else:
    m = _write_embeddings(emb, rows, counts=[20, 20])
  if case == 'missing':
    os.remove(os.path.join(str(emb), m['shards'][1]['file']))
  # An existing neighbour file in the output dir must survive every failure untouched.
  neighbor_file.write_neighbors(str(out), np.zeros((3, 2), np.int32), np.zeros((3, 2)),
                                {'dataset': 'other' if case == 'other_dataset' else 'toy'})
  before = {f: open(os.path.join(str(out), f), 'rb').read() for f in os.listdir(str(out))}
  with pytest.raises(InputError, match=match) as err:
    neighbors.run(_nb_config(emb, k=40 if case == 'k' else 5), str(out), log=lambda m: None)
  assert '\n' not in str(err.value)
  after = {f: open(os.path.join(str(out), f), 'rb').read() for f in os.listdir(str(out))}
  assert after == before


def test_cli_prints_one_line_error(tmp_path):
  _write_embeddings(tmp_path / 'emb', _unit(10, 4))
  proc = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.neighbors',
       f'--config={ROOT}/configs/neighbors_default.py', f'--config.embeddings={tmp_path}/emb',
       '--config.k=10', f'--workdir={tmp_path}/out'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      'groupdiff_jax: error: K=10 must be smaller than the number of images n=10']
  assert not os.path.exists(tmp_path / 'out')


# ---------------------------------------------------------------------------------------------
# Embed job.
def _image_folder(d):
  rng = np.random.default_rng(1)
  specs = {'b/img3.png': ((40, 30, 3), 'RGB'), 'a/img1.png': ((25, 50, 3), 'RGB'),
           'a/img0.PNG': ((32, 32), 'L'), 'c.png': ((20, 20, 4), 'RGBA'),
           'b/img2.png': ((60, 45, 3), 'RGB')}
  for name, (shape, mode) in specs.items():
    os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(d, name))
  (d / 'notes.txt').write_text('not an image')
  return d


def _embed_config(model_dir, image_dir):
  c = load_config('embed_dinov2_folder')
  c.model_dir, c.data.path = str(model_dir), str(image_dir)
  c.batch_size, c.shard_size, c.num_workers = 2, 2, 2
  return c


def test_embed_folder_and_resume(tmp_path):
  config = _embed_config(random_dinov2_folder(str(tmp_path / 'model')),
                         _image_folder(tmp_path / 'images'))
  work = tmp_path / 'emb'
  logs = []
  m = embed.run(config, str(work), log=logs.append)
  assert m['n'] == 5 and m['dim'] == 32 and len(m['shards']) == 3
  assert (work / 'image_ids.txt').read_text().split() == [
      'a/img0.PNG', 'a/img1.png', 'b/img2.png', 'b/img3.png', 'c.png']
  assert any('ETA' in line for line in logs)
  emb = embedding_store.EmbeddingSet(str(work))
  first = emb.load_float32()
  assert np.load(work / m['shards'][0]['file']).dtype == np.float16
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-6)
  assert np.abs(first[0] - first[1]).max() > 1e-2  # different images, different embeddings

  # Rerun: every shard finished, nothing recomputed or rewritten.
  mtimes = {s['file']: os.stat(work / s['file']).st_mtime_ns for s in m['shards']}
  logs.clear()
  embed.run(config, str(work), log=logs.append)
  assert "(3 of this process's 3 already done)" in logs[0]
  assert {f: os.stat(work / f).st_mtime_ns for f in mtimes} == mtimes
  # A lost shard is recomputed, identically.
  os.remove(work / m['shards'][1]['file'])
  logs.clear()
  embed.run(config, str(work), log=logs.append)
  assert "(2 of this process's 3 already done)" in logs[0]
  np.testing.assert_array_equal(embedding_store.EmbeddingSet(str(work)).load_float32(), first)

  # Another job in the same workdir is refused before any work.
  config.data.name = 'something-else'
  with pytest.raises(InputError, match='another job'):
    embed.run(config, str(work), log=logs.append)


def test_embed_tfds_uint8_tensor_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  from etils import epath  # pylint: disable=import-outside-toplevel  (a tfds dependency)

  class TinyRetrievalImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')
    pkg_dir_path = epath.Path(str(tmp_path))  # tfds otherwise wants the module to be a package

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib')}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(2)
      for i in range(3):
        yield i, {'image': rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)}

  TinyRetrievalImages(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                      ).download_and_prepare()
  config = load_config('embed_clip_tfds')
  config.model_dir = random_dinov2_folder(str(tmp_path / 'model'))
  config.data.tfds_name, config.data.data_dir = 'tiny_retrieval_images', str(tmp_path / 'tfds')
  config.shard_size = 2
  m = embed.run(config, str(tmp_path / 'emb'), log=lambda s: None)
  assert m['n'] == 3 and m['dataset'] == 'tfds:tiny_retrieval_images/train'
  assert 'record i' in m['ids']
  assert embedding_store.EmbeddingSet(str(tmp_path / 'emb')).load_float32().shape == (3, 32)


# ---------------------------------------------------------------------------------------------
# The realistic benchmark data.
def test_realistic_embeddings_have_real_statistics():
  n, dim = 20_000, 256
  knobs = synthetic.Realistic(num_classes=round(n / 1281))
  params = synthetic.realistic_params(n, dim, knobs, seed=0)
  x, labels = synthetic.generate_realistic_chunk(0, n, params, knobs, seed=0)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
  q = np.random.default_rng(1).choice(n, 500, replace=False)
  sims = x[q] @ x.T
  sims[np.arange(len(q)), q] = -np.inf
  top = -np.sort(-np.partition(sims, -16, axis=1)[:, -16:], axis=1)   # [q, 16], best first
  # DINOv2-L on ImageNet: top-1 cosine median ~0.7, 16th ~0.57.
  assert abs(np.median(top[:, 0]) - 0.70) < 0.04
  assert abs(np.median(top[:, 15]) - 0.57) < 0.04
  # Near-duplicates (cosine ~0.98) and outliers (nothing close) exist, a few percent each.
  assert 0.01 < np.mean(top[:, 0] > 0.95) < 0.06
  assert np.mean(top[:, 0] < 0.4) > 0.002
  # Classes overlap: a clear minority of the top 16 is from other classes.
  nn = np.argsort(-sims, axis=1)[:, :16]
  assert 0.6 < np.mean(labels[nn] == labels[q][:, None]) < 0.95
  # Zipf class sizes: the largest classes follow size ~ rank^-1.
  sizes = np.sort(np.bincount(labels, minlength=knobs.num_classes))[::-1]
  slope = np.polyfit(np.log(np.arange(1, 9)), np.log(sizes[:8]), 1)[0]
  assert -1.3 < slope < -0.7 and sizes[0] > 5 * np.median(sizes)


def test_realistic_writer_is_deterministic_and_resumable(tmp_path):
  m = synthetic.write_realistic(str(tmp_path / 'a'), 3000, 32, shard_size=1000, log=None)
  first = embedding_store.EmbeddingSet(str(tmp_path / 'a')).load_float32()
  os.remove(tmp_path / 'a' / m['shards'][1]['file'])
  synthetic.write_realistic(str(tmp_path / 'a'), 3000, 32, shard_size=1000, log=None)
  np.testing.assert_array_equal(embedding_store.EmbeddingSet(str(tmp_path / 'a')).load_float32(),
                                first)
  assert m['source']['kind'] == 'realistic' and m['source']['num_classes'] == 2


# ---------------------------------------------------------------------------------------------
# A safe output: atomic write, the same data only, a warning for unnormalised input.
def _files(d):
  return {f: open(os.path.join(str(d), f), 'rb').read() for f in sorted(os.listdir(str(d)))}


def test_write_is_atomic_header_last(tmp_path, monkeypatch):
  out = str(tmp_path / 'nb')
  neighbor_file.write_neighbors(out, np.ones((4, 2), np.int32), np.ones((4, 2)), {'dataset': 'a'})
  before = _files(out)
  real_save = np.save

  def save_then_crash(path, arr):  # the process dies while writing sims
    real_save(path, arr)
    if str(path).endswith('sims.npy'):
      raise KeyboardInterrupt
  monkeypatch.setattr(np, 'save', save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    neighbor_file.write_neighbors(out, np.zeros((4, 2), np.int32), np.zeros((4, 2)), {})
  assert _files(out) == before                                # the old file, complete
  monkeypatch.setattr(np, 'save', real_save)

  real_replace = os.replace

  def crash_on_sims(src, dst):  # ids renamed, the process dies before sims and the header
    if str(dst).endswith('sims.npy'):
      raise KeyboardInterrupt
    real_replace(src, dst)
  monkeypatch.setattr(os, 'replace', crash_on_sims)
  with pytest.raises(KeyboardInterrupt):
    neighbor_file.write_neighbors(out, np.zeros((4, 2), np.int32), np.zeros((4, 2)), {})
  monkeypatch.setattr(os, 'replace', real_replace)
  assert 'header.json' not in os.listdir(out)                 # no header beside new ids
  with pytest.raises(neighbor_file.NeighborFileError, match='missing header.json'):
    neighbor_file.read_neighbors(out)
  os.makedirs(os.path.join(out, '.writing-stale'))            # a crashed write's leftovers
  neighbor_file.write_neighbors(out, np.full((4, 2), 3, np.int32), np.zeros((4, 2)), {})
  assert sorted(os.listdir(out)) == ['header.json', 'ids.npy', 'sims.npy']
  assert (neighbor_file.read_neighbors(out)[0] == 3).all()


def test_refuses_a_file_from_other_data_of_the_same_name(tmp_path):
  out = tmp_path / 'out'
  _write_embeddings(tmp_path / 'a', _unit(40, 8, seed=0))
  first = neighbors.run(_nb_config(tmp_path / 'a', k=5), str(out), log=lambda m: None)
  assert len(first['fingerprint']) == 16
  neighbors.run(_nb_config(tmp_path / 'a', k=5), str(out), log=lambda m: None)  # same: replaced
  before = _files(out)
  _write_embeddings(tmp_path / 'b', _unit(40, 8, seed=1))      # same name and n, other rows
  _write_embeddings(tmp_path / 'c', _unit(41, 8, seed=0))      # same name, other n
  for other, what in (('b', 'n=40, fingerprint'), ('c', 'n=41')):
    with pytest.raises(InputError, match=f"dataset 'toy' built from other embeddings .*these: "
                                         f'{what}'):
      neighbors.run(_nb_config(tmp_path / other, k=5), str(out), log=lambda m: None)
  assert _files(out) == before


def test_warns_once_about_unnormalised_embeddings(tmp_path):
  rows = _unit(40, 8)
  rows[:7] *= 3.0
  _write_embeddings(tmp_path / 'emb', rows)
  warnings = []
  neighbors.run(_nb_config(tmp_path / 'emb', k=5), str(tmp_path / 'out'), log=lambda m: None,
                warn=warnings.append)
  assert len(warnings) == 1 and warnings[0].startswith('7 of 40 embeddings are not L2-normalised')
  warnings.clear()
  _write_embeddings(tmp_path / 'unit', _unit(40, 8))
  neighbors.run(_nb_config(tmp_path / 'unit', k=5), str(tmp_path / 'out2'), log=lambda m: None,
                warn=warnings.append)
  assert not warnings  # float16-rounded unit rows are within the tolerance
