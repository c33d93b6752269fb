"""Writes a batch of images in [-1, 1] as one PNG grid."""
import math

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 with rounding (the DiT/SiT convention)."""
  return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, *, columns: int | None = None, scale: int = 1,
              row_labels: list[str] | None = None) -> None:
  """images: [N, H, W, C] in [-1, 1] with C in (1, 3); a 2-pixel border separates tiles.
  row_labels: text drawn left of each row (the legend: what a row holds)."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
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
  if row_labels:  # a left margin with one label per row, drawn before the upscaling
    margin = 6 * max(len(t) for t in row_labels) + 4
    labelled = Image.new(image.mode, (image.width + margin, image.height), 0)
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    white = 255 if image.mode == 'L' else (255, 255, 255)
    for r, text in enumerate(row_labels[:rows]):
      draw.text((2, pad + r * (h + pad) + (h - 11) // 2), text, fill=white)
    image = labelled
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  image.save(path)
