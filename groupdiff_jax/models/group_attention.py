"""Group attention over a batch of mixed group sizes, partitioned over the device mesh.

A batch's group structure is static: `Groups`, its rows in order as segments (images, group_size),
each segment a run of consecutive groups of one size (GroupDiff training: conditional singles and
unconditional groups of 4, in one model pass). Only attention sees it: every other layer works per
image. `group_attention` splits q, k, v per segment, joins each group's images along the sequence
by a reshape, (G*M, T) -> (G, M*T), runs one attention kernel per segment and concatenates, so
the executed FLOPs are exactly the groups' own (no padding, no mask over a wider slot).

Inside a `sharding.use_mesh` block it runs in `jax.shard_map` (Mosaic and cuDNN kernels cannot be
partitioned automatically):
  - batch: the rows are cut into one block per batch shard (the mesh axes of the 'batch' rule,
    in NamedSharding's order). Each block must hold whole groups; blocks may differ in structure
    (a shard of 4 singles, a shard of one group of 4): the few distinct block structures are
    static branches and each device picks its own with `lax.switch` on its batch index.
    `layout.shard_order` lays a training batch out so the cut always works;
  - tokens ('tokens' rule, e.g. 'context'): a device holds T/C tokens of every image; its queries
    attend to the whole group's keys and values, all-gathered over the context axes (context
    parallelism for big groups; the gradient reduce-scatters them back);
  - heads ('heads' rule): attention is independent per head.
Outside a mesh the same per-segment computation runs on the whole batch.
"""
import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from groupdiff_jax import sharding
from groupdiff_jax.models import attention as attention_lib

Segment = tuple[int, int]  # (images, group_size): images // group_size consecutive groups


def _merge(segments: Sequence[Segment]) -> tuple[Segment, ...]:
  """Drops empty segments and joins neighbours of the same group size."""
  out: list[Segment] = []
  for images, size in segments:
    if not images:
      continue
    if out and out[-1][1] == size:
      out[-1] = (out[-1][0] + images, size)
    else:
      out.append((images, size))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Groups:
  """The static group structure of a batch: its rows, in order, as (images, group_size) runs."""
  segments: tuple[Segment, ...]

  def __post_init__(self):
    for images, size in self.segments:
      if size < 1 or images % size:
        raise ValueError(f'segment of {images} images is not whole groups of {size}')
    object.__setattr__(self, 'segments', _merge(self.segments))

  @classmethod
  def uniform(cls, num_images: int, group_size: int) -> 'Groups':
    if group_size < 1 or num_images % group_size:
      raise ValueError(f'group size {group_size} does not divide the batch of {num_images} '
                       'images')
    return cls(((num_images, group_size),))

  @property
  def num_images(self) -> int:
    return sum(images for images, _ in self.segments)

  @property
  def max_group_size(self) -> int:
    return max((size for _, size in self.segments), default=1)

  def cut(self, shards: int) -> tuple[tuple[tuple[Segment, ...], ...], tuple[int, ...]] | None:
    """Cuts the rows into `shards` equal blocks: (distinct block structures, each block's index
    into them), or None where a block boundary would split a group."""
    if self.num_images % shards:
      return None
    rows = self.num_images // shards
    kinds: dict[tuple[Segment, ...], int] = {}
    kind_of, block, room = [], [], rows
    for images, size in self.segments:
      while images:
        take = min(images, room)
        if take % size:
          return None
        block.append((take, size))
        images, room = images - take, room - take
        if not room:
          kind_of.append(kinds.setdefault(_merge(block), len(kinds)))
          block, room = [], rows
    return tuple(kinds), tuple(kind_of)


def as_groups(group_size: 'int | Groups', num_images: int) -> Groups:
  """An int group size means uniform groups over the whole batch."""
  if isinstance(group_size, Groups):
    if group_size.num_images != num_images:
      raise ValueError(f'group structure covers {group_size.num_images} images, the batch has '
                       f'{num_images}')
    return group_size
  return Groups.uniform(num_images, int(group_size))


