"""Synthetic embeddings for the scale benchmark and tests, written as embedding shards.

Two generators, both unit rows, generated in chunks (one per shard) from per-chunk seeds, so
memory is bounded by a shard and the output depends only on the arguments:

`clustered`  well-separated clusters (tests that need near-perfect recall on small data):
  x = normalise(g*m + a*c_k + b*U_k z / sqrt(r) + s*e / sqrt(d))
  m one shared unit direction, c_k the unit centre of cluster k (uniform over `num_clusters`),
  U_k a random d x r basis per cluster with z ~ N(0, I_r) (within-cluster variation of low
  intrinsic dimension), e isotropic noise N(0, I_d). Top-1 similarity ~0.75, rank 16 ~0.69.

`realistic`  shaped like DINOv2/CLIP features of a real image set, which is what makes an
  approximate index miss neighbours (the clustered data hides it):
  * classes of Zipf-distributed sizes (class of size rank j holds a share ~ j^-zipf), so a few
    classes are huge and spread over many index leaves;
  * overlapping classes: class centres are drawn around a few superclass centres, so the classes
    of a superclass share most of their direction;
  * sub-modes: each class is a mixture of modes (one per ~`points_per_mode` images: poses,
    backgrounds), each with its own low-rank variation;
  * near-duplicates (a share of images is another image plus a little noise, cosine ~0.98) and
    outliers (images with no class structure, only the shared direction plus noise).
  The default weights give, at any n when num_classes ~ n / 1281 (ImageNet's images per class),
  a median top-1 cosine of ~0.7 and a median 16th of ~0.57, as real DINOv2/CLIP features of
  ImageNet, and ~79% of an image's top 16 in its own class.
"""
import dataclasses
from collections.abc import Callable

import numpy as np

from groupdiff_jax.retrieval import embedding_store


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _add_low_rank(x: np.ndarray, groups: np.ndarray, z: np.ndarray, bases: np.ndarray,
                  scale: float) -> None:
  """x[i] += scale * z[i] @ bases[groups[i]]: one small matmul per group present."""
  order = np.argsort(groups, kind='stable')
  bounds = np.searchsorted(groups[order], np.arange(bases.shape[0] + 1))
  for k in np.flatnonzero(np.diff(bounds)):
    rows = order[bounds[k]:bounds[k + 1]]
    x[rows] += scale * (z[rows] @ bases[k])


# ---------------------------------------------------------------------------------------------
# clustered
def cluster_params(num_clusters: int, dim: int, rank: int, seed: int) -> tuple[np.ndarray, ...]:
  rng = np.random.default_rng([seed, 0])
  mean = _unit(rng.standard_normal(dim).astype(np.float32))
  centres = _unit(rng.standard_normal((num_clusters, dim)).astype(np.float32))
  bases = (rng.standard_normal((num_clusters, rank, dim)) / np.sqrt(dim)).astype(np.float32)
  return mean, centres, bases


def generate_chunk(start: int, count: int, params: tuple[np.ndarray, ...], *, seed: int,
                   weights: tuple[float, float, float, float]) -> np.ndarray:
  """Rows [start, start+count) as unit-norm float32; depends only on (start, seed, params)."""
  mean, centres, bases = params
  g, a, b, s = weights
  num_clusters, rank, dim = bases.shape
  rng = np.random.default_rng([seed, 1, start])
  labels = rng.integers(0, num_clusters, count)
  z = rng.standard_normal((count, rank), dtype=np.float32)
  x = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(s / np.sqrt(dim))
  x += g * mean + a * centres[labels]
  _add_low_rank(x, labels, z, bases, b / np.sqrt(rank))
  return _unit(x)


def write_clustered(directory: str, n: int, dim: int = 1024, *, num_clusters: int = 1000,
                    rank: int = 16, seed: int = 0, shard_size: int = 65536,
                    weights: tuple[float, float, float, float] = (0.3, 0.65, 0.6, 0.4),
                    dtype: str = 'float16', log=print) -> dict:
  """Writes n clustered embeddings as shards + manifest into `directory`; resumable."""
  params = cluster_params(num_clusters, dim, rank, seed)
  return _write(directory, n, dim,
                f'synthetic-clustered-n{n}-d{dim}-c{num_clusters}-r{rank}-seed{seed}',
                {'kind': 'clustered', 'num_clusters': num_clusters, 'rank': rank, 'seed': seed,
                 'weights': list(weights)},
                lambda start, count: generate_chunk(start, count, params, seed=seed,
                                                    weights=weights),
                shard_size=shard_size, dtype=dtype, log=log)


