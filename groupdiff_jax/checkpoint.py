"""Orbax checkpoints: train state, EMA, data-iterator state and metadata as separate items.

Layout of a run's checkpoints, `<workdir>/ckpt/<step>/`:
  state/  params, optimizer state, step (sharded arrays)
  ema/    EMA parameters (what the sampling job restores)
  data/   the data iterator's state (JSON) for an exact resume
  meta/   JSON: model config, mesh, step, time convention
A weights-only checkpoint (the converter's output) has `params/`, optionally `ema/`, and `meta/`.
Restoring takes abstract targets that carry the *current* mesh's shardings, so a run resumes onto
any mesh shape. A step directory that fails to restore (an interrupted write) is skipped and
renamed to `<step>.unreadable-<time>` (kept for inspection, out of Orbax's view), so the resumed
run can write that step again.
"""
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ('state', 'ema', 'data', 'meta', 'params')


class CheckpointError(RuntimeError):
  pass


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """A CheckpointManager for one run directory, with SIGTERM-triggered saving."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, enable_async_checkpointing=async_save,
        read_only=read_only, create=not read_only, cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1)
    # A read-only manager logs 'Given directory is read only' as a warning: expected here.
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    if read_only:
      absl_logger.setLevel(max(level, logging.ERROR))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    finally:
      absl_logger.setLevel(level)
    self._read_only = read_only
    self._terminate = threading.Event()

  # --- preemption ---------------------------------------------------------------------------
  def install_sigterm_handler(self) -> None:
    """On SIGTERM (preemption) remember it; the loop saves at the next step and exits.

    With several processes SIGTERM stays with JAX's preemption service (jax.distributed installs
    its notifier): it tells every process, and `preempted` then turns true at the same step on
    all of them. A flag that only the signalled process saw would make it save alone, and
    Orbax's save is a collective: the others would never join it.
    """
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, lambda *_: self._terminate.set())

  def preempted(self, step: int) -> bool:
    """True at the step to save and stop at; call it after every step, on every process."""
    return self._terminate.is_set() or self.manager.reached_preemption(step)

  # --- save ---------------------------------------------------------------------------------
  def save(self, step: int, *, state: Any, ema: Any, data: dict, meta: dict,
           force: bool = False) -> None:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), ema=ocp.args.StandardSave(ema),
        data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=force)

  def save_weights(self, step: int, *, params: Any, ema: Any | None, meta: dict) -> None:
    items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
    if ema is not None:
      items['ema'] = ocp.args.StandardSave(ema)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  # --- restore ------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()  # (all_steps(read=True) is deprecated and logs a warning each call)
    return sorted(self.manager.all_steps())

  def item_names(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    return {n for n in ITEMS if os.path.isdir(os.path.join(path, n))}

  def read_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore_latest(self, *, state: Any, state_shardings: Any, ema: Any,
                     ema_shardings: Any) -> tuple[int, dict] | None:
    """Restores the newest complete checkpoint: (step, {'state','ema','data','meta'}) or None.

    Newer steps that fail to restore (an interrupted write) are skipped and set aside. When no
    step restores at all (another optimizer, a tree that does not fit), raises CheckpointError
    and moves nothing: starting afresh would bury the run's checkpoints under new ones.
    """
    failed = []
    for step in reversed(self.steps()):
      bad = (misfit(os.path.join(self.directory, str(step), 'state'), state)
             or misfit(os.path.join(self.directory, str(step), 'ema'), ema))
      if bad:
        failed.append((step, ValueError(bad)))
        continue
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state, state_shardings)),
            ema=ocp.args.StandardRestore(_abstract(ema, ema_shardings)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        continue
      for bad_step, e in failed:
        logging.warning('checkpoint step %d in %s is unreadable (%s: %s); restored step %d',
                        bad_step, self.directory, type(e).__name__, _first_line(e), step)
        self._set_aside(bad_step)
      return step, dict(out)
    if failed:
      step, e = failed[0]
      raise CheckpointError(
          f'no checkpoint in {self.directory} can be restored into this config (step {step}: '
          f'{type(e).__name__}: {_first_line(e)}); resume with the settings it was written '
          'with (model, optimizer), or use a new --workdir')
    return None

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable step directory out of the manager's view. Left in place it would
    stay the 'latest' step and make saving that step again fail (StepAlreadyExistsError)."""
    path = os.path.join(self.directory, str(step))
    if self._read_only or not os.path.isdir(path):
      return
    if jax.process_index() == 0:
      aside = f'{path}.unreadable-{int(time.time())}'
      os.rename(path, aside)
      logging.warning('moved the unreadable checkpoint step %d to %s', step, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f'groupdiff_ckpt_set_aside_{step}')
    self.manager.reload()


