"""The checkpoint a sampling job reads: which step, which model, and its EMA weights on the mesh.

`ckpt` is a trainer workdir (its `ckpt/<step>/`) or a converted checkpoint (groupdiff_jax.convert
output). The model and its time convention come from the checkpoint's `meta` item, never from
flags; only the weights tree that is sampled (EMA by default) is read, straight onto the mesh's
shardings, so no optimizer state is ever loaded.
"""
import dataclasses
import os
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from groupdiff_jax import checkpoint, sharding
from groupdiff_jax.cli import UserError
from groupdiff_jax.diffusion import registry
from groupdiff_jax.models import sit


@dataclasses.dataclass(frozen=True)
class Source:
  path: str        # the checkpoint directory (holding <step>/)
  step: int
  meta: dict
  items: frozenset

  @property
  def objective(self) -> str:
    return self.meta.get('objective', registry.FLOW)  # the trainer writes flow models only


def locate(path: str, step: int = -1, *, flag: str = '--config.ckpt') -> Source:
  """The checkpoint at `path` (newest step, or `step`), with its metadata; UserError if absent.
  `flag` names the command-line flag that gave `path`, in the messages."""
  if not path:
    raise UserError(f'{flag} is required: a trainer workdir or a converted checkpoint')
  if not os.path.isdir(path):
    raise UserError(f'{flag}={path}: no such directory')
  directory = checkpoint.find_checkpoint_dir(path)
  ckpt = checkpoint.Checkpointer(directory, read_only=True, async_save=False)
  try:
    steps = ckpt.steps()
    if not steps:
      raise UserError(f'{flag}={path} holds no checkpoint (expected a trainer workdir '
                      'with ckpt/<step>/ or a groupdiff_jax.convert output)')
    if step < 0:
      step = steps[-1]
    elif step not in steps:
      raise UserError(f'--config.step={step}: {path} has no such step; steps present: '
                      f'{", ".join(map(str, steps))}')
    items = frozenset(ckpt.item_names(step))
    if 'meta' not in items:
      raise UserError(f'{directory}/{step} has no meta item: cannot tell which model it holds')
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if 'model' not in meta:
    raise UserError(f'{directory}/{step}: its meta records no model')
  return Source(directory, step, meta, items)


def model_config(source: Source, *, dtype: str, attention: str) -> sit.SiTConfig:
  try:
    return sit.config_from_meta(source.meta['model'], dtype=dtype, attention=attention)
  except (sit.ModelConfigError, KeyError, TypeError) as e:
    raise UserError(f'{source.path}/{source.step}: its meta does not describe a model this code '
                    f'builds ({type(e).__name__}: {e})') from e


def check_weights(source: Source, use_ema: bool) -> None:
  if use_ema and 'ema' not in source.items:
    raise UserError(f'{source.path}/{source.step} has no EMA parameters (items: '
                    f'{", ".join(sorted(source.items))}); to sample its raw training weights '
                    'instead, pass --config.use_ema=False')
  if not use_ema and not {'params', 'state'} & source.items:
    raise UserError(f'{source.path}/{source.step} has no raw parameters (items: '
                    f'{", ".join(sorted(source.items))})')


def restore(source: Source, cfg: sit.SiTConfig, mesh: Mesh, rules: Any, *, use_ema: bool
            ) -> tuple[Any, dict]:
  """(graphdef, params sharded on `mesh` by `rules`) of the checkpoint's EMA (or raw) weights."""
  graphdef, abstract = nnx.split(jax.eval_shape(lambda: sit.create(cfg)))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  ckpt = checkpoint.Checkpointer(source.path, read_only=True, async_save=False)
  try:
    params = checkpoint.restore_weights(ckpt, source.step, ema=use_ema,
                                        params=nnx.to_pure_dict(abstract), shardings=shardings)
  except Exception as e:  # pylint: disable=broad-except
    raise checkpoint.CheckpointError(
        f'{source.path}/{source.step} does not restore into {source.meta["model"]["name"]}: '
        f'{type(e).__name__}: {str(e).splitlines()[0][:300]}') from e
  finally:
    ckpt.close()
  return graphdef, params