# ---------------------------------------------------------------------------------------------
# realistic
@dataclasses.dataclass(frozen=True)
class Realistic:
  """Knobs of the realistic generator (see the module docstring); defaults are calibrated."""
  num_classes: int = 1000
  zipf: float = 1.0             # class share ~ (size rank)^-zipf
  classes_per_superclass: int = 20  # class centres cluster around num_classes / this centres
  superclass_weight: float = 0.95  # a class centre = normalise(w*superclass + sqrt(1-w^2)*own)
  points_per_mode: int = 300    # one sub-mode per this many expected images of a class
  borrowed_modes: float = 0.2   # share of sub-modes centred on another class of the superclass
  rank: int = 8                 # intrinsic dimension of a sub-mode's variation
  mean_weight: float = 0.35     # g: the direction every image shares
  class_weight: float = 0.45    # a: the class centre
  mode_weight: float = 0.35     # the sub-mode centre
  spread_weight: float = 1.0    # b: low-rank variation within a sub-mode
  noise_weight: float = 0.6     # s: isotropic noise
  duplicate_rate: float = 0.02  # share of images that are a near-copy of another image
  duplicate_noise: float = 0.15  # isotropic noise of a copy (relative to a unit row)
  outlier_rate: float = 0.01    # share of images with no class structure


@dataclasses.dataclass(frozen=True)
class RealisticParams:
  mean: np.ndarray          # [d]
  class_centres: np.ndarray  # [C, d]
  class_probs: np.ndarray   # [C]
  mode_start: np.ndarray    # [C]: first sub-mode of each class
  mode_count: np.ndarray    # [C]
  mode_home: np.ndarray     # [M]: the class whose centre a sub-mode sits around
  mode_centres: np.ndarray  # [M, d]
  mode_bases: np.ndarray    # [M, r, d]


def realistic_params(n: int, dim: int, knobs: Realistic, seed: int) -> RealisticParams:
  rng = np.random.default_rng([seed, 0])
  c, d = knobs.num_classes, dim
  mean = _unit(rng.standard_normal(d).astype(np.float32))
  num_supers = max(1, round(c / knobs.classes_per_superclass))
  supers = _unit(rng.standard_normal((num_supers, d)).astype(np.float32))
  w = knobs.superclass_weight
  own = _unit(rng.standard_normal((c, d)).astype(np.float32))
  super_of = rng.integers(0, num_supers, c)
  class_centres = _unit(w * supers[super_of] + np.sqrt(1 - w * w) * own)
  # Zipf shares assigned to classes in a random order, so class id says nothing about size.
  probs = (1.0 + rng.permutation(c)) ** -knobs.zipf
  probs /= probs.sum()
  mode_count = np.maximum(1, np.round(n * probs / knobs.points_per_mode)).astype(np.int64)
  mode_start = np.concatenate([[0], np.cumsum(mode_count)[:-1]])
  m = int(mode_count.sum())
  mode_class = np.repeat(np.arange(c), mode_count)
  # A sub-mode centre keeps most of its class direction, weighted as the classes are.
  mode_centres = _unit(w * class_centres[mode_class]
                       + np.sqrt(1 - w * w) * rng.standard_normal((m, d)).astype(np.float32))
  bases = (rng.standard_normal((m, knobs.rank, d)) / np.sqrt(d)).astype(np.float32)
  # Overlapping classes: a borrowed sub-mode of class A coincides with a sub-mode of another
  # class B of A's superclass (same centre and spread), so images of A and B mix there.
  home = mode_class.copy()
  for i in np.flatnonzero(rng.random(m) < knobs.borrowed_modes):
    b = rng.choice(np.flatnonzero(super_of == super_of[mode_class[i]]))
    j = mode_start[b] + rng.integers(mode_count[b])
    if j != i:
      home[i], mode_centres[i], bases[i] = home[j], mode_centres[j], bases[j]
  return RealisticParams(mean, class_centres, probs, mode_start, mode_count, home, mode_centres,
                         bases)