def _path_key(path: tuple) -> str:
  """'opt_state/1/0/mu/blocks/qkv/kernel' for a key path of dicts, sequences or namedtuples."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


METADATA_FILES = {'_METADATA', '_CHECKPOINT_METADATA'}


def misfit(item_dir: str, target: Any) -> str | None:
  """Names the first array whose stored shape differs from `target`'s, read from the item's
  metadata (or an item whose array data is missing). Checked before restoring: a restore that fails inside Orbax's asynchronous reads
  leaves un-awaited futures behind (warnings at exit) and says less."""
  if os.path.isdir(item_dir) and not set(os.listdir(item_dir)) - METADATA_FILES:
    return f'{os.path.basename(item_dir)}/ has metadata but no array data (an interrupted write)'
  handler = ocp.StandardCheckpointHandler()
  try:
    stored = handler.metadata(epath.Path(item_dir))
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: restore reports it
    return None
  finally:
    handler.close()
  want = {_path_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
  for path, meta in jax.tree_util.tree_leaves_with_path(stored):
    key = _path_key(path)
    shape = tuple(getattr(meta, 'shape', ()) or ())
    if key in want and shape != want[key]:
      return f'{key} is {shape} in the checkpoint but {want[key]} in this config'
  return None


def _first_line(e: BaseException, limit: int = 200) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:limit] if lines else ''


def find_checkpoint_dir(path: str) -> str:
  """`path` may be a workdir (with ckpt/) or a checkpoint directory itself."""
  candidate = os.path.join(path, 'ckpt')
  return candidate if os.path.isdir(candidate) else path


def _raw_params_args(names: set[str], target: Any, shardings: Any) -> dict:
  """Restore args of the raw parameters: a converted checkpoint's `params` item, or the params of
  a trainer's `state` item without reading its optimizer state (partial restore)."""
  if 'params' in names:
    return {'params': ocp.args.StandardRestore(target)}
  return {'state': ocp.args.PyTreeRestore(
      item={'params': target},
      restore_args={'params': jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)},
      partial_restore=True)}


def restore_weights(ckpt: Checkpointer, step: int, *, ema: bool, params: Any, shardings: Any
                    ) -> Any:
  """One weights tree of `step`, placed straight onto `shardings`: the EMA item, or the raw
  parameters. Nothing else (optimizer state, data state) is read."""
  target = _abstract(params, shardings)
  names = ckpt.item_names(step)
  items = {'ema': ocp.args.StandardRestore(target)} if ema else _raw_params_args(
      names, target, shardings)
  out = ckpt.manager.restore(step, args=ocp.args.Composite(**items))
  if ema:
    return out['ema']
  return out['params'] if 'params' in names else out['state']['params']


def load_weights(path: str, *, params: Any, shardings: Any, prefer_ema: bool = True
                 ) -> tuple[Any, Any, dict]:
  """Weights for fine-tuning or sampling from a run or a converted checkpoint.

  Returns (params, ema_or_None, meta). `params`/`shardings` give the target structure; a tree that
  does not match (another model) raises CheckpointError naming the problem.
  """
  ckpt = Checkpointer(find_checkpoint_dir(path), read_only=True, async_save=False)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f'no checkpoint found in {path}')
  step = steps[-1]
  names = ckpt.item_names(step)
  meta = ckpt.read_meta(step) if 'meta' in names else {}
  target = _abstract(params, shardings)
  step_dir = os.path.join(ckpt.directory, str(step))
  bad = (misfit(os.path.join(step_dir, 'params'), params) if 'params' in names else
         misfit(os.path.join(step_dir, 'state'), {'params': params}))
  if bad:
    ckpt.close()
    raise CheckpointError(f'checkpoint {path} (step {step}, model '
                          f'{meta.get("model", {}).get("name", "?")}) does not fit this model: '
                          f'{bad}')
  try:
    items = _raw_params_args(names, target, shardings)
    if 'ema' in names and prefer_ema:
      items['ema'] = ocp.args.StandardRestore(target)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'checkpoint {path} (step {step}, model {meta.get("model", {}).get("name", "?")}) does '
        f'not fit this model: {type(e).__name__}: {str(e).splitlines()[0][:300]}') from e
  finally:
    ckpt.close()
  loaded = out['params'] if 'params' in names else out['state']['params']
  return loaded, out.get('ema') if 'ema' in items else None, meta
