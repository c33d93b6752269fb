"""The named device mesh and logical axis rules (maxtext vocabulary).

Parameters and activations are annotated with logical axis names ('batch', 'tokens', 'embed',
'mlp', 'heads', 'vocab', 'layers'); `config.mesh.rules` maps each name to mesh axes. Nothing here
knows a device count: mesh sizes come from the config with -1 filling the remaining devices.
"""
import contextlib
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


class MeshError(ValueError):
  pass


def make_mesh(axes: Sequence[str], shape: Sequence[int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with named `axes`; one entry of `shape` may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  axes, shape = tuple(axes), [int(s) for s in shape]
  if len(axes) != len(shape):
    raise MeshError(f'mesh axes {axes} and shape {tuple(shape)} differ in length')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f'mesh shape {tuple(shape)}: sizes must be positive, at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise MeshError(f'mesh shape {tuple(shape)} does not divide the {len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise MeshError(f'mesh shape {tuple(shape)} needs {math.prod(shape)} devices, '
                    f'but {len(devices)} {"is" if len(devices) == 1 else "are"} present')
  return Mesh(device_grid(shape, devices, axes), axes)


def device_grid(shape: Sequence[int], devices: Sequence[Any],
                axes: Sequence[str] = ('data',)) -> np.ndarray:
  """The devices arranged as `shape` (sizes resolved): topology-aware on TPU/GPU, plain order
  where that is not available. TPU multislice: the first axis spans the slices (over DCN; the
  other axes stay inside a slice), since create_device_mesh alone interleaves the slices."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:
    if shape[0] % slices:
      raise MeshError(f'{slices} TPU slices: the first mesh axis ({axes[0]}={shape[0]}) must be a '
                      f'multiple of the slice count, e.g. --config.mesh.shape="({slices}, -1, 1)"')
    return mesh_utils.create_hybrid_device_mesh(
        [shape[0] // slices, *shape[1:]], [slices] + [1] * (len(shape) - 1), devices=devices)
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    return np.asarray(devices).reshape(shape)


def mesh_from_config(config, devices=None) -> Mesh:
  return make_mesh(config.mesh.axes, config.mesh.shape, devices)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for logical axes. A dim that its mesh axes would not divide stays whole."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    target = table.get(name) if name is not None else None
    if isinstance(target, str):
      target = (target,)
    target = tuple(a for a in (target or ()) if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in target)
    if shape is not None and shape[i] % size:
      target = ()
    used.update(target)
    spec.append(None if not target else target[0] if len(target) == 1 else target)
  return P(*spec)


_CONTEXT = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Activates `mesh` and `rules` for `constrain` calls traced inside the block."""
  previous = getattr(_CONTEXT, 'value', None)
  _CONTEXT.value = (mesh, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules))
  try:
    yield
  finally:
    _CONTEXT.value = previous


def active() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) of the enclosing `use_mesh` block, or None outside one."""
  return getattr(_CONTEXT, 'value', None)


def one_device() -> bool:
  """Whether code traced now runs on a single device: outside `use_mesh` or on a one-device mesh.
  Host-only custom calls (no partitioning rule) and shard_map-free paths key on this."""
  ctx = active()
  return ctx is None or ctx[0].size == 1


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside `use_mesh`."""
  ctx = active()
  if ctx is None:
    return x
  mesh, rules = ctx
  # No divisibility check: XLA pads unevenly sharded activations (e.g. 6 unconditional groups
  # over 8 devices), which beats replicating that computation on every device.
  spec = logical_to_spec(logical_axes, rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _axes(target: Any) -> tuple[str, ...]:
  return (target,) if isinstance(target, str) else tuple(target or ())


def _entry(axes: Sequence[str]) -> Any:
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def param_spec(logical_axes: Sequence[str | None], shape: Sequence[int], rules: Rules,
               mesh: Mesh) -> tuple[P, tuple[str, ...]]:
  """PartitionSpec of a parameter, and the mesh axes it could not be sharded over.

  Like `logical_to_spec`, except that mesh axes whose named dimension they do not divide (1152
  over fsdp = 256) move to another dimension they divide (the largest; never the scanned
  'layers' axis, whose slices each step takes), first all together, then the largest alone.
  Axes that fit nowhere are returned: the parameter stays replicated over them.
  """
  table = dict(rules)
  entries: list[tuple[str, ...]] = [()] * len(shape)
  used: set[str] = set()
  homeless = []
  for i, name in enumerate(logical_axes):
    target = tuple(a for a in _axes(table.get(name) if name else None)
                   if a not in used and mesh.shape[a] > 1)
    if not target:
      continue
    if shape[i] % math.prod(mesh.shape[a] for a in target):
      homeless.append(target)
    else:
      entries[i] = target
      used.update(target)
  unplaced: list[str] = []
  for target in homeless:
    target = tuple(a for a in target if a not in used)
    options = [target] + ([(a,) for a in sorted(target, key=lambda a: -mesh.shape[a])]
                          if len(target) > 1 else [])
    for option in options:
      size = math.prod(mesh.shape[a] for a in option)
      free = [j for j in range(len(shape)) if not entries[j] and logical_axes[j] != 'layers'
              and shape[j] % size == 0]
      if free:
        entries[max(free, key=lambda j: shape[j])] = option
        used.update(option)
        break
    unplaced.extend(a for a in target if a not in used)
  return P(*(_entry(e) for e in entries)), tuple(dict.fromkeys(unplaced))


def _param_specs(state: nnx.State, mesh: Mesh, rules: Rules) -> tuple[dict, dict, dict]:
  """Pure dicts of (spec, unplaced axes), shapes and dtypes of an nnx.State's variables."""
  names = nnx.to_pure_dict(nnx.get_partition_spec(state))
  values = nnx.to_pure_dict(state)
  shapes = jax.tree.map(lambda v: tuple(v.shape), values)
  specs = jax.tree.map(lambda n, s: param_spec(tuple(n), s, rules, mesh), names, shapes,
                       is_leaf=lambda x: isinstance(x, P))
  return specs, shapes, jax.tree.map(lambda v: np.dtype(v.dtype), values)


def replication_report(state: nnx.State, mesh: Mesh, rules: Rules) -> str | None:
  """One line naming the parameters that stay replicated over mesh axes their rules ask to shard
  them over (no dimension is divisible), or None when every parameter is sharded as asked."""
  specs, shapes, dtypes = _param_specs(state, mesh, rules)
  is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], P)  # noqa: E731
  flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
  flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  flat_dtypes = jax.tree.leaves(dtypes)
  hit = [(math.prod(s), math.prod(s) * d.itemsize, axes)
         for (_, axes), s, d in zip(flat_specs, flat_shapes, flat_dtypes) if axes]
  if not hit:
    return None
  axes = sorted({a for _, _, ax in hit for a in ax})
  sizes = ', '.join(f'{a} = {mesh.shape[a]}' for a in axes)
  values, nbytes = sum(h[0] for h in hit), sum(h[1] for h in hit)
  amount = f'{values / 1e6:.1f}M' if values >= 1e5 else f'{values:,}'
  return (f'{len(hit)} of {len(flat_specs)} parameter arrays ({amount} values, '
          f'{nbytes / 2**20:.1f} MiB per copy) stay replicated: no '
          f'dimension is divisible by {sizes}; a mesh whose sizes divide the hidden width '
          f'shards them')


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules, warn: bool = True) -> dict:
  """Pure dict of NamedSharding for an nnx.State, from each variable's logical axis names;
  warns (one line) when some parameters cannot be sharded as the rules ask."""
  specs, _, _ = _param_specs(state, mesh, rules)
  if warn:
    report = replication_report(state, mesh, rules)
    if report:
      logging.warning('sharding: %s', report)
  return jax.tree.map(lambda s: NamedSharding(mesh, s[0]), specs,
                      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                      and isinstance(x[0], P))


