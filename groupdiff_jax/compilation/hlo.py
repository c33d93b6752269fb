"""What a compiled SPMD program executes per device: matmul FLOPs and collective bytes, each
weighted by how often its computation runs.

`compiled.cost_analysis()` counts the body of a while loop once, so a model whose layers run in a
`lax.scan` would be under-counted by the depth. Here the optimized HLO text is parsed instead: each
computation's multiplicity is the product of the trip counts of the while loops around it (a
scan's loop compares its counter, started at 0, against a constant), and FLOPs are summed over
dot and convolution instructions (2 x output elements x contracted size), also inside fusions.
Custom calls (Mosaic kernels such as splash attention) are opaque: they are counted apart, and
their FLOPs are taken from the kernel's own cost estimate where the HLO carries one.

Collective bytes are per device and per kind, by buffer size: all-gather its (gathered) result,
reduce-scatter its (full) operand, all-reduce / all-to-all / collective-permute their operand. A
ring all-reduce moves about twice its size over the wire (a reduce-scatter then an all-gather), so
`wire_bytes` weights it 2x; the other kinds move about their size once.
"""
import collections
import dataclasses
import math
import re
from typing import Sequence

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
               'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
WIRE_WEIGHT = {'all-reduce': 2.0}

_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_CALLEE = re.compile(r'\b(calls|body|condition|to_apply|true_computation|false_computation)='
                     r'%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_FLOPS_ESTIMATE = re.compile(r'"?flops"?\s*[:=]\s*"?([0-9]+)')


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str      # the result type text, e.g. 'bf16[28,1152]{...}' or a tuple '(f32[...], ...)'
  opcode: str
  operands: list[str]
  args: str       # the text inside the parentheses (a constant's value)
  attrs: str


def _split_type(rest: str) -> tuple[str, str]:
  """'bf16[2]{0} add(%a, %b), ...' -> ('bf16[2]{0}', 'add(%a, %b), ...'); tuples are balanced."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(' ')
  return head, tail


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  shape, rest = _split_type(m.group(2))
  op = re.match(r'([\w\-]+)\((.*)', rest)
  if not op:
    return None
  opcode, args = op.group(1), op.group(2)
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  operands = re.findall(r'%([\w.\-]+)', args[:end])
  return Instruction(m.group(1), shape, opcode, operands, args[:end], args[end + 1:])


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(d, tuple(int(x) for x in dims.split(',') if x)) for d, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> float:
  return sum(DTYPE_BYTES.get(d, 4) * math.prod(dims) for d, dims in arrays(shape))


def _logical_lines(text: str) -> list[str]:
  """One line per header, instruction or closing brace: an attribute that spans lines (a Mosaic
  kernel's metadata, some of whose lines start with '}}') is joined to its instruction."""
  out: list[str] = []
  for line in text.splitlines():
    starts = (line.startswith('  %') or line.startswith('  ROOT') or line == '}' or not line.strip()
              or _HEADER.match(line) or not out or line.startswith('HloModule'))
    if starts:
      out.append(line)
    else:
      out[-1] += ' ' + line
  return out


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """HLO text -> ({computation: instructions}, entry computation name)."""
  computations, entry, current = {}, None, None
  for line in _logical_lines(text):
    header = _HEADER.match(line)
    if header and not line.startswith(' '):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line == '}':
      current = None
      continue
    if current is not None:
      inst = _parse_instruction(line)
      if inst:
        computations[current].append(inst)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def trip_count(condition: list[Instruction], computations: dict | None = None) -> int:
  """Trip count of a counted loop (a scan): its condition compares the counter, which starts at
  0, with a constant, directly (TPU) or through a wrapping fusion (CPU)."""
  constants = {i.name: int(i.args) for i in condition
               if i.opcode == 'constant' and re.fullmatch(r'-?\d+', i.args.strip())}
  for inst in condition:
    bound = [constants[o] for o in inst.operands if o in constants]
    if not bound or inst.opcode not in ('compare', 'fusion'):
      continue
    text = inst.attrs
    if inst.opcode == 'fusion' and computations is not None:
      callee = dict(_CALLEE.findall(inst.attrs)).get('calls', '')
      text = ' '.join(i.attrs for i in computations.get(callee, []) if i.opcode == 'compare')
    direction = re.search(r'direction=(\w+)', text)
    return bound[0] + (1 if direction and direction.group(1) == 'LE' else 0)
  return 1


def multiplicities(computations: dict[str, list[Instruction]], entry: str,
                   branch_weights: Sequence[float] | None = None) -> dict[str, float]:
  """How many times each computation runs per execution of the entry computation, on the
  average chip. A conditional runs one branch: with `branch_weights` (the share of chips taking
  each branch, for conditionals with that many branches) the branches are weighted by them;
  otherwise every branch is counted, an upper bound."""
  times: dict[str, float] = collections.defaultdict(float)

  def visit(name: str, factor: float) -> None:
    times[name] += factor
    for inst in computations.get(name, ()):
      callees = dict((k, v) for k, v in _CALLEE.findall(inst.attrs))
      if inst.opcode == 'while':
        trips = trip_count(computations.get(callees.get('condition', ''), []), computations)
        visit(callees['body'], factor * trips)
        continue
      for key, callee in callees.items():
        if key not in ('to_apply', 'condition') and callee in computations:
          visit(callee, factor)
      branches = _BRANCHES.search(inst.attrs)
      callees = re.findall(r'%?([\w.\-]+)', branches.group(1)) if branches else []
      weights = (branch_weights if branch_weights and len(branch_weights) == len(callees)
                 else [1.0] * len(callees))
      for callee, weight in zip(callees, weights):
        visit(callee, factor * weight)

  visit(entry, 1.0)
  return times


