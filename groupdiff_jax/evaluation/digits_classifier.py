"""A small Flax CNN on the embedded digits: the feature space for judging digit samples.

Inception features mean nothing on 16x16 grey digits, so samples of the demo are judged the way
FID judges ImageNet samples, in the feature space of a classifier trained on the same data:
  * class accuracy: does the classifier read the class the sample was generated for;
  * Fréchet distance between Gaussians fitted to its penultimate features (64-d) of the samples
    and of the real digits.

The classifier trains in seconds on CPU on a stratified 80/20 split of `load_digits` (at the
demo's image size, the same [-1, 1] scaling as `data.digits`), with small random shifts as
augmentation; its held-out accuracy is recorded next to its weights.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from groupdiff_jax.evaluation import metrics

FEATURES = 64
NUM_CLASSES = 10


class DigitsCNN(nnx.Module):
  """conv32 -> conv64/2 -> conv64/2 -> global mean -> dense 64 (features) -> dense 10."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
    self.dense = nnx.Linear(64, FEATURES, rngs=rngs)
    self.head = nnx.Linear(FEATURES, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """[N, S, S, 1] in [-1, 1] -> [N, 64]."""
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = jax.nn.relu(self.conv3(x))
    return jax.nn.relu(self.dense(x.mean(axis=(1, 2))))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x))


def digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as the demo trains on them: [N, S, S, 1] in [-1, 1], labels [N]."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  x = d.images.astype(np.float32)[..., None] / 8.0 - 1.0
  if image_size != 8:  # the same resize as data.digits.DigitsSource
    x = np.asarray(jax.image.resize(x, (len(x), image_size, image_size, 1), 'linear'))
  return np.clip(x, -1.0, 1.0).astype(np.float32), d.target.astype(np.int32)


def split(labels: np.ndarray, held_out: float = 0.2, seed: int = 0):
  """Stratified (train indices, held-out indices)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cut = int(round(len(idx) * held_out))
    test.append(idx[:cut])
    train.append(idx[cut:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _shift(rng: np.random.Generator, x: np.ndarray, max_shift: int) -> np.ndarray:
  """Random translations by up to max_shift pixels, background (-1) filled."""
  n, s = x.shape[0], x.shape[1]
  padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
  return np.stack([padded[i, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(n)])


@dataclasses.dataclass
class Classifier:
  model: DigitsCNN
  image_size: int
  held_out_accuracy: float
  # Statistics of the real digits' features (all 1,797), the Fréchet distance's reference.
  ref_mu: np.ndarray
  ref_sigma: np.ndarray

  def features(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(_features(self.model, jnp.asarray(images, jnp.float32)))

  def predict(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(_logits(self.model, jnp.asarray(images, jnp.float32))).argmax(-1)


@nnx.jit
def _features(model, x):
  return model.features(x)


@nnx.jit
def _logits(model, x):
  return model(x)


def train(image_size: int = 16, *, seed: int = 0, epochs: int = 60, batch: int = 64,
          lr: float = 2e-3) -> Classifier:
  """Trains on 80% of the digits; the held-out 20% give the accuracy."""
  images, labels = digits(image_size)
  train_idx, test_idx = split(labels, seed=seed)
  graphdef, params = nnx.split(DigitsCNN(rngs=nnx.Rngs(seed)), nnx.Param)
  steps = epochs * (len(train_idx) // batch)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)

  @jax.jit  # a pure function of split state: nnx.jit costs ~20x more per call
  def step(params, opt_state, x, y):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(train_idx)
    for start in range(0, len(order) - batch + 1, batch):
      idx = order[start:start + batch]
      params, opt_state = step(params, opt_state, jnp.asarray(_shift(rng, images[idx], 1)),
                               jnp.asarray(labels[idx]))
  model = nnx.merge(graphdef, params)
  accuracy = float((np.asarray(_logits(model, jnp.asarray(images[test_idx]))).argmax(-1)
                    == labels[test_idx]).mean())
  mu, sigma = metrics.statistics(np.asarray(_features(model, jnp.asarray(images))))
  return Classifier(model, image_size, accuracy, mu, sigma)


def score(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Class accuracy of `images` ([N, S, S, 1] in [-1, 1]) for the classes they were generated
  for, and the Fréchet distance of their features to the real digits'."""
  if images.shape[1:] != (classifier.image_size, classifier.image_size, 1):
    raise ValueError(f'images {images.shape[1:]} do not match the classifier '
                     f'({classifier.image_size}x{classifier.image_size}x1)')
  mu, sigma = metrics.statistics(classifier.features(images))
  return {'class_accuracy': float((classifier.predict(images) == np.asarray(labels)).mean()),
          'frechet_distance': metrics.frechet_distance(mu, sigma, classifier.ref_mu,
                                                       classifier.ref_sigma)}


def save(classifier: Classifier, directory: str) -> None:
  """weights.npz (flat parameter paths) + info.json (image size, held-out accuracy), atomically."""
  os.makedirs(directory, exist_ok=True)
  flat = {'/'.join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(classifier.model, nnx.Param))}
  tmp = os.path.join(directory, f'.weights.tmp-{os.getpid()}.npz')
  np.savez(tmp, ref_mu=classifier.ref_mu, ref_sigma=classifier.ref_sigma, **flat)
  os.replace(tmp, os.path.join(directory, 'weights.npz'))
  info = {'image_size': classifier.image_size,
          'held_out_accuracy': classifier.held_out_accuracy}
  tmp = os.path.join(directory, f'.info.tmp-{os.getpid()}.json')
  with open(tmp, 'w') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(directory, 'info.json'))


def load(directory: str) -> Classifier:
  with open(os.path.join(directory, 'info.json')) as f:
    info = json.load(f)
  model = DigitsCNN(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  with np.load(os.path.join(directory, 'weights.npz')) as data:
    flat = [(path, v.replace(jnp.asarray(data['/'.join(map(str, path))])))
            for path, v in nnx.to_flat_state(state)]
    mu, sigma = data['ref_mu'], data['ref_sigma']
  return Classifier(nnx.merge(graphdef, nnx.from_flat_state(flat)), info['image_size'],
                    info['held_out_accuracy'], mu, sigma)


def load_or_train(directory: str, image_size: int, *, seed: int = 0) -> Classifier:
  """The classifier saved in `directory` for this image size, else trained (~30 s on CPU) and
  saved there: what a demo run calls to report its samples' accuracy and distance."""
  info = os.path.join(directory, 'info.json')
  if os.path.isfile(info):
    with open(info) as f:
      if json.load(f).get('image_size') == image_size:
        return load(directory)
  classifier = train(image_size, seed=seed)
  save(classifier, directory)
  return classifier
