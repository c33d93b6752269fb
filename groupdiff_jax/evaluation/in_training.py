"""In-training evaluation: every `config.eval.every_steps`, sample with the EMA weights and score.

What one evaluation does (the training loop excludes its time from throughput):
  1. samples `eval.num_samples` images with the run's sampler settings (`config.sample`) in
     fixed-size batches of whole class groups, the batch sharded over the devices like a train
     batch; the same noise at every evaluation, so successive values differ by the weights only;
  2. scores them against a reference (`eval.reference`, a registry):
       digits     the digits classifier's feature space (evaluation/digits_classifier.py):
                  `eval/digits_fd` (Fréchet distance to the statistics of all real digits) and
                  `eval/digits_accuracy` (the class the sample was generated for is read back);
       inception  FID against ADM-style reference statistics (`eval.ref_stats`: an .npz with
                  mu/sigma of pool features), with the FID Inception (`eval.inception_weights`);
                  latent models decode with `eval.vae` first: `eval/fid`;
  3. measures S_cross (evaluation/s_cross.py) on `eval.s_cross_groups` unconditional groups of
     `sample.uncond_group_size` noise images along `eval.s_cross_steps` Euler steps: its mean
     over layers and steps, `eval/s_cross` (flow models only, not DDPM objectives).
"""
import dataclasses
import os
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from groupdiff_jax import generate, image_grid, progress
from groupdiff_jax.cli import UserError
from groupdiff_jax.diffusion import registry
from groupdiff_jax.evaluation import metrics, npz_images, s_cross
from groupdiff_jax.models import group_attention
from groupdiff_jax.sampling import job
from groupdiff_jax.train_step import Trainer


class Reference(Protocol):
  def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """images: model outputs [N, H, W, C] (pixels in [-1, 1] or latents) -> named scalars."""


class DigitsReference:
  """The digits classifier (trained once, ~20 s, and cached in `directory`)."""

  def __init__(self, directory: str, image_size: int):
    # pylint: disable-next=import-outside-toplevel
    from groupdiff_jax.evaluation import digits_classifier
    self._lib = digits_classifier
    t0 = time.perf_counter()
    self.classifier = digits_classifier.load_or_train(directory, image_size)
    progress.say(f'eval: digits classifier (held-out accuracy '
                 f'{self.classifier.held_out_accuracy:.3f}) in {directory}, ready in '
                 f'{progress.duration(time.perf_counter() - t0)}')

  def score(self, images, labels):
    r = self._lib.score(self.classifier, np.clip(images, -1.0, 1.0), labels)
    return {'digits_fd': r['frechet_distance'], 'digits_accuracy': r['class_accuracy']}


class InceptionReference:
  """FID of pool features against precomputed statistics (the ADM reference batch layout)."""

  def __init__(self, ref_stats: str, model, *, decode: Callable[[np.ndarray], np.ndarray],
               batch_size: int = 256):
    from groupdiff_jax.evaluation import features  # pylint: disable=import-outside-toplevel
    stats = read_ref_stats(ref_stats)
    self.mu, self.sigma = stats['mu'], stats['sigma']
    self.decode = decode
    self.extractor = features.FeatureExtractor(model, protocol='adm', batch_size=batch_size)

  def score(self, images, labels):
    del labels
    pixels = image_grid.to_uint8(self.decode(images))
    if pixels.shape[-1] == 1:  # grey images: the Inception reads RGB
      pixels = np.repeat(pixels, 3, axis=-1)
    mu, sigma = metrics.statistics(self.extractor(pixels)['pool'])
    return {'fid': metrics.frechet_distance(mu, sigma, self.mu, self.sigma)}


def read_ref_stats(path: str) -> dict[str, np.ndarray]:
  if not path or not os.path.isfile(path):
    raise UserError(f'--config.eval.ref_stats={path!r}: no such file; in-training FID needs '
                    'reference statistics (an .npz with mu/sigma of Inception pool features, '
                    'e.g. the ADM reference batch VIRTUAL_imagenet256_labeled.npz)')
  stats = npz_images.read_statistics(path)
  if stats is None or stats['mu'].shape != (2048,):
    raise UserError(f'--config.eval.ref_stats={path}: needs mu [2048] and sigma [2048, 2048] '
                    '(Inception pool statistics)')
  return stats


def _digits(config, trainer: Trainer, workdir: str) -> Reference:
  cfg = trainer.model_cfg
  if cfg.in_channels != 1 or config.data.source != 'digits':
    raise UserError('--config.eval.reference=digits judges 1-channel digit samples; this run '
                    f'trains on {config.data.source!r} with {cfg.in_channels} channels')
  directory = config.eval.classifier_dir or os.path.join(workdir, 'digits_classifier')
  return DigitsReference(directory, cfg.input_size)


def _inception(config, trainer: Trainer, workdir: str) -> Reference:
  del workdir
  from groupdiff_jax.evaluation import inception  # pylint: disable=import-outside-toplevel
  e = config.eval
  if not e.inception_weights or not os.path.isfile(e.inception_weights):
    raise UserError(f'--config.eval.inception_weights={e.inception_weights!r}: no such file (the '
                    'FID Inception weights, pt_inception-2015-12-05-6726825d.pth; '
                    'docs/evaluation.md)')
  if trainer.model_cfg.in_channels not in (1, 3) and not e.vae:
    raise UserError(f'{trainer.model_cfg.in_channels}-channel latents need a decoder for FID: '
                    'pass --config.eval.vae=DIR (a diffusers AutoencoderKL directory)')
  decode = lambda x: np.asarray(x)  # noqa: E731  # pixel-space models
  if e.vae:
    from groupdiff_jax.models import vae  # pylint: disable=import-outside-toplevel
    decoder = vae.load(e.vae, mesh=jax.sharding.Mesh(trainer.mesh.devices.reshape(-1), ('batch',)))
    decode = lambda x: np.asarray(decoder.decode(x))  # noqa: E731
  return InceptionReference(e.ref_stats, inception.load(e.inception_weights), decode=decode,
                            batch_size=e.batch_size)


