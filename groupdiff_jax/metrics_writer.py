"""Progress lines, metrics.jsonl and TensorBoard event files for a run (process 0 writes).

Throughput (images/s, TFLOP/s per device, MFU) counts the time between two reports minus what
the loop declares with `exclude()` (checkpoint writes, in-training evaluation); compilation
happens before `start()`. `log()` adds rows that are not training steps (evaluation results).
Files are opened at the first report, so a run that takes no step writes nothing.
"""
import json
import os
import time
from typing import Any

import jax

from groupdiff_jax import progress

HEADER = ('images/s, TFLOP/s/dev and MFU count training steps only: compilation and checkpoint '
          'writes are excluded')


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, *, images_per_step: int,
               flops_per_step: float, peak_flops: float | None, num_devices: int):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self._jsonl = None
    self._tb = None
    self._last = None      # (step, time) of the previous report
    self._excluded = 0.0   # seconds since the previous report that are not training

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())
    self._excluded = 0.0
    if self.enabled:
      progress.say(f'training from step {step} | {HEADER}')

  def exclude(self, seconds: float) -> None:
    """Time spent since the last report on something other than training steps."""
    self._excluded += seconds

  def _open(self) -> None:
    self._jsonl = open(os.path.join(self.workdir, 'metrics.jsonl'), 'a')
    try:  # TensorBoard event files without TensorFlow
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(self.workdir, 'tb'))
    except ImportError:
      progress.say('tensorboardX not installed: no TensorBoard event files')

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Logs host-side scalars for `step`; adds throughput since the previous call."""
    now = time.perf_counter()
    out = {k: float(v) for k, v in metrics.items()}
    if self._last is not None and step > self._last[0]:
      steps, secs = step - self._last[0], max(now - self._last[1] - self._excluded, 1e-9)
      out['steps_per_sec'] = steps / secs
      out['images_per_sec'] = steps * self.images_per_step / secs
      out['tflops_per_device'] = steps * self.flops_per_step / secs / self.num_devices / 1e12
      if self.peak_flops:
        out['mfu'] = out['tflops_per_device'] * 1e12 / self.peak_flops
      out['eta_sec'] = (self.total_steps - step) * secs / steps
    self._last, self._excluded = (step, now), 0.0
    if self.enabled:
      if self._jsonl is None:  # opening (tensorboardX import) is not training time either
        t0 = time.perf_counter()
        self._open()
        self._excluded += time.perf_counter() - t0
      parts = [f'step {step}/{self.total_steps}', f'loss {out.get("loss", float("nan")):.4f}']
      if 'images_per_sec' in out:
        parts += [f'{out["images_per_sec"]:.1f} img/s',
                  f'{out["tflops_per_device"]:.3f} TFLOP/s/dev',
                  f'MFU {100 * out["mfu"]:.1f}%' if 'mfu' in out else 'MFU n/a',
                  f'ETA {progress.duration(out["eta_sec"])}']
      progress.say(' | '.join(parts))
      self._jsonl.write(json.dumps({'step': step, **out}) + '\n')
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in out.items():
          self._tb.add_scalar(k, v, step)
        self._tb.flush()
    return out

  def log(self, step: int, scalars: dict[str, float], line: str) -> None:
    """Logs scalars that are not training steps (in-training evaluation) with their own line;
    leaves the throughput clock alone (the caller excludes the time it took)."""
    if not self.enabled:
      return
    if self._jsonl is None:
      self._open()
    progress.say(line)
    self._jsonl.write(json.dumps({'step': step, **{k: float(v) for k, v in scalars.items()}})
                      + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
