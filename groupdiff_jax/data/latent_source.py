"""data.source='latents': SD-VAE latents written by `groupdiff_jax.encode` + a neighbour file.

Random access into the ArrayRecord shards (data/latent_store.py); nothing is copied into memory
but the labels and the memory-mapped neighbour lists. With stored posterior moments every read
draws a fresh sample, (mean + std * eps) * scaling_factor, with eps seeded by (seed, step,
image id, `draw_rng`): the same step of a resumed run reads the same latents. With flip copies stored, the
same seed picks the view. Unreadable images (listed by the encode job) are left out of the
grouping pool, so no batch ever asks for them.

Everything is checked when the source opens, before any step, each problem one line: the
latents (manifest, every shard present and whole, labels in [0, num_classes), latent shape =
the model's input), the neighbour file (same dataset, same n, same id order), and an expected
dataset name when the config gives one.
"""
import ml_collections
import numpy as np

from groupdiff_jax import progress
from groupdiff_jax.cli import UserError
from groupdiff_jax.data import latent_store
from groupdiff_jax.retrieval import neighbor_file

PREPARE = ('prepare them with launch/prepare_imagenet.sh (python -m groupdiff_jax.encode, then '
           'python -m groupdiff_jax.embed and python -m groupdiff_jax.neighbors; README "Train '
           'on ImageNet"), then pass --config.data.path=LATENTS_DIR '
           '--config.data.neighbors=NEIGHBORS_DIR')


def check_neighbors(header: dict, latents: latent_store.LatentSet, directory: str) -> None:
  """The neighbour file must index the same images, in the same order, as the latents."""
  m = latents.manifest
  problems = []
  if header.get('dataset') != latents.dataset:
    problems.append(f'dataset {header.get("dataset")!r} vs {latents.dataset!r}')
  if header.get('n') != latents.n:
    problems.append(f'n={header.get("n")} vs n={latents.n}')
  if header.get('ids') and header.get('ids') != m.get('ids'):
    problems.append(f'ids {header.get("ids")!r} vs {m.get("ids")!r}')
  if header.get('id_list_sha1') and header['id_list_sha1'] != m.get('id_list_sha1'):
    problems.append('the image lists (id order) differ')
  if problems:
    raise UserError(f'neighbour file {directory} is for other data than the latents in '
                    f'{latents.directory}: {"; ".join(problems)} (build it from embeddings of '
                    'the same dataset)')


def draw_rng(seed: int, step: int, index: int) -> np.random.Generator:
  """The generator of one (seed, step, image) draw: SFC64 seeded with the triple packed into one
  integer (distinct for step, index < 2**32). SFC64 draws normals ~20% faster than PCG64 or
  Philox here, and the pipeline makes one generator per image read."""
  key = ((int(seed) % 2**64) << 64) | ((int(step) % 2**32) << 32) | (int(index) % 2**32)
  return np.random.Generator(np.random.SFC64(key))


class LatentSource:
  """A training source (data/sources.py protocol) over a latents directory."""

  def __init__(self, latents: latent_store.LatentSet, neighbors_dir: str, *, seed: int,
               num_classes: int, model_shape: tuple[int, int, int], dataset: str = ''):
    self._latents, self._seed = latents, seed
    m = latents.manifest
    if dataset and dataset != latents.dataset:
      raise UserError(f'{latents.directory} holds latents of {latents.dataset!r}, but '
                      f'config.data.dataset is {dataset!r}')
    self.image_shape = tuple(latents.latent_shape)
    if self.image_shape != tuple(model_shape):
      raise UserError(f'latents in {latents.directory} are {self.image_shape} (encoded at '
                      f'{m.get("resolution")} px) but the model expects {tuple(model_shape)} '
                      '(model.input_size/in_channels); encode at the matching resolution')
    labels = latents.labels[latents.valid_ids]
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
      first = int(latents.valid_ids[np.argmax(bad)])
      raise UserError(f'{latents.directory}: label {int(latents.labels[first])} of image id '
                      f'{first} is outside [0, {num_classes}) (model.num_classes); '
                      f'{int(bad.sum())} such labels')
    try:
      ids, sims, header = neighbor_file.read_neighbors(neighbors_dir)  # memory-mapped
    except (neighbor_file.NeighborFileError, OSError, ValueError, KeyError) as e:
      raise UserError(f'data.neighbors: {e}') from None
    check_neighbors(header, latents, neighbors_dir)
    self.neighbors = (ids, sims)
    self.valid_ids = latents.valid_ids  # the grouping pool: unreadable images never drawn
    self.labels = latents.labels
    self._kind, self._variants = m['kind'], int(m['variants'])
    self._scale = np.float32(m['scaling_factor'])
    skipped = f' ({len(latents.failed_ids)} unreadable left out)' if len(latents.failed_ids) else ''
    progress.say(f'data: latents {latents.directory}: {len(self.valid_ids)} of {latents.n} images'
                 f'{skipped}, {m["kind"]} {m["dtype"]} {"x".join(map(str, self.image_shape))}'
                 f'{", flip copies" if self._variants > 1 else ""}; neighbours {neighbors_dir} '
                 f'(K={ids.shape[1]})')

  def __len__(self) -> int:
    return self._latents.n

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.read(index, 0)

  def read(self, index: int, step: int) -> tuple[np.ndarray, int]:
    """(latent float32 [H, W, C], label) of image `index` as drawn at training step `step`."""
    images, labels = self.read_batch(np.array([index]), step)
    return images[0], int(labels[0])

  def read_batch(self, ids: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(latents float32 [B, H, W, C], labels int32 [B]) of images `ids` drawn at `step`; image
    i's view and eps come from draw_rng(seed, step, i) alone (not from its batch position)."""
    recs = self._latents.records(ids)
    rows = np.arange(len(ids))
    views = np.zeros(len(ids), np.int64)
    out = np.empty((len(ids), *self.image_shape), np.float32)
    for j, image_id in enumerate(ids):
      rng = draw_rng(self._seed, step, image_id)
      if self._variants > 1:
        views[j] = rng.integers(self._variants)
      if self._kind == 'moments':
        rng.standard_normal(dtype=np.float32, out=out[j])  # eps; the sample is made in place
    # One stored view: a strided view of the records, no copy; two: each image's drawn view.
    pick = (lambda a: a[:, 0]) if self._variants == 1 else (lambda a: a[rows, views])
    if self._kind == 'sample':
      out[...] = pick(recs['latent'])
    else:
      out *= pick(recs['std'])
      out += pick(recs['mean'])
      out *= self._scale
    return out, recs['label'].astype(np.int32)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  workdir: str | None = None) -> 'LatentSource':
    del workdir  # nothing cached
    for key, what in (('path', 'the encode job\'s workdir'),
                      ('neighbors', 'the neighbors job\'s workdir')):
      if not config.data[key]:
        raise UserError(f'data.source=\'latents\' needs config.data.{key} ({what}): '
                        + PREPARE)
    model = config.model
    return cls(latent_store.LatentSet(config.data.path), config.data.neighbors,
               seed=config.seed, num_classes=model.num_classes,
               model_shape=(model.input_size, model.input_size, model.in_channels),
               dataset=config.data.get('dataset', ''))