def _attend_segments(arrays: Sequence[jax.Array], segments: Sequence[Segment],
                     attend) -> jax.Array:
  """Per segment: join each group's images along the sequence, attend, split back. `arrays` are
  q, k, v [N, T, H, Dh], or the packed qkv [N, T, 3, H, Dh] for a backend that reads it whole."""
  outs, start, tokens = [], 0, arrays[0].shape[1]
  for images, size in segments:
    def grouped(a):
      return a[start:start + images].reshape(images // size, size * a.shape[1], *a.shape[2:])
    out = attend(*map(grouped, arrays))
    outs.append(out.reshape(images, tokens, *out.shape[2:]))
    start += images
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _fitting_axes(mesh: Mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
  """`axes` if their product divides `size`, else none of them (that dimension stays whole)."""
  return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _batch_axis_subsets(mesh: Mesh, rules) -> list[tuple[str, ...]]:
  """Subsets of the 'batch' rule's mesh axes (their order kept), the most shards first."""
  axes = _axes(sharding.logical_to_spec(('batch',), rules, mesh)[0])
  subsets = [s for r in range(len(axes), -1, -1) for s in itertools.combinations(axes, r)]
  return sorted(subsets, key=lambda s: -math.prod(mesh.shape[a] for a in s))  # stable sort


def batch_shard_counts(mesh: Mesh, rules) -> list[int]:
  """The batch shard counts group attention can run on, most first: all the batch axes, or a
  subset of them when the full count would split groups (the rest then hold replicas)."""
  return [math.prod(mesh.shape[a] for a in s) for s in _batch_axis_subsets(mesh, rules)]


def _batch_cut(mesh: Mesh, rules, groups: Groups):
  """The batch axes with the most shards whose blocks hold whole groups, and that cut."""
  for subset in _batch_axis_subsets(mesh, rules):
    cut = groups.cut(math.prod(mesh.shape[a] for a in subset))
    if cut is not None:
      return subset, cut
  raise AssertionError('one block always holds whole groups')


def branch_shares(mesh: Mesh, rules, groups: 'int | Groups') -> tuple[float, ...] | None:
  """The share of batch shards that take each `lax.switch` branch of `group_attention` (None
  when every shard runs the same code): what a compiled program's FLOP count weights by."""
  if not isinstance(groups, Groups):
    return None
  _, (kinds, kind_of) = _batch_cut(mesh, rules, groups)
  if len(kinds) == 1:
    return None
  return tuple(kind_of.count(k) / len(kind_of) for k in range(len(kinds)))


def mesh_platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ('tpu' also for an ahead-of-time topology on CPU)."""
  return mesh.devices.flat[0].platform


def active_platform() -> str:
  """Where the code being traced will run: the mesh's platform inside `sharding.use_mesh`, else
  JAX's default backend. Per-platform choices ('auto' attention, residuals) key on this."""
  ctx = sharding.active()
  return jax.default_backend() if ctx is None else mesh_platform(ctx[0])


def group_attention(qkv: jax.Array, groups: 'int | Groups', backend: str = 'auto') -> jax.Array:
  """qkv: [N, T, 3, H, Dh] (q, k, v of every image); returns the attention output [N, T, H, Dh]
  where the images of each group attend jointly over their tokens."""
  groups = as_groups(groups, qkv.shape[0])
  ctx = sharding.active()
  platform = None if ctx is None else mesh_platform(ctx[0])
  attend = functools.partial(attention_lib.attention, backend=backend, platform=platform)
  packed = attention_lib.packed_attention(backend, platform)  # reads qkv whole, or None
  if sharding.one_device():
    # One device (or plain use outside a mesh): the same computation on the whole batch. A
    # one-device shard_map would only add copies (its transpose all-reduces the gradient).
    if packed:
      return _attend_segments((qkv,), groups.segments, packed)
    return _attend_segments((qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), groups.segments, attend)

  mesh, rules = ctx
  spec = sharding.logical_to_spec(('batch', 'tokens', 'heads'), rules, mesh)
  batch_axes, (kinds, kind_of) = _batch_cut(mesh, rules, groups)
  token_axes = _fitting_axes(mesh, _axes(spec[1]), qkv.shape[1])
  head_axes = _fitting_axes(mesh, _axes(spec[2]), qkv.shape[3])

  def local(qkv):
    if packed and not token_axes:
      arrays, fn = (qkv,), packed
    else:
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if token_axes:  # context parallelism: local queries, the whole group's keys and values
        k = jax.lax.all_gather(k, token_axes, axis=1, tiled=True)
        v = jax.lax.all_gather(v, token_axes, axis=1, tiled=True)
      arrays, fn = (q, k, v), attend
    branches = [functools.partial(_attend_segments, segments=s, attend=fn) for s in kinds]
    if len(branches) == 1:
      return branches[0](arrays)
    index = jnp.asarray(kind_of, jnp.int32)[jax.lax.axis_index(batch_axes)]
    return jax.lax.switch(index, branches, arrays)

  names = lambda axes: axes or None
  in_spec = P(names(batch_axes), names(token_axes), None, names(head_axes), None)
  out_spec = P(names(batch_axes), names(token_axes), names(head_axes), None)
  # Pallas and FFI kernels declare no varying-manual-axes types for their outputs: run unchecked.
  check_vma = attention_lib.resolve_backend(backend, platform) not in attention_lib.UNTYPED
  return jax.shard_map(local, mesh=mesh, in_specs=in_spec, out_specs=out_spec,
                       check_vma=check_vma)(qkv)
