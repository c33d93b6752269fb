"""Progress lines for long jobs: done/total, rate, ETA, at most one line every few seconds.

  progress = Progress('encode', total=len(todo), unit='images')
  for batch in batches:
    ...
    progress.update(len(batch))   # 'encode: 4096/50000 images (8.2%) | 85.3 images/s | ETA 8m58s'

The rate counts only the time spent inside the measured work: call `progress.pause()` /
`resume()` around anything that should not count (compilation, checkpoint writes).
"""
import sys
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m': a compact duration for progress lines and summaries."""
  seconds = int(max(seconds, 0))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def say(message: str) -> None:
  """One progress/status line on stdout, flushed (stderr is for problems)."""
  print(message, file=sys.stdout, flush=True)


class Progress:
  """Throttled 'label: done/total unit (pct) | rate | ETA' lines."""

  def __init__(self, label: str, total: int, *, unit: str = 'images', every_s: float = 10.0,
               log: Callable[[str], None] = say, clock: Callable[[], float] = time.perf_counter):
    self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
    self.log, self.clock = log, clock
    self.done = 0
    self._measured = 0.0                  # seconds of measured work before the current stretch
    self._since = clock()                 # start of the current stretch (None while paused)
    self._last_line = -float('inf')

  @property
  def seconds(self) -> float:
    return self._measured + (self.clock() - self._since if self._since is not None else 0.0)

  @property
  def rate(self) -> float:
    return self.done / max(self.seconds, 1e-9)

  def pause(self) -> None:
    if self._since is not None:
      self._measured += self.clock() - self._since
      self._since = None

  def resume(self) -> None:
    if self._since is None:
      self._since = self.clock()

  def line(self, extra: str = '') -> str:
    pct = f' ({100 * self.done / self.total:.1f}%)' if self.total else ''
    eta = duration((self.total - self.done) / self.rate) if self.done else '?'
    parts = [f'{self.label}: {self.done}/{self.total} {self.unit}{pct}',
             f'{self.rate:.1f} {self.unit}/s', f'ETA {eta}']
    return ' | '.join(parts + ([extra] if extra else []))

  def update(self, n: int, extra: str = '') -> None:
    """Counts n more units; prints a line when every_s passed since the last one, or at the end."""
    self.done += n
    now = self.clock()
    if now - self._last_line >= self.every_s or self.done >= self.total:
      self._last_line = now
      self.log(self.line(extra))


def cell(value, float_format: str = '.1f') -> str:
  """One value of a benchmark row as printed: floats in `float_format`, the rest as str()."""
  return format(value, float_format) if isinstance(value, float) else str(value)


def print_row(row: dict, float_format: str = '.1f') -> None:
  """One row as a 'key value | key value' line, as soon as it is measured."""
  say(' | '.join(f'{k} {cell(v, float_format)}' for k, v in row.items()))


def print_table(rows: list[dict], float_format: str = '.1f') -> None:
  """Rows of equal keys as a Markdown table on stdout (benchmarks paste it into BENCHMARKS.md)."""
  header = list(rows[0])
  say('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  for r in rows:
    say('| ' + ' | '.join(cell(v, float_format) for v in r.values()) + ' |')
