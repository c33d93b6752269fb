"""Reading PyTorch (.pt/.pth) and safetensors checkpoints into flat numpy state dicts.

torch is imported lazily and only for .pt/.pth files. Training checkpoints wrap the weights:
DiT/SiT/REPA `{"model", "ema", "opt", "args"(, "steps")}`, GroupDiff `{"model", "model_ema",
"optimizer", ...}`; released files are bare (EMA) state dicts. Every file is flattened to dotted
keys first, then split by those wrapper names, so nested and already-flat (safetensors) layouts are
handled the same way.
"""
import dataclasses
import os
from typing import Any

import numpy as np

from groupdiff_jax.convert_keys import ConversionError

# Wrapper names in training checkpoints, in order of preference.
PARAM_WRAPPERS = ('model', 'state_dict', 'module', 'net')
EMA_WRAPPERS = ('ema', 'model_ema', 'ema_state_dict')
# Prefixes that wrap module names without changing them: DDP, torch.compile.
GENERIC_PREFIXES = ('module.', '_orig_mod.')


@dataclasses.dataclass
class Loaded:
  params: dict[str, np.ndarray]
  ema: dict[str, np.ndarray] | None
  notes: list[str]


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value.astype(np.float32) if value.dtype.kind == 'f' else value
  # torch.Tensor (bf16/fp16 checkpoints included): our parameters are float32.
  if value.is_floating_point():
    value = value.float()
  return value.detach().cpu().numpy()


def _is_array(value: Any) -> bool:
  return isinstance(value, np.ndarray) or type(value).__name__ in ('Tensor', 'Parameter')


def flatten(obj: Any, prefix: str = '', skipped: list[str] | None = None) -> dict[str, Any]:
  """Nested dicts -> {'a.b.c': array}; non-array leaves (args, step counters) are skipped."""
  out: dict[str, Any] = {}
  if isinstance(obj, dict):
    for key, value in obj.items():
      out.update(flatten(value, f'{prefix}{key}.', skipped))
  elif _is_array(obj):
    out[prefix[:-1]] = obj
  elif skipped is not None and prefix:
    skipped.append(prefix[:-1])
  return out


def _read_torch(path: str, allow_pickle: bool) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f'{path}: reading .pt/.pth files needs torch (pip install torch); or '
                          'convert the file to .safetensors first') from e
  import argparse  # pylint: disable=import-outside-toplevel
  # Training checkpoints store their argparse.Namespace under "args": a plain attribute holder,
  # safe to allow in the weights-only unpickler.
  torch.serialization.add_safe_globals([argparse.Namespace])
  try:
    return torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # pylint: disable=broad-except
    hint = ('' if allow_pickle else '; if the file is trusted and holds other Python objects, '
            'retry with --allow_pickle')
    raise ConversionError(f'{path}: cannot read as a PyTorch checkpoint '
                          f'({type(e).__name__}: {str(e).splitlines()[0][:300]}){hint}') from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{path}: cannot read as safetensors '
                          f'({type(e).__name__}: {str(e).splitlines()[0][:300]})') from e


READERS = {'.pt': _read_torch, '.pth': _read_torch, '.bin': _read_torch,
           '.safetensors': lambda path, allow_pickle: _read_safetensors(path)}


def strip_prefixes(sd: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
  """Removes any of `prefixes` (repeatedly) from the front of every key."""
  out = {}
  for key, value in sd.items():
    changed = True
    while changed:
      changed = False
      for p in prefixes:
        if key.startswith(p):
          key, changed = key[len(p):], True
    out[key] = value
  return out


def _group(flat: dict[str, Any], name: str) -> dict[str, Any]:
  return {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + '.')}


def read(path: str, *, allow_pickle: bool = False) -> Loaded:
  """Reads a checkpoint file into (params, ema) flat dicts with float32 numpy values."""
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: no such file')
  ext = os.path.splitext(path)[1].lower()
  if ext not in READERS:
    raise ConversionError(f'{path}: unknown extension {ext!r}; expected one of {sorted(READERS)}')
  obj = READERS[ext](path, allow_pickle)
  if not isinstance(obj, dict):
    raise ConversionError(f'{path}: expected a state dict or a dict of state dicts, got '
                          f'{type(obj).__name__}')
  skipped: list[str] = []
  flat = flatten(obj, skipped=skipped)
  if not flat:
    raise ConversionError(f'{path}: holds no tensors (top-level keys: {sorted(map(str, obj))})')
  notes = []
  tops = {k.split('.', 1)[0] for k in flat}
  wrapped = [w for w in PARAM_WRAPPERS + EMA_WRAPPERS if w in tops]
  if not wrapped:  # a bare state dict (the released DiT/SiT/REPA files are EMA weights)
    return Loaded({k: _to_numpy(v) for k, v in flat.items()}, None, notes)
  param_name = next((w for w in PARAM_WRAPPERS if w in tops), None)
  ema_name = next((w for w in EMA_WRAPPERS if w in tops), None)
  ignored = sorted(tops - {param_name, ema_name})
  if ignored or skipped:
    notes.append(f'ignored non-weight entries: {", ".join(ignored + sorted(skipped)[:8])}')
  params = _group(flat, param_name or ema_name)
  ema = _group(flat, ema_name) if ema_name and param_name else None
  if not param_name:
    notes.append(f'only {ema_name!r} weights in the file: they become the params (no EMA item)')
  return Loaded({k: _to_numpy(v) for k, v in params.items()},
                None if ema is None else {k: _to_numpy(v) for k, v in ema.items()}, notes)
