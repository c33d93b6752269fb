"""Writes a batch of images in [-1, 1] as one PNG grid."""
import math

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 with rounding (the DiT/SiT convention)."""
  return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, *, columns: int | None = None, scale: int = 1) -> None:
  """images: [N, H, W, C] in [-1, 1] with C in (1, 3); a 2-pixel border separates tiles."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  pixels = to_uint8(images)
  n, h, w, c = pixels.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  pad = 2
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
  image = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  image.save(path)
