"""A labelled PNG heat map (rows x columns of values) with PIL alone (no matplotlib needed)."""
import os

import numpy as np

# Viridis at five stops, linearly interpolated: perceptually ordered, readable in grey.
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                  np.float64)


def colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """values -> uint8 RGB [..., 3]; NaN -> grey."""
  span = high - low if high > low else 1.0
  pos = np.clip((np.nan_to_num(values, nan=low) - low) / span, 0, 1) * (len(_STOPS) - 1)
  i = np.minimum(np.floor(pos).astype(int), len(_STOPS) - 2)
  frac = (pos - i)[..., None]
  rgb = _STOPS[i] * (1 - frac) + _STOPS[i + 1] * frac
  rgb[np.isnan(values)] = 128
  return rgb.round().astype(np.uint8)


def save(path: str, values: np.ndarray, *, row_labels: list[str], col_labels: list[str],
         title: str, cell: tuple[int, int] = (28, 14)) -> None:
  """values [rows, cols]; the first row at the top. Written atomically."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  rows, cols = values.shape
  cw, ch = cell
  left, top, right, bottom = 44, 40, 80, 10
  width, height = left + cols * cw + right, top + rows * ch + bottom
  finite = values[np.isfinite(values)]
  low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  image = Image.new('RGB', (width, height), 'white')
  grid = np.repeat(np.repeat(colours(values, low, high), ch, 0), cw, 1)
  image.paste(Image.fromarray(grid), (left, top))
  draw = ImageDraw.Draw(image)
  draw.text((left, 4), title, fill='black')
  for c, label in enumerate(col_labels):
    if c % max(1, cols // 10) == 0:  # at most ~10 column labels
      draw.text((left + c * cw + 2, top - 14), label, fill='black')
  for r, label in enumerate(row_labels):
    if r % max(1, rows // 28) == 0:
      draw.text((4, top + r * ch + 1), label, fill='black')
  # Colour bar with its range.
  bar_x, bar_h = left + cols * cw + 10, rows * ch
  ramp = colours(np.linspace(high, low, bar_h)[:, None], low, high)
  image.paste(Image.fromarray(np.repeat(ramp, 12, 1)), (bar_x, top))
  draw.text((bar_x + 16, top), f'{high:.3f}', fill='black')
  draw.text((bar_x + 16, top + bar_h - 10), f'{low:.3f}', fill='black')
  tmp = f'{path}.tmp-{os.getpid()}.png'
  image.save(tmp)
  os.replace(tmp, path)