def generate_realistic_chunk(start: int, count: int, p: RealisticParams, knobs: Realistic, *,
                             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(unit rows float32 [count, d], class labels [count]) of rows [start, start+count)."""
  k = knobs
  rng = np.random.default_rng([seed, 1, start])
  d = p.mean.shape[0]
  labels = rng.choice(len(p.class_probs), size=count, p=p.class_probs)
  modes = p.mode_start[labels] + (rng.random(count) * p.mode_count[labels]).astype(np.int64)
  x = rng.standard_normal((count, d), dtype=np.float32) * np.float32(k.noise_weight / np.sqrt(d))
  x += k.mean_weight * p.mean + k.class_weight * p.class_centres[p.mode_home[modes]]
  x += k.mode_weight * p.mode_centres[modes]
  z = rng.standard_normal((count, k.rank), dtype=np.float32)
  _add_low_rank(x, modes, z, p.mode_bases, k.spread_weight / np.sqrt(k.rank))
  x = _unit(x)
  # Outliers: the shared direction and noise only (their neighbours are far and arbitrary).
  out = rng.random(count) < k.outlier_rate
  x[out] = _unit(k.mean_weight * p.mean + rng.standard_normal(
      (int(out.sum()), d), dtype=np.float32) / np.sqrt(d))
  # Near-duplicates: row i becomes a noisy copy of an earlier row j of the same chunk.
  dup = np.flatnonzero(rng.random(count) < k.duplicate_rate)
  dup = dup[dup > 0]
  src = (rng.random(len(dup)) * dup).astype(np.int64)
  x[dup] = _unit(x[src] + rng.standard_normal((len(dup), d), dtype=np.float32)
                 * np.float32(k.duplicate_noise / np.sqrt(d)))
  labels[dup] = labels[src]
  return x, labels


def write_realistic(directory: str, n: int, dim: int = 1024, *, knobs: Realistic | None = None,
                    seed: int = 0, shard_size: int = 65536, dtype: str = 'float16',
                    log=print) -> dict:
  """Writes n realistic embeddings as shards + manifest into `directory`; resumable."""
  knobs = knobs or Realistic(num_classes=max(2, round(n / 1281)))
  params = realistic_params(n, dim, knobs, seed)
  return _write(directory, n, dim,
                f'synthetic-realistic-n{n}-d{dim}-c{knobs.num_classes}-seed{seed}',
                dict(dataclasses.asdict(knobs), kind='realistic', seed=seed),
                lambda start, count: generate_realistic_chunk(start, count, params, knobs,
                                                              seed=seed)[0],
                shard_size=shard_size, dtype=dtype, log=log)


# name -> (directory, n, dim, groups, seed, log): `groups` is the number of clusters or classes.
GENERATORS: dict[str, Callable[..., dict]] = {
    'clustered': lambda directory, n, dim, groups, seed, log=print: write_clustered(
        directory, n, dim, num_clusters=groups, seed=seed, log=log),
    'realistic': lambda directory, n, dim, groups, seed, log=print: write_realistic(
        directory, n, dim, knobs=Realistic(num_classes=groups), seed=seed, log=log),
}


# ---------------------------------------------------------------------------------------------
def _write(directory: str, n: int, dim: int, dataset: str, source: dict,
           chunk: Callable[[int, int], np.ndarray], *, shard_size: int, dtype: str,
           log) -> dict:
  """Shards + manifest of `chunk(start, count)` rows; finished shards are kept (resumable)."""
  manifest = embedding_store.plan_manifest(
      dataset=dataset, encoder='synthetic', n=n, dim=dim, shard_size=shard_size, dtype=dtype,
      ids='row index of the generator (groupdiff_jax.retrieval.synthetic)', source=source)
  try:
    old = embedding_store.read_manifest(directory)
    if old['dataset'] != manifest['dataset'] or old['shards'] != manifest['shards'] \
        or old.get('source') != source:
      raise ValueError(f'{directory} holds other embeddings ({old["dataset"]})')
  except embedding_store.InputError:
    pass
  embedding_store.write_manifest(directory, manifest)
  for i, shard in enumerate(manifest['shards']):
    if embedding_store.shard_done(directory, shard, dim):
      continue
    embedding_store.write_shard(directory, shard, chunk(shard['start'], shard['count']), dtype)
    if log and (i + 1) % 5 == 0:
      log(f'synthetic: {i + 1}/{len(manifest["shards"])} shards written')
  return manifest
