"""diffusers AutoencoderKL weights <-> `groupdiff_jax.models.vae` parameters.

Our module tree mirrors diffusers' names, so a key maps by (1) renaming the attention projections
(older diffusers files, e.g. the sd-vae-ft-* safetensors, still say query/key/value/proj_attn),
(2) turning numeric components into list indices and (3) converting the leaf: conv weights
[O, I, kh, kw] -> kernels [kh, kw, I, O], linear weights [O, I] (or [O, I, 1, 1] in old files)
-> [I, O], GroupNorm weight -> scale. Loading is strict: every missing, unexpected or
mis-shaped key is listed in one error.
"""
import json
import os

import jax
import numpy as np
from flax import nnx

from groupdiff_jax.models import vae

WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
# Older diffusers attention names -> current ones (what our Attention module uses).
ATTENTION_RENAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out',
                     'to_out.0': 'to_out'}
SUPPORTED_BLOCKS = {'down_block_types': 'DownEncoderBlock2D', 'up_block_types': 'UpDecoderBlock2D'}


class VAEWeightsError(ValueError):
  pass


def _resolve(path: str) -> tuple[str, str]:
  """(config.json, weights file) from a diffusers model dir, a pipeline dir (vae/), or the file."""
  if os.path.isfile(path):
    folder, weights = os.path.dirname(path), path
  else:
    folder = path
    if not os.path.isfile(os.path.join(folder, 'config.json')) and os.path.isdir(
        os.path.join(folder, 'vae')):
      folder = os.path.join(folder, 'vae')
    weights = os.path.join(folder, WEIGHTS_FILE)
  config = os.path.join(folder, 'config.json')
  for f in (config, weights):
    if not os.path.isfile(f):
      raise VAEWeightsError(f'{path}: expected a diffusers AutoencoderKL directory with '
                            f'config.json and {WEIGHTS_FILE}; {f} is missing')
  return config, weights


def config_from_diffusers(raw: dict, dtype: str = 'float32') -> tuple[vae.VAEConfig, float]:
  """VAEConfig and scaling factor from a diffusers config.json dict; rejects other layouts."""
  problems = [f'{k}={raw.get(k)} (only {v} is supported)'
              for k, v in SUPPORTED_BLOCKS.items() if any(b != v for b in raw.get(k, [v]))]
  if raw.get('act_fn', 'silu') != 'silu':
    problems.append(f'act_fn={raw["act_fn"]} (only silu)')
  if raw.get('shift_factor') not in (None, 0, 0.0):
    problems.append(f'shift_factor={raw["shift_factor"]} (the SD-VAE has none)')
  chans = tuple(raw.get('block_out_channels', vae.VAEConfig.block_out_channels))
  if len(raw.get('down_block_types', chans)) != len(chans):
    problems.append('down_block_types and block_out_channels differ in length')
  if problems:
    raise VAEWeightsError('unsupported AutoencoderKL config: ' + '; '.join(problems))
  fields = {f: raw[f] for f in ('in_channels', 'out_channels', 'layers_per_block',
                                 'norm_num_groups', 'latent_channels', 'use_quant_conv',
                                 'use_post_quant_conv', 'mid_block_add_attention') if f in raw}
  cfg = vae.VAEConfig(block_out_channels=chans, dtype=dtype, **fields)
  return cfg, float(raw.get('scaling_factor') or vae.SCALE)


def _our_path(key: str) -> tuple[tuple, str]:
  for old, new in ATTENTION_RENAMES.items():
    key = key.replace(f'.{old}.', f'.{new}.')
  *mods, leaf = key.split('.')
  return tuple(int(m) if m.isdigit() else m for m in mods), leaf


def _lookup(tree: dict, path: tuple):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _to_ours(w: np.ndarray, target_ndim: int) -> np.ndarray:
  if target_ndim == 4:      # conv
    return w.transpose(2, 3, 1, 0)
  if target_ndim == 2:      # linear; old files store the attention projections as 1x1 convs
    return w.reshape(w.shape[0], w.shape[1]).T
  return w


