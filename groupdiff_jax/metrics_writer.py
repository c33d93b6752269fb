"""Progress lines, metrics.jsonl and TensorBoard event files for a run (process 0 writes)."""
import json
import os
import time
from typing import Any

import jax


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int, *, images_per_step: int,
               flops_per_step: float, peak_flops: float | None, num_devices: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a') if self.enabled else None
    self._tb = None
    if self.enabled:
      try:  # TensorBoard event files without TensorFlow
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        print('tensorboardX not installed: no TensorBoard event files', flush=True)
    self._last = None  # (step, time) of the previous report

  def start(self, step: int) -> None:
    self._last = (step, time.perf_counter())

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
    """Logs host-side scalars for `step`; adds throughput since the previous call."""
    now = time.perf_counter()
    out = {k: float(v) for k, v in metrics.items()}
    if self._last is not None and step > self._last[0]:
      steps, secs = step - self._last[0], now - self._last[1]
      out['steps_per_sec'] = steps / secs
      out['images_per_sec'] = steps * self.images_per_step / secs
      out['tflops_per_device'] = steps * self.flops_per_step / secs / self.num_devices / 1e12
      if self.peak_flops:
        out['mfu'] = out['tflops_per_device'] * 1e12 / self.peak_flops
      out['eta_sec'] = (self.total_steps - step) * secs / steps
    self._last = (step, now)
    if self.enabled:
      parts = [f'step {step}/{self.total_steps}', f'loss {out.get("loss", float("nan")):.4f}']
      if 'images_per_sec' in out:
        parts += [f'{out["images_per_sec"]:.1f} img/s',
                  f'{out["tflops_per_device"]:.3f} TFLOP/s/dev',
                  f'MFU {100 * out["mfu"]:.1f}%' if 'mfu' in out else 'MFU n/a',
                  f'ETA {_fmt_eta(out["eta_sec"])}']
      print(' | '.join(parts), flush=True)
      self._jsonl.write(json.dumps({'step': step, **out}) + '\n')
      self._jsonl.flush()
      if self._tb is not None:
        for k, v in out.items():
          self._tb.add_scalar(k, v, step)
        self._tb.flush()
    return out

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