def _gathered(value: jax.Array, dtype: Any, whole: NamedSharding,
              stored: NamedSharding) -> jax.Array:
  """`value` cast to `dtype` and made whole (all-gather); the cotangent goes back in the stored
  dtype and sharding, so the backward pass reduce-scatters the gradient rather than all-reducing
  it to every device (what the transpose of a plain sharding constraint would do)."""
  @jax.custom_vjp
  def gather(v):
    return jax.lax.with_sharding_constraint(v.astype(dtype), whole)

  def forward(v):
    return gather(v), None

  def backward(_, cotangent):
    return (jax.lax.with_sharding_constraint(cotangent.astype(value.dtype), stored),)

  gather.defvjp(forward, backward)
  return gather(value)


def gather_for_compute(layer: nnx.State, dtype: Any) -> dict:
  """FSDP's per-layer gather, for one layer's slice of the scanned parameters: floating
  parameters cast to the compute dtype and made whole over the mesh axes the batch is split
  over, right before the layer runs; their gradients are reduce-scattered back to the stored
  sharding in the stored dtype. Outside `use_mesh` only the cast. Returns a pure dict for
  `nnx.merge`; numerics are those of the layer computing in `dtype` anyway."""
  dtype = jnp.dtype(dtype)
  names = nnx.to_pure_dict(nnx.get_partition_spec(layer))
  values = nnx.to_pure_dict(layer)
  ctx = active()

  def gather(value, spec):
    if not jnp.issubdtype(value.dtype, jnp.floating) or value.dtype == dtype:
      return value
    if ctx is None:
      return value.astype(dtype)
    mesh, rules = ctx
    batch_axes = set(_axes(dict(rules).get('batch')))
    kept = [(name, tuple(a for a in _axes(target) if a not in batch_axes))
            for name, target in rules]
    logical = tuple(spec)[-value.ndim:] if value.ndim else ()  # drop the scanned 'layers' name
    whole = NamedSharding(mesh, logical_to_spec(logical, kept, mesh, value.shape))
    stored = NamedSharding(mesh, param_spec(logical, value.shape, rules, mesh)[0])
    return _gathered(value, dtype, whole, stored)

  return jax.tree.map(gather, values, names)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Images sharded over the 'batch' rule's axes, everything else whole."""
  return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --- global batches from per-process rows ---------------------------------------------------