def diffusers_to_params(sd: dict[str, np.ndarray], target: dict) -> dict:
  """Strictly maps a diffusers state dict onto `target` (our pure dict); returns the new dict."""
  out = jax.tree.map(lambda x: None, target)
  unexpected, bad = [], []
  for key, value in sd.items():
    path, leaf = _our_path(key)
    module = _lookup(target, path)
    name = {'weight': 'kernel' if isinstance(module, dict) and 'kernel' in module else 'scale',
            'bias': 'bias'}.get(leaf)
    if not isinstance(module, dict) or name not in module:
      unexpected.append(f'{key} {tuple(value.shape)}')
      continue
    want = module[name].shape
    got = _to_ours(np.asarray(value, np.float32), len(want))
    if got.shape != want:
      bad.append(f'{key} {tuple(value.shape)} (expected our {name} {tuple(want)})')
      continue
    _lookup(out, path)[name] = got
  missing = ['.'.join(map(str, p)) for p, v in _flat(out) if v is None]
  lines = [f'{label} ({len(items)}): ' + ', '.join(items[:40])
           for label, items in (('missing', missing), ('unexpected', unexpected),
                                ('wrong shapes', bad)) if items]
  if lines:
    raise VAEWeightsError('the weights do not fit the config:\n  ' + '\n  '.join(lines))
  return out


def _flat(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, prefix + (k,))
  else:
    yield prefix, tree


def params_to_diffusers(params: dict) -> dict[str, np.ndarray]:
  """Our pure dict -> diffusers (current) names and layouts."""
  sd = {}
  for path, value in _flat(params):
    *mods, name = path
    key = '.'.join(map(str, mods)).replace('.to_out', '.to_out.0')
    value = np.asarray(value)
    if name == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    sd[f'{key}.{"bias" if name == "bias" else "weight"}'] = np.ascontiguousarray(value)
  return sd


def _read_weights(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise VAEWeightsError(f'{path}: cannot read safetensors ({type(e).__name__}: {e})') from e


def load_diffusers(path: str, *, dtype: str = 'float32') -> tuple[vae.AutoencoderKL, float]:
  """(model with the loaded weights, scaling factor) from a diffusers AutoencoderKL directory."""
  config_file, weights_file = _resolve(path)
  with open(config_file) as f:
    cfg, scaling = config_from_diffusers(json.load(f), dtype)
  # Built abstractly: a random init would only be overwritten (and costs seconds per conv).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae.create(cfg)))
  params = diffusers_to_params(_read_weights(weights_file), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
  return nnx.merge(graphdef, state), scaling


def save_diffusers(model: vae.AutoencoderKL, directory: str,
                   scaling_factor: float = vae.SCALE) -> str:
  """Writes `model` as a diffusers AutoencoderKL directory (config.json + safetensors), the
  layout `load_diffusers` reads (used for random-weight VAEs in tests and benchmarks)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  cfg = model.cfg
  os.makedirs(directory, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  save_file(params_to_diffusers(params), os.path.join(directory, WEIGHTS_FILE))
  raw = {'_class_name': 'AutoencoderKL', 'in_channels': cfg.in_channels,
         'out_channels': cfg.out_channels, 'block_out_channels': list(cfg.block_out_channels),
         'layers_per_block': cfg.layers_per_block, 'norm_num_groups': cfg.norm_num_groups,
         'latent_channels': cfg.latent_channels, 'use_quant_conv': cfg.use_quant_conv,
         'use_post_quant_conv': cfg.use_post_quant_conv,
         'mid_block_add_attention': cfg.mid_block_add_attention, 'act_fn': 'silu',
         'scaling_factor': scaling_factor,
         'down_block_types': [SUPPORTED_BLOCKS['down_block_types']] * len(cfg.block_out_channels),
         'up_block_types': [SUPPORTED_BLOCKS['up_block_types']] * len(cfg.block_out_channels)}
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(raw, f, indent=1)
  return directory