def _contracted(inst: Instruction, shapes: dict[str, str]) -> int:
  """Size of the contracted dimensions of a dot / convolution."""
  if inst.opcode == 'dot':
    lhs = arrays(shapes.get(inst.operands[0], ''))
    dims = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', inst.attrs)
    if not lhs or not dims:
      return 0
    return math.prod(lhs[0][1][int(i)] for i in dims.group(1).split(',') if i)
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', inst.attrs)
  if not labels or len(inst.operands) < 2:
    return 0
  lhs = arrays(shapes.get(inst.operands[0], ''))
  rhs = arrays(shapes.get(inst.operands[1], ''))
  out = arrays(inst.shape)
  if not lhs or not rhs or not out:
    return 0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  features = math.prod(n for label, n in zip(rhs_labels, rhs[0][1]) if label == 'i')
  taps = 1
  for k, (size, stride, (lo, _), lhs_dilate, rhs_dilate) in enumerate(_window(inst.attrs)):
    n = lhs[0][1][lhs_labels.index(str(k))]
    positions = out[0][1][out_labels.index(str(k))]
    taps *= _real_taps(n, positions, size, stride, lo, lhs_dilate, rhs_dilate) / positions
  return features * taps


def _window(attrs: str) -> list[tuple[int, int, tuple[int, int], int, int]]:
  """Per spatial dimension: (size, stride, (pad low, pad high), lhs dilation, rhs dilation)."""
  m = re.search(r'window=\{([^}]*)\}', attrs)
  if not m:
    return []
  fields = dict(f.split('=', 1) for f in m.group(1).split())
  sizes = [int(v) for v in fields['size'].split('x')]
  def ints(key):
    return [int(v) for v in fields[key].split('x')] if key in fields else [1] * len(sizes)
  pads = ([tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')]
          if 'pad' in fields else [(0, 0)] * len(sizes))
  return list(zip(sizes, ints('stride'), pads, ints('lhs_dilate'), ints('rhs_dilate')))


def _real_taps(n: int, positions: int, size: int, stride: int, pad_low: int, lhs_dilate: int,
               rhs_dilate: int) -> int:
  """Window taps that land on real input elements, summed over the output positions. TPU writes
  a batched matmul's batch dimension as a window over a padded or dilated input of which each
  output sees one element: counting every tap would overstate its FLOPs by the window size."""
  total = 0
  for o in range(positions):
    for j in range(size):
      p = o * stride + j * rhs_dilate - pad_low
      total += 0 <= p <= (n - 1) * lhs_dilate and p % lhs_dilate == 0
  return total


@dataclasses.dataclass
class Analysis:
  flops: float = 0.0                   # dots + convolutions (+ kernels' own estimates)
  custom_calls: float = 0.0            # executions of Mosaic kernels (opaque to the parse)
  custom_call_flops: float = 0.0       # of which the kernels declare this many FLOPs
  collective_bytes: dict[str, float] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
  collective_count: dict[str, float] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(COLLECTIVES, 0.0))
  while_trips: list[int] = dataclasses.field(default_factory=list)

  @property
  def wire_bytes(self) -> float:
    return sum(WIRE_WEIGHT.get(k, 1.0) * v for k, v in self.collective_bytes.items())


def _collective_kind(opcode: str) -> str | None:
  base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
  return base if base in COLLECTIVES else None


def _collective_bytes(kind: str, inst: Instruction, shapes: dict[str, str]) -> float:
  if kind == 'reduce-scatter':
    return sum(nbytes(shapes.get(o, '')) for o in inst.operands)
  if inst.opcode.endswith('-start'):  # async: the result tuple holds (operands, results, ...)
    parts = arrays(inst.shape)
    sizes = [DTYPE_BYTES.get(d, 4) * math.prod(dims) for d, dims in parts]
    return max(sizes, default=0.0)
  return nbytes(inst.shape)


def analyze(text: str, branch_weights: Sequence[float] | None = None) -> Analysis:
  computations, entry = parse_module(text)
  times = multiplicities(computations, entry, branch_weights)
  shapes = {inst.name: inst.shape for insts in computations.values() for inst in insts}
  out = Analysis()
  for name, insts in computations.items():
    factor = times.get(name, 0.0)
    if not factor:
      continue
    for inst in insts:
      if inst.opcode in ('dot', 'convolution'):
        out.flops += factor * 2 * math.prod(arrays(inst.shape)[0][1]) * _contracted(inst, shapes)
      elif inst.opcode == 'custom-call' and 'tpu_custom_call' in inst.attrs:
        out.custom_calls += factor
        estimate = _FLOPS_ESTIMATE.search(inst.attrs)
        if estimate:
          out.custom_call_flops += factor * float(estimate.group(1))
          out.flops += factor * float(estimate.group(1))
      elif inst.opcode == 'while':
        cond = dict(_CALLEE.findall(inst.attrs)).get('condition', '')
        out.while_trips.append(trip_count(computations.get(cond, []), computations))
      kind = _collective_kind(inst.opcode)
      if kind:
        out.collective_bytes[kind] += factor * _collective_bytes(kind, inst, shapes)
        out.collective_count[kind] += factor
  return out
