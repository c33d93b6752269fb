"""Samples `.npz` + reference -> FID, sFID, IS, precision, recall (the ADM evaluator's protocol).

The reference is an `.npz` of images (`arr_0`), precomputed statistics (`mu`/`sigma`, and
`mu_s`/`sigma_s` for sFID, the ADM reference batches' layout), or both, as the ADM reference
batches are: statistics found in the file are used for FID/sFID, its images for precision/recall.
Everything the user gave is checked before any feature is computed.
"""
import dataclasses
import json
import os

import numpy as np

from groupdiff_jax import progress
from groupdiff_jax.cli import UserError
from groupdiff_jax.evaluation import npz_images

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_NAME)
POOL_DIMS, SPATIAL_DIMS = 2048, 17 * 17 * 7  # the Inception's pool_3 and mixed_6/conv[..., :7]
# (key in the result, label in the table, format)
TABLE = (('fid', 'FID', '{:.4f}'), ('sfid', 'sFID', '{:.4f}'),
         ('inception_score', 'Inception Score', '{:.3f}'), ('precision', 'Precision', '{:.4f}'),
         ('recall', 'Recall', '{:.4f}'))


@dataclasses.dataclass
class Inputs:
  samples: npz_images.ImageSource
  ref_images: npz_images.ImageSource | None
  ref_stats: dict[str, np.ndarray] | None
  weights: str


def check_inputs(samples: str, ref: str, weights: str | None,
                 feature_dims: tuple[int, int] = (POOL_DIMS, SPATIAL_DIMS)) -> Inputs:
  """Opens and validates every input; raises UserError naming the first problem.
  feature_dims: the (pool, spatial) sizes reference statistics must have."""
  source = npz_images.ImageSource(samples)
  if len(source) < 2:
    raise UserError(f'{samples}: {len(source)} image; FID needs at least 2 (50,000 is standard)')
  ref_files = npz_images.list_files(ref)
  ref_stats = npz_images.read_statistics(ref)
  has_images = any(npz_images.has_images(f) for f in ref_files)
  if ref_stats is None and not has_images:
    raise UserError(f'{ref}: neither reference images (arr_0) nor statistics (mu, sigma)')
  for key, dims in zip(('mu', 'mu_s'), feature_dims):
    if ref_stats and key in ref_stats and ref_stats[key].shape != (dims,):
      raise UserError(f'{ref}: {key} has shape {ref_stats[key].shape}; the FID Inception gives '
                      f'{dims} features (is it statistics of another network?)')
  ref_images = npz_images.ImageSource(ref) if has_images else None
  if not weights:
    raise UserError(f'--inception_weights is required: the FID Inception weights {WEIGHTS_NAME} '
                    f'(pytorch-fid; {WEIGHTS_URL})')
  if not os.path.isfile(weights):
    raise UserError(f'--inception_weights={weights}: no such file (get {WEIGHTS_NAME} from '
                    f'{WEIGHTS_URL})')
  return Inputs(source, ref_images, ref_stats, weights)


def compute(inputs: Inputs, *, protocol: str = 'adm', batch_size: int = 256,
            extractor=None) -> dict:
  """The metrics as a dict (None where the reference lacks what a metric needs)."""
  # Heavy imports here: checking inputs (above) needs neither jax nor the network.
  from groupdiff_jax.evaluation import features, inception, metrics  # pylint: disable=import-outside-toplevel
  if extractor is None:
    extractor = features.FeatureExtractor(inception.load(inputs.weights), protocol=protocol,
                                          batch_size=batch_size)
  bs = extractor.batch_size
  sample_feats = extractor.run(inputs.samples.batches(bs), len(inputs.samples), 'samples')
  ref_feats = None
  if inputs.ref_images is not None:
    ref_feats = extractor.run(inputs.ref_images.batches(bs), len(inputs.ref_images), 'reference')

  stats = inputs.ref_stats or {}
  result = {'num_samples': len(inputs.samples), 'protocol': protocol,
            'num_reference': len(inputs.ref_images) if inputs.ref_images else None}
  for name, feature, mu_key, sigma_key in (('fid', 'pool', 'mu', 'sigma'),
                                           ('sfid', 'spatial', 'mu_s', 'sigma_s')):
    if mu_key in stats and sigma_key in stats:
      ref_mu, ref_sigma = stats[mu_key], stats[sigma_key]
    elif ref_feats is not None:
      ref_mu, ref_sigma = metrics.statistics(ref_feats[feature])
    else:
      result[name] = None
      continue
    mu, sigma = metrics.statistics(sample_feats[feature])
    if ref_mu.shape != mu.shape:
      raise UserError(f'reference {mu_key} has {ref_mu.shape[0]} dimensions; the Inception '
                      f'{feature} features have {mu.shape[0]}')
    result[name] = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)
  result['inception_score'] = metrics.inception_score(sample_feats['logits_unbiased'])
  if ref_feats is not None:
    progress.say('precision/recall: k-NN manifolds (k=3)')
    result['precision'], result['recall'] = metrics.precision_recall(ref_feats['pool'],
                                                                     sample_feats['pool'])
  else:
    result['precision'] = result['recall'] = None
  return result


def table(result: dict) -> str:
  rows = [(label, fmt.format(result[key]) if result.get(key) is not None else 'n/a')
          for key, label, fmt in TABLE]
  width = max(len(label) for label, _ in rows)
  lines = [f'{label:<{width}}  {value}' for label, value in rows]
  if result.get('precision') is None:
    lines.append('(precision/recall need reference images, not only statistics)')
  return '\n'.join(lines)


def write_json(path: str, result: dict) -> None:
  """Atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def default_output(samples: str) -> str:
  if os.path.isdir(samples):
    return os.path.join(samples, 'metrics.json')
  return os.path.splitext(samples)[0] + '_metrics.json'
