"""The real-data path end to end on CPU: an image folder -> encode (the real CLI) -> embed ->
neighbors -> train a tiny SiT on data.source='latents' -> killed and resumed = uninterrupted.
Plus a tiny TFDS dataset encoded, and every bad input refused with one line before training.

Tiny sizes: 96 images of 4 classes (one corrupt), a 2-stage random SD-VAE (16 px -> 8x8x4
latents), a 1-layer random DINOv2, a 2-block SiT, batch 16.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import (ROOT, apply_overrides, compiled_step_cache, load_config,
                      random_dinov2_folder, random_vae_folder, tiny_config)
from groupdiff_jax import cli, embed, neighbors, train
from groupdiff_jax.data import encoding, latent_store, pipeline
from groupdiff_jax.layout import layout_from_config
from groupdiff_jax.retrieval import neighbor_file

CLASSES = ('cat', 'dog', 'fox', 'owl')
SIZES = ((24, 32), (40, 28), (64, 64), (20, 50), (33, 17))
CORRUPT = 'dog/broken.jpg'
NUM_IMAGES = 96  # the corrupt file included


def _image_folder(root):
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES - 1):
    cls = CLASSES[i % len(CLASSES)]
    h, w = SIZES[i % len(SIZES)]
    # Class-dependent colour, so embeddings (and neighbours) carry some class structure.
    base = np.array([60 * (CLASSES.index(cls) + 1), 128, 255 - 60 * CLASSES.index(cls)])
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(root, cls, f'{i:03d}.png'))
  with open(os.path.join(root, CORRUPT), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 truncated jpeg')
  return root


def _encode_config(vae_dir, images, **kw):
  c = load_config('encode_imagenet')
  c.vae_dir, c.data.kind, c.data.path = str(vae_dir), 'folder', str(images)
  c.resolution, c.batch_size, c.shard_size, c.num_workers = 16, 16, 40, 2
  return apply_overrides(c, kw)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """encode (through the CLI) -> embed -> neighbors, as launch/prepare_imagenet.sh runs them."""
  base = tmp_path_factory.mktemp('e2e')
  images = _image_folder(str(base / 'images'))
  vae_dir = random_vae_folder(str(base / 'vae'))
  latents, emb, nbrs = (str(base / d) for d in ('latents', 'emb', 'neighbors'))
  proc = subprocess.run(
      [sys.executable, '-m', 'groupdiff_jax.encode', f'--config={ROOT}/configs/encode_imagenet.py',
       f'--config.vae_dir={vae_dir}', '--config.data.kind=folder', f'--config.data.path={images}',
       '--config.resolution=16', '--config.batch_size=16', '--config.shard_size=40',
       f'--workdir={latents}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'encode: 96/96 images (100.0%)' in proc.stdout and 'ETA' in proc.stdout
  assert '1 unreadable images skipped' in proc.stdout

  c = load_config('embed_dinov2_folder')
  c.model_dir, c.data.path = random_dinov2_folder(str(base / 'dinov2')), images
  c.batch_size, c.shard_size, c.num_workers = 32, 50, 2
  embed.run(c, emb, log=lambda m: None)
  n = load_config('neighbors_default')
  n.embeddings, n.k, n.backend = emb, 12, 'exact'
  neighbors.run(n, nbrs, log=lambda m: None)
  return {'base': base, 'images': images, 'vae': vae_dir, 'latents': latents, 'emb': emb,
          'neighbors': nbrs}


def test_encoded_latents_match_the_vae(prepared):
  from groupdiff_jax.models import vae as vae_lib
  m = latent_store.read_manifest(prepared['latents'])
  assert m['complete'] and m['n'] == NUM_IMAGES and m['num_records'] == NUM_IMAGES - 1
  assert m['classes'] == list(CLASSES) and m['latent_shape'] == [8, 8, 4]
  assert m['kind'] == 'moments' and m['variants'] == 1 and m['crop'] == 'adm_center_crop'
  assert [f['image'] for f in m['failed']] == [CORRUPT]
  ids = open(os.path.join(prepared['latents'], 'image_ids.txt')).read().split()
  assert ids == open(os.path.join(prepared['emb'], 'image_ids.txt')).read().split()
  emb_manifest = json.load(open(os.path.join(prepared['emb'], 'manifest.json')))
  assert [f['id'] for f in emb_manifest['failed']] == [f['id'] for f in m['failed']]

  store = latent_store.LatentSet(prepared['latents'])
  vae = vae_lib.load(prepared['vae'])
  for image_id in (0, 37, 94):  # the stored moments are the VAE's on the ADM crop
    crop = encoding.center_crop_adm(Image.open(os.path.join(prepared['images'], ids[image_id])), 16)
    mean, logvar = vae.moments(crop[None].astype(np.float32) / 127.5 - 1)
    rec = store[image_id]
    assert rec['label'] == CLASSES.index(ids[image_id].split('/')[0])
    np.testing.assert_allclose(rec['mean'][0], np.asarray(mean)[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(rec['std'][0], np.exp(0.5 * np.asarray(logvar))[0], rtol=2e-3)


def test_center_crop_adm():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)
  out = encoding.center_crop_adm(image, 16)
  # Two BOX halvings (100 -> 50 -> 25 px short side), bicubic to 16 x round(75 * 16/25) = 48.
  step = Image.fromarray(image).resize((150, 50), Image.BOX).resize((75, 25), Image.BOX)
  expect = np.asarray(step.resize((48, 16), Image.BICUBIC))[:, 16:32]
  np.testing.assert_array_equal(out, expect)


def _train_config(prepared, **kw):
  return tiny_config(**{'data.source': 'latents', 'data.path': prepared['latents'],
                        'data.neighbors': prepared['neighbors'], 'model.num_classes': 4,
                        'total_steps': 7, 'ckpt_every_steps': 3, **kw})


class Killed(Exception):
  pass


@pytest.mark.slow  # ~40 s: three short training runs (one step compile, reused)
def test_train_on_latents_killed_and_resumed_equals_uninterrupted(prepared, tmp_path,
                                                                  monkeypatch):
  config = _train_config(prepared)
  data = pipeline.make_train_data(config, layout_from_config(config))
  assert data.steps_per_epoch == 5  # 95 readable images, batch 16: steps 5, 6 are epoch 1
  drawn = np.concatenate([data.global_ids(s) for s in range(5)])
  corrupt = latent_store.read_manifest(prepared['latents'])['failed'][0]['id']
  assert corrupt not in drawn and len(np.unique(drawn)) == len(drawn)
  batches = [next(data) for _ in range(7)]
  assert batches[0]['image'].shape == (16, 8, 8, 4)
  # Fresh posterior samples: the same image drawn at two steps differs, its label does not.
  later = np.concatenate([data.global_ids(s) for s in range(5, 7)])
  same = np.intersect1d(drawn, later)[0]
  (a_step, a_slot), (b_step, b_slot) = (divmod(int(np.flatnonzero(np.concatenate(
      [data.global_ids(s) for s in range(7)]) == same)[k]), 16) for k in (0, 1))
  assert not np.allclose(batches[a_step]['image'][a_slot], batches[b_step]['image'][b_slot])
  assert batches[a_step]['label'][a_slot] == batches[b_step]['label'][b_slot]

  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  with compiled_step_cache():
    train.train(config, full)
    real_next = pipeline.TrainData.__next__
    calls = []

    def dies_at_step_5(self):  # the process dies while fetching step 5: step 3 is saved
      calls.append(1)
      if len(calls) == 5:
        raise Killed()
      return real_next(self)
    monkeypatch.setattr(pipeline.TrainData, '__next__', dies_at_step_5)
    with pytest.raises(Killed):
      train.train(config, killed)
    monkeypatch.setattr(pipeline.TrainData, '__next__', real_next)
    assert train.steps_done(killed) == [3]
    train.train(config, killed)
  by_step = lambda d: {r['step']: r['loss'] for r in map(json.loads, open(f'{d}/metrics.jsonl'))}
  assert by_step(killed) == by_step(full) and sorted(by_step(full)) == list(range(1, 8))

  # The resumed iterator serves exactly the batches the uninterrupted one served.
  resumed = pipeline.make_train_data(config, layout_from_config(config))
  fresh = pipeline.make_train_data(config, layout_from_config(config))
  [next(fresh) for _ in range(3)]
  resumed.set_state(json.loads(json.dumps(fresh.get_state())))
  for expected in batches[3:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])


def test_encode_resumes_and_redoes_a_partial_shard(prepared, tmp_path):
  work = str(tmp_path / 'lat')
  shutil.copytree(prepared['latents'], work)
  m = latent_store.read_manifest(work)
  first, second = (os.path.join(work, s['file']) for s in m['shards'][:2])
  before = open(second, 'rb').read()
  mtime = os.stat(first).st_mtime_ns
  os.remove(second)                                   # a killed job: shard 2 never renamed,
  with open(second + '.tmp', 'wb') as f:              # its temporary file half written
    f.write(before[:100])
  logs = []
  encoding.run(_encode_config(prepared['vae'], prepared['images']), work, log=logs.append)
  assert '(2 of this process\'s 3 already done)' in logs[0]
  assert os.stat(first).st_mtime_ns == mtime          # finished shards are not rewritten
  assert open(second, 'rb').read() == before          # the redone shard is identical
  latent_store.LatentSet(work)
  with pytest.raises(cli.UserError, match='holds latents of another job'):
    encoding.run(_encode_config(prepared['vae'], prepared['images'], flip=True), work)


def test_multi_process_encode_splits_the_shards(prepared, tmp_path):
  """Two processes of one job (played in turn, process 1 first): each encodes its own shards
  (p, p + 2, ...), process 0 completes the set; the result is the single-process one."""
  work = str(tmp_path / 'lat')
  config = _encode_config(prepared['vae'], prepared['images'])
  logs = []
  encoding.run(config, work, log=logs.append, process_index=1, process_count=2)
  assert 'process 1 of 2' in logs[0] and not os.path.exists(os.path.join(work, 'manifest.json'))
  m = latent_store.read_manifest(prepared['latents'])
  written = sorted(f for f in os.listdir(work) if f.endswith('.array_record'))
  assert written == [m['shards'][1]['file']]  # shards 0, 1, 2: process 1 owns shard 1 only
  m2 = encoding.run(config, work, log=logs.append, process_index=0, process_count=2)
  assert m2['complete'] and m2['failed'] == m['failed']
  for shard in m['shards']:
    with open(os.path.join(work, shard['file']), 'rb') as a, \
         open(os.path.join(prepared['latents'], shard['file']), 'rb') as b:
      assert a.read() == b.read()


def test_flip_copies_and_fixed_samples(prepared, tmp_path):
  config = _encode_config(prepared['vae'], prepared['images'], flip=True, store='sample',
                          shard_size=100)
  m = encoding.run(config, str(tmp_path / 'lat'), log=lambda s: None)
  assert m['variants'] == 2 and m['kind'] == 'sample'
  store = latent_store.LatentSet(str(tmp_path / 'lat'))
  moments = latent_store.LatentSet(prepared['latents'])
  rec, ref = store[5], moments[5]
  assert rec['latent'].shape == (2, 8, 8, 4)
  # view 0: mean + std * eps, scaled; eps is a standard normal draw
  eps = (rec['latent'][0].astype(np.float32) / 0.18215 - ref['mean'][0]) / ref['std'][0]
  assert abs(eps.mean()) < 0.3 and 0.6 < eps.std() < 1.4
  assert not np.allclose(rec['latent'][0], rec['latent'][1], atol=1e-2)  # the flipped view
  # Training picks a view per (seed, step, image): both appear over a few steps, unchanged.
  from groupdiff_jax.data import latent_source
  src = latent_source.LatentSource(store, prepared['neighbors'], seed=0, num_classes=4,
                                   model_shape=(8, 8, 4))
  drawn = [src.read(5, step)[0] for step in range(12)]
  views = {v for x in drawn for v in (0, 1) if np.array_equal(x, rec['latent'][v])}
  assert views == {0, 1} and all(any(np.array_equal(x, rec['latent'][v]) for v in (0, 1))
                                 for x in drawn)


# --- bad input: one line before training, nothing overwritten ----------------------------------

def _corrupt(prepared, tmp_path, case):
  """A copy of the prepared data broken in one way; returns config overrides."""
  lat, nb = str(tmp_path / 'lat'), str(tmp_path / 'nb')
  shutil.copytree(prepared['latents'], lat)
  shutil.copytree(prepared['neighbors'], nb)
  m = latent_store.read_manifest(lat)
  shard = os.path.join(lat, m['shards'][1]['file'])
  over = {'data.path': lat, 'data.neighbors': nb}
  if case == 'missing_shard':
    os.remove(shard)
  elif case == 'truncated_shard':
    data = open(shard, 'rb').read()
    open(shard, 'wb').write(data[:len(data) // 2])
  elif case == 'other_dataset':
    over['data.dataset'] = 'tfds:imagenet2012/train'
  elif case == 'foreign_shard':
    side = latent_store.sidecar_path(lat, m['shards'][1])
    content = json.load(open(side))
    json.dump(dict(content, dataset='folder:/elsewhere'), open(side, 'w'))
  elif case == 'labels':
    over['model.num_classes'] = 3
  elif case == 'shape':
    over['model.input_size'] = 16
  elif case == 'neighbors_n':
    ids, sims, header = neighbor_file.read_neighbors(nb)
    neighbor_file.write_neighbors(nb, np.asarray(ids)[:90], np.asarray(sims)[:90], header)
  elif case == 'neighbors_order':
    header = json.load(open(os.path.join(nb, 'header.json')))
    json.dump(dict(header, id_list_sha1='0' * 40), open(os.path.join(nb, 'header.json'), 'w'))
  return over


@pytest.mark.parametrize('case,match', [
    ('missing_shard', 'latents-00001-of-00003.array_record is missing'),
    ('truncated_shard', r'latents-00001-of-00003.array_record: .*\(.*truncated\?\)'),
    ('other_dataset', "holds latents of 'folder:.*', but config.data.dataset is 'tfds:imagenet"),
    ('foreign_shard', "belongs to dataset 'folder:/elsewhere'"),
    ('labels', r'label 3 of image id \d+ is outside \[0, 3\)'),
    ('shape', r'latents in .* are \(8, 8, 4\) .* the model expects \(16, 16, 4\)'),
    ('neighbors_n', r'is for other data than the latents .*n=90 vs n=96'),
    ('neighbors_order', r'the image lists \(id order\) differ'),
])
def test_bad_input_is_refused_before_training(prepared, tmp_path, case, match):
  config = _train_config(prepared, **_corrupt(prepared, tmp_path, case))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"previous": true}')
  with pytest.raises(cli.UserError, match=match) as err:
    train.train(config, str(workdir))
  assert '\n' not in str(err.value)
  assert os.listdir(workdir) == ['config.json']
  assert (workdir / 'config.json').read_text() == '{"previous": true}'


def test_cli_one_line_errors(prepared, tmp_path):
  """The trainer and the encode job print one line and exit 2 (and create no workdir)."""
  for args, expect in [
      (['groupdiff_jax.main', f'--config={ROOT}/configs/sit_s.py'],
       "data.source='latents' needs config.data.path"),
      (['groupdiff_jax.encode', f'--config={ROOT}/configs/encode_imagenet.py',
        '--config.vae_dir=/nonexistent', '--config.data.kind=folder',
        f'--config.data.path={prepared["images"]}'], 'config.vae_dir: /nonexistent'),
  ]:
    out = str(tmp_path / args[0])
    proc = subprocess.run([sys.executable, '-m', *args, f'--workdir={out}'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('groupdiff_jax: error: ') and expect in lines[0], lines[0]
    assert not os.path.exists(out)


def test_encode_a_tfds_dataset(tmp_path, prepared):
  tfds = pytest.importorskip('tensorflow_datasets')
  from etils import epath  # pylint: disable=import-outside-toplevel  (a tfds dependency)

  class TinyLabelledImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')
    pkg_dir_path = epath.Path(str(tmp_path))  # tfds otherwise wants the module to be a package

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
          'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(4)
      for i in range(10):
        yield i, {'image': rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8),
                  'label': i % 3}

  TinyLabelledImages(data_dir=str(tmp_path / 'tfds'), file_format='array_record'
                     ).download_and_prepare()
  config = _encode_config(prepared['vae'], '', shard_size=4)
  config.data.kind, config.data.tfds_name = 'tfds', 'tiny_labelled_images'
  config.data.data_dir = str(tmp_path / 'tfds')
  m = encoding.run(config, str(tmp_path / 'lat'), log=lambda s: None)
  assert m['dataset'] == 'tfds:tiny_labelled_images/train' and m['n'] == 10
  assert m['classes'] == ['a', 'b', 'c'] and not m['failed'] and len(m['shards']) == 3
  store = latent_store.LatentSet(str(tmp_path / 'lat'))
  records = tfds.data_source('tiny_labelled_images', split='train',
                             data_dir=str(tmp_path / 'tfds'), download=False)
  np.testing.assert_array_equal(store.labels, [records[i]['label'] for i in range(10)])
  assert [int(store[i]['id']) for i in range(10)] == list(range(10))


def test_synthetic_latents_set_serves_batches(tmp_path):
  """The benchmark's generator writes the real format: the pipeline reads it like encode's."""
  from groupdiff_jax.data import synthetic_latents
  lat, nb = synthetic_latents.write(str(tmp_path), 512, latent_shape=(8, 8, 4), num_classes=10,
                                    k=8, shard_size=200, log=lambda s: None)
  config = tiny_config(**{'data.source': 'latents', 'data.path': lat, 'data.neighbors': nb})
  batch = next(pipeline.make_train_data(config, layout_from_config(config)))
  assert batch['image'].shape == (16, 8, 8, 4) and batch['image'].dtype == np.float32
  assert 0.1 < batch['image'].std() < 0.3  # N(0, 1) means x 0.18215, plus a little noise
  assert latent_store.read_manifest(lat)['num_records'] == 512
