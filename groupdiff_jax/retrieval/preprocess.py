"""An encoder's own image preprocessing, split into a host part (PIL) and a device part (jnp).

Host: convert to RGB, resize the shortest edge to `resize` with PIL bicubic (new long edge =
int(resize * long / short)), centre-crop `crop` x `crop` (top/left = (size - crop) // 2) -- the
steps and rounding of Hugging Face's BitImageProcessor (DINOv2) and CLIPImageProcessor, so
embeddings match those of the reference pipeline. Device: (x / 255 - mean) / std in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from groupdiff_jax.models.encoders import Preprocess


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
  """RGB PIL image from PIL or a uint8 array [H, W], [H, W, 1|3|4]."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f'image arrays must be uint8, got {image.dtype}')
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    image = Image.fromarray(image)
  return image if image.mode == 'RGB' else image.convert('RGB')


def resize_and_crop(image: Image.Image | np.ndarray, spec: Preprocess) -> np.ndarray:
  """uint8 [crop, crop, 3]."""
  image = to_pil(image)
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_short, new_long = spec.resize, int(spec.resize * long / short)
  size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL wants (w, h)
  if size != (w, h):
    image = image.resize(size, Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - spec.crop) // 2, (arr.shape[1] - spec.crop) // 2
  if top < 0 or left < 0:
    raise ValueError(f'image {arr.shape[:2]} smaller than the crop {spec.crop} after resizing')
  return arr[top:top + spec.crop, left:left + spec.crop]


def normalise(images: jax.Array, spec: Preprocess) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 model input."""
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std
