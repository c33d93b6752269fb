"""uint8 images -> the FID Inception's input: bilinear resize to 299x299, then scale to [-1, 1].

Two protocols, both of a bilinear resize *without* antialiasing:
  'adm'          the ADM evaluator (guided-diffusion `evaluations/evaluator.py`, the paper's
                 numbers): the TF graph's own `ResizeBilinear` (TensorFlow 1, align_corners=False,
                 half_pixel_centers=False: source = dst * in/out), then (x - 128) / 128.
  'pytorch_fid'  pytorch-fid: `F.interpolate(x / 255, 299, mode='bilinear', align_corners=False)`
                 (half-pixel centres: source = (dst + 0.5) * in/out - 0.5, clamped at 0), then
                 2 x - 1 (= x / 127.5 - 1).
The two differ by a fraction of a pixel in position and by 1/255 in scale, which moves FID
noticeably: compare numbers only within one protocol.

The resize is written as two small interpolation matrices (299 x H and 299 x W), applied as
matmuls: exact bilinear weights, and fast on any accelerator.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 299
PROTOCOLS = ('adm', 'pytorch_fid')


def _source_coords(n_in: int, n_out: int, protocol: str) -> np.ndarray:
  # In float64: the libraries' own float32 position arithmetic differs from this by < 2e-6 in
  # each weight (< 5e-4 of a grey level), far below what moves a metric.
  dst = np.arange(n_out, dtype=np.float64)
  scale = n_in / n_out
  if protocol == 'adm':
    return dst * scale
  return np.maximum((dst + 0.5) * scale - 0.5, 0.0)


@functools.lru_cache(maxsize=16)
def resize_matrix(n_in: int, n_out: int, protocol: str) -> np.ndarray:
  """[n_out, n_in] float32 weights of 1-D bilinear interpolation (each row sums to 1)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown preprocessing protocol {protocol!r}; known: {PROTOCOLS}')
  src = _source_coords(n_in, n_out, protocol)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  weights = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def scale(x: jax.Array, protocol: str) -> jax.Array:
  """[0, 255] floats -> the network's [-1, 1] range, as each protocol does it."""
  if protocol == 'adm':
    return (x - 128.0) / 128.0
  return x / 255.0 * 2.0 - 1.0


def preprocess(images: jax.Array, protocol: str = 'adm') -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in the Inception's input range."""
  _, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (SIZE, SIZE):
    rows = jnp.asarray(resize_matrix(h, SIZE, protocol))
    cols = jnp.asarray(resize_matrix(w, SIZE, protocol))
    x = jnp.einsum('oh,nhwc->nowc', rows, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum('pw,nowc->nopc', cols, x, precision=jax.lax.Precision.HIGHEST)
  return scale(x, protocol)