# A process must hold exactly the rows its devices own in the global batch: the mesh may put a
# process's devices anywhere along the batch axis (topology order), and the conditional /
# unconditional split and group contiguity are decided by row index. So rows come from the
# sharding's own index map, never from the process index.


def _row_range(index: tuple[slice, ...], num_rows: int) -> range:
  return range(*index[0].indices(num_rows))


def _local_devices(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> list:
  return list(sharding.addressable_devices_indices_map(tuple(global_shape)))  # sharding's order


def batch_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int],
               devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Increasing global rows held by `devices` (default: this process's addressable devices)."""
  index_map = sharding.devices_indices_map(tuple(global_shape))
  devices = _local_devices(sharding, global_shape) if devices is None else devices
  rows = set()
  for device in devices:
    rows.update(_row_range(index_map[device], global_shape[0]))
  return np.array(sorted(rows), np.int64)


def device_blocks(sharding: jax.sharding.Sharding, global_shape: Sequence[int],
                  rows: np.ndarray, local: np.ndarray,
                  devices: Sequence[jax.Device] | None = None) -> dict[jax.Device, np.ndarray]:
  """Each device's block of the global array, cut from `local` (global rows `rows`, as given by
  batch_rows for the same devices)."""
  index_map = sharding.devices_indices_map(tuple(global_shape))
  devices = _local_devices(sharding, global_shape) if devices is None else devices
  position = {int(r): i for i, r in enumerate(rows)}
  if len(local) != len(rows):
    raise ValueError(f'{len(local)} local rows for {len(rows)} row indices')
  blocks = {}
  for device in devices:
    index = index_map[device]
    span = _row_range(index, global_shape[0])
    if len(span) and span.start not in position:
      raise ValueError(f'device {device} holds rows {span}, which are not among `rows`')
    start = position.get(span.start, 0)  # a device's rows are contiguous, and so are they here
    blocks[device] = local[start:start + len(span)][(slice(None), *index[1:])]
  return blocks


def assemble_batch(sharding: jax.sharding.Sharding, global_shape: Sequence[int],
                   rows: np.ndarray, local: np.ndarray) -> jax.Array:
  """The global array whose row r is plan row r, from this process's `local` rows `rows`."""
  blocks = device_blocks(sharding, global_shape, rows, local)
  return jax.make_array_from_single_device_arrays(
      tuple(global_shape), sharding, [jax.device_put(b, d) for d, b in blocks.items()])