REFERENCES: dict[str, Callable[..., Reference]] = {'digits': _digits, 'inception': _inception}


def check(config: ml_collections.ConfigDict) -> None:
  """Settings that need no model, checked before any work."""
  e = config.eval
  if e.every_steps < 0:
    raise UserError(f'--config.eval.every_steps={e.every_steps} must be >= 0 (0 = off)')
  if not e.every_steps:
    return
  if e.reference not in REFERENCES:
    raise UserError(f'--config.eval.reference={e.reference!r}: unknown; known: '
                    f'{", ".join(REFERENCES)}')
  if e.num_samples < 2 or e.batch_size < 1:
    raise UserError('--config.eval.num_samples must be >= 2 and --config.eval.batch_size >= 1')
  if e.reference == 'inception':
    read_ref_stats(e.ref_stats)


def batch_size(requested: int, group: int, shards: int, num_samples: int) -> int:
  """Images per sampling call: whole groups, a multiple of the batch shards, no more than
  needed for num_samples."""
  return job.batch_for(min(requested, num_samples), group, shards)


@dataclasses.dataclass
class Evaluator:
  trainer: Trainer
  sample_cfg: ml_collections.ConfigDict
  reference: Reference
  every_steps: int
  num_samples: int
  batch: int
  seed: int
  s_cross_groups: int
  s_cross_steps: int

  def __post_init__(self):
    self._generate = generate.make_generate_fn(self.trainer, self.sample_cfg)  # jitted once
    self.group = job.eval_group_size(self.sample_cfg)

  def due(self, step: int, last_step: int) -> bool:
    return step % self.every_steps == 0 or step == last_step

  def samples(self, params) -> tuple[np.ndarray, np.ndarray]:
    """num_samples images (rounded up to whole batches, then cut) and their classes; the class
    cycles per group, the noise is fixed by `seed`."""
    cfg, sh = self.trainer.model_cfg, self.trainer.batch_shardings
    key = jax.random.PRNGKey(self.seed)
    images, labels = [], []
    for i in range(-(-self.num_samples // self.batch)):
      k = jax.random.fold_in(key, i)
      noise = jax.random.normal(k, (self.batch, cfg.input_size, cfg.input_size, cfg.in_channels))
      y = generate.group_labels(self.batch, self.group, cfg.num_classes,
                                offset=i * self.batch // self.group)
      out = self._generate(params, jax.device_put(noise, sh['image']),
                           jax.device_put(jnp.asarray(y), sh['label']), jax.random.fold_in(k, 1))
      images.append(np.asarray(generate.gather(out)))
      labels.append(y)
    return (np.concatenate(images)[:self.num_samples],
            np.concatenate(labels)[:self.num_samples])

  def s_cross(self, params) -> float:
    """Mean S_cross of the unconditional branch (null labels), over layers and steps."""
    size = self.sample_cfg.uncond_group_size
    model = nnx.merge(self.trainer.graphdef, params)
    labels = np.full(size * self.s_cross_groups, self.trainer.model_cfg.num_classes)
    scores, _ = s_cross.measure(model, group_size=size, num_groups=self.s_cross_groups,
                                num_steps=self.s_cross_steps, labels=labels, seed=self.seed,
                                quiet=True)
    return float(scores.mean())

  def __call__(self, params) -> dict[str, float]:
    t0 = time.perf_counter()
    images, labels = self.samples(params)
    out = {f'eval/{k}': v for k, v in self.reference.score(images, labels).items()}
    # S_cross follows the flow ODE trajectory (s_cross.measure): flow models only.
    flow = self.trainer.objective.checkpoint_objective == registry.FLOW
    if flow and self.s_cross_groups and self.sample_cfg.uncond_group_size >= 2:
      out['eval/s_cross'] = self.s_cross(params)
    out['eval/seconds'] = time.perf_counter() - t0
    return out


def build(config: ml_collections.ConfigDict, trainer: Trainer, workdir: str) -> Evaluator | None:
  """The evaluator of a run, or None when `eval.every_steps` is 0. `check(config)` has run
  (train.py calls it before any work; it also validates the reference statistics file)."""
  e = config.eval
  if not e.every_steps:
    return None
  shards = group_attention.batch_shard_counts(trainer.mesh, trainer.rules)[0]
  group = job.eval_group_size(config.sample)
  reference = REFERENCES[e.reference](config, trainer, workdir)
  return Evaluator(trainer, config.sample, reference, e.every_steps, e.num_samples,
                   batch_size(e.batch_size, group, shards, e.num_samples), e.seed,
                   e.s_cross_groups, e.s_cross_steps)


def describe(step: int, result: dict[str, float], num_samples: int) -> str:
  """One line for the log: `eval step N (K samples): digits_fd 3.21 | ... | 12.3s`."""
  parts = [f'{k[len("eval/"):]} {v:.4g}' for k, v in result.items() if k != 'eval/seconds']
  return (f'eval step {step} ({num_samples} samples): ' + ' | '.join(parts)
          + f' | {progress.duration(result.get("eval/seconds", 0.0))}')
