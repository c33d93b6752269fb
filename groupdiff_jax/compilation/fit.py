"""What to try when a train step does not fit a chip's HBM: a mesh that shards every parameter,
rematerialisation of the blocks, or both (in that order; the AOT tool compiles each in turn)."""
import math

import jax
import ml_collections
from flax import nnx

from groupdiff_jax import cli, sharding
from groupdiff_jax.models import sit


def _axes(target) -> tuple[str, ...]:
  return (target,) if isinstance(target, str) else tuple(target or ())


def batch_axes(config) -> tuple[str | None, str | None]:
  """(data axis, fsdp axis): of the axes the batch is split over, the one no parameter rule
  uses (pure data parallelism) and the one that shards parameters."""
  rules = dict(config.mesh.rules)
  param_axes = {a for name, target in rules.items() if name not in ('batch', 'tokens')
                for a in _axes(target)}
  batch = _axes(rules.get('batch'))
  data = next((a for a in batch if a not in param_axes), None)
  fsdp = next((a for a in batch if a in param_axes), None)
  return data, fsdp


def sharded_mesh_shape(config, devices: list) -> tuple[int, ...] | None:
  """The mesh shape with the largest fsdp size (rest data parallel) that shards every parameter
  as the rules ask, when the configured mesh leaves some replicated; None when it does not, or
  no such shape exists."""
  data, fsdp = batch_axes(config)
  if data is None or fsdp is None:
    return None
  rules = tuple(config.mesh.rules)
  abstract = nnx.state(jax.eval_shape(lambda: sit.create(sit.config_from(config.model))))
  current = sharding.mesh_from_config(config, devices)
  if sharding.replication_report(abstract, current, rules) is None:
    return None
  axes = tuple(config.mesh.axes)
  others = math.prod(current.shape[a] for a in axes if a not in (data, fsdp))
  parallel = len(devices) // others
  for size in sorted((f for f in range(1, current.shape[fsdp]) if parallel % f == 0),
                     reverse=True):
    shape = tuple(size if a == fsdp else parallel // size if a == data else current.shape[a]
                  for a in axes)
    if sharding.replication_report(abstract, sharding.make_mesh(axes, shape, devices),
                                   rules) is None:
      return shape
  return None


def proposals(config: ml_collections.ConfigDict, devices: list) -> list[dict]:
  """Config overrides to try, most promising first: {'mesh.shape': ..., 'model.remat': ...}."""
  out = []
  shape = sharded_mesh_shape(config, devices)
  if shape:
    out.append({'mesh.shape': shape})
  if not config.model.remat:
    out.append({'model.remat': True})
    if shape:
      out.append({'mesh.shape': shape, 'model.remat': True})
  return out


def apply(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    return cli.set_dotted(config, overrides)


def flags_for(overrides: dict) -> str:
  """The command-line flags that apply `overrides`."""
  def text(v):
    return f"'{tuple(v)}'" if isinstance(v, tuple) else str(v)
  return ' '.join(f'--config.{k}={text(v)}' for k, v in overrides.items())
