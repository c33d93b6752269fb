"""TPU slice names -> libtpu topology descriptions, with each generation's chip facts.

Two naming schemes exist and they count different things:
  Cloud accelerator types ('v5p-128', 'v4-8', 'v5e-256', 'v6e-64'): v4 and v5p count TensorCores
    (two per chip), so v5p-128 is 64 chips; v5e and v6e count chips, so v5e-256 is 256 chips.
  libtpu topologies ('v5p:4x4x4', 'v5e:16x16'): the chip grid itself.
Both are accepted; the report always prints the chip count.
"""
import dataclasses
import math
import os
import re


class TopologyError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Generation:
  cores_per_chip: int    # how many units a Cloud accelerator-type name counts per chip
  grid_dims: int         # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  hbm_bytes: int         # per chip, vendor datasheet
  peak_flops: float      # dense bf16 FLOP/s per chip, vendor datasheet
  chip_config: str = ''  # libtpu's chip config ('megacore': one device per v4 chip, as trained)


GENERATIONS = {
    'v4': Generation(2, 3, 32 * 2**30, 275e12, 'megacore'),
    'v5p': Generation(2, 3, 95 * 2**30, 459e12),
    'v5e': Generation(1, 2, 16 * 2**30, 197e12),
    'v6e': Generation(1, 2, 32 * 2**30, 918e12),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  grid: tuple[int, ...]
  cloud_name: str

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def libtpu_name(self) -> str:
    return f'{self.generation}:{"x".join(map(str, self.grid))}'

  @property
  def chip(self) -> Generation:
    return GENERATIONS[self.generation]

  def describe(self) -> str:
    return (f'{self.cloud_name} = {self.libtpu_name}: {self.chips} chips, '
            f'{self.chip.hbm_bytes / 2**30:.0f} GiB HBM and '
            f'{self.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each')


def default_grid(generation: str, chips: int) -> tuple[int, ...]:
  """The usual slice shape for a chip count: 3-D slices start at 2x2x1, 2-D at 1x1, and each
  doubling doubles the smallest side (the last of equals): 64 v5p chips -> 4x4x4, 256 v5e ->
  16x16."""
  dims = GENERATIONS[generation].grid_dims
  grid = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < math.prod(grid) or chips & (chips - 1):
    raise TopologyError(f'{chips} {generation} chips: expected a power of two '
                        f'>= {math.prod(grid)}; give the grid instead, e.g. {generation}:2x2x2')
  while math.prod(grid) < chips:
    smallest = min(grid)
    i = max(j for j, g in enumerate(grid) if g == smallest)
    grid[i] *= 2
  return tuple(grid)


def _generation(name: str) -> str:
  name = ALIASES.get(name, name)
  if name not in GENERATIONS:
    raise TopologyError(f'unknown TPU generation {name!r}; known: {sorted(GENERATIONS)}')
  return name


def parse(name: str) -> Topology:
  """'v5p-128' (Cloud name), 'v5p:4x4x4' (libtpu grid) -> Topology."""
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', name)
  if m:
    gen = _generation(m.group(1))
    grid = tuple(int(g) for g in m.group(2).split('x'))
    if len(grid) != GENERATIONS[gen].grid_dims or 0 in grid:
      raise TopologyError(f'{name}: a {gen} grid has {GENERATIONS[gen].grid_dims} positive sides')
    cores = math.prod(grid) * GENERATIONS[gen].cores_per_chip
    return Topology(gen, grid, f'{gen}-{cores}')
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', name)
  if not m:
    raise TopologyError(f'topology {name!r}: expected a Cloud name like v5p-128 / v5e-256 or a '
                        f'libtpu grid like v5p:4x4x4 / v5e:16x16')
  gen = _generation(m.group(1))
  count, per_chip = int(m.group(2)), GENERATIONS[gen].cores_per_chip
  if count % per_chip:
    raise TopologyError(f'{name}: {gen} names count TensorCores ({per_chip} per chip), so the '
                        f'number must be a multiple of {per_chip}')
  return Topology(gen, default_grid(gen, count // per_chip), f'{gen}-{count}')


def devices(topology: Topology) -> list:
  """The topology's TPU devices, for building a Mesh and compiling (needs libtpu, no TPU)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # A topology description opens no chip, so a second process (a test, another fit check) may
  # load libtpu beside the first instead of failing on libtpu's single-process lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  extra = {'chip_config_name': topology.chip.chip_config} if topology.chip.chip_config else {}
  return list(topologies.get_topology_desc(platform='tpu', topology_name=topology.libtpu_name,
                                           **extra).devices)


def libtpu_available() -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec('libtpu') is not None
