"""Side-by-side dot plots (one panel per metric, one column per arm: every run a dot, the mean a
bar, +-1 std a whisker) as a PNG, with PIL alone (no matplotlib needed)."""
import os

import numpy as np

# Colour per column (colour-blind safe: Okabe-Ito).
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0)]


def save(path: str, panels: list[tuple[str, dict[str, list[float]]]], *, title: str,
         panel_size: tuple[int, int] = (300, 260)) -> None:
  """panels: (metric title, {column label: values}); columns keep their order. Atomic write."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  pw, ph = panel_size
  left, top, bottom, gap = 56, 44, 56, 24
  width = len(panels) * (left + pw) + gap
  image = Image.new('RGB', (width, top + ph + bottom), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((left, 8), title, fill='black')
  for p, (name, columns) in enumerate(panels):
    x0, y0 = p * (left + pw) + left, top
    values = np.concatenate([np.asarray(v, np.float64) for v in columns.values()])
    lo, hi = float(values.min()), float(values.max())
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    lo, hi = lo - pad, hi + pad
    y_of = lambda v: y0 + ph - (v - lo) / (hi - lo) * ph  # noqa: E731
    draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline='black')
    draw.text((x0, y0 - 16), name, fill='black')
    for tick in np.linspace(lo + pad, hi - pad, 4):
      y = y_of(tick)
      draw.line((x0 - 4, y, x0, y), fill='black')
      draw.text((x0 - left + 2, y - 6), f'{tick:.3g}', fill='black')
    step = pw / len(columns)
    for c, (label, vals) in enumerate(columns.items()):
      colour = PALETTE[c % len(PALETTE)]
      cx = x0 + step * (c + 0.5)
      vals = np.asarray(vals, np.float64)
      mean = vals.mean()
      std = vals.std(ddof=1) if len(vals) > 1 else 0.0
      draw.line((cx, y_of(mean - std), cx, y_of(mean + std)), fill=colour, width=2)
      draw.line((cx - 18, y_of(mean), cx + 18, y_of(mean)), fill=colour, width=3)
      for k, v in enumerate(vals):  # spread the dots sideways so equal values stay visible
        dx = (k - (len(vals) - 1) / 2) * 7
        draw.ellipse((cx + dx - 3, y_of(v) - 3, cx + dx + 3, y_of(v) + 3), fill=colour)
      for line, text in enumerate(label.split('_')):
        draw.text((cx - 3 * len(text), y0 + ph + 6 + 12 * line), text, fill=colour)
  tmp = f'{path}.tmp-{os.getpid()}.png'
  image.save(tmp)
  os.replace(tmp, path)
