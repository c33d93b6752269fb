"""Official DiT/SiT/REPA/GroupDiff state-dict names <-> our SiT parameter tree (numpy only).

The official PyTorch modules (facebookresearch/DiT, willisma/SiT, sihyun-yu/REPA, GroupDiff's
Denoiser) share one naming scheme; this module maps it onto `groupdiff_jax.models.sit` in both
directions, infers the model size from tensor shapes and checks a state dict strictly: every
missing, unexpected or mis-shaped key is collected and reported together.

The mapping is a registry (`RULES`): official template, our path, and a named transform. Block
entries carry `{i}`; our block parameters are stacked over layers along a leading axis.
"""
import dataclasses
import re
from typing import Callable

import numpy as np

from groupdiff_jax.models import sit

FREQ_DIM = sit.FREQ_DIM


class ConversionError(ValueError):
  """A state dict that does not fit any supported model; the message lists every offence."""


# --- transforms: official tensor <-> our array --------------------------------------------------

def _patch_to_ours(w: np.ndarray) -> np.ndarray:
  # Conv weight [D, C, p, p] -> dense kernel over patch vectors ordered (p_row, p_col, c).
  d, c, p, _ = w.shape
  return w.transpose(2, 3, 1, 0).reshape(p * p * c, d)


def _patch_to_official(k: np.ndarray, c: int) -> np.ndarray:
  pp_c, d = k.shape
  p = int(round((pp_c // c) ** 0.5))
  return k.reshape(p, p, c, d).transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Transform:
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_official: Callable[[np.ndarray, 'sit.SiTConfig'], np.ndarray]


TRANSFORMS = {
    'identity': Transform(lambda w: w, lambda k, cfg: k),
    'linear': Transform(lambda w: w.T, lambda k, cfg: k.T),  # torch Linear is [out, in]
    'patch': Transform(_patch_to_ours, lambda k, cfg: _patch_to_official(k, cfg.in_channels)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  official: str            # template; '{i}' marks a per-block entry
  ours: tuple[str, ...]    # path in nnx.state(model, nnx.Param).to_pure_dict()
  transform: str
  optional_group: str = ''  # '' = always present; 'sample' = only with a sample-embedding table


def _linear(official: str, ours: tuple[str, ...], group: str = '') -> list[Rule]:
  return [Rule(f'{official}.weight', ours + ('kernel',), 'linear', group),
          Rule(f'{official}.bias', ours + ('bias',), 'identity', group)]


RULES: tuple[Rule, ...] = tuple(
    [Rule('x_embedder.proj.weight', ('x_embedder', 'kernel'), 'patch'),
     Rule('x_embedder.proj.bias', ('x_embedder', 'bias'), 'identity')]
    + _linear('t_embedder.mlp.0', ('t_embedder', 'mlp_0'))
    + _linear('t_embedder.mlp.2', ('t_embedder', 'mlp_2'))
    + [Rule('y_embedder.embedding_table.weight', ('y_embedder', 'embedding_table'), 'identity'),
       Rule('sample_embedder.embedding_table.weight', ('sample_embedder', 'embedding_table'),
            'identity', 'sample')]
    + _linear('blocks.{i}.attn.qkv', ('blocks', 'qkv'))
    + _linear('blocks.{i}.attn.proj', ('blocks', 'proj'))
    + _linear('blocks.{i}.mlp.fc1', ('blocks', 'fc1'))
    + _linear('blocks.{i}.mlp.fc2', ('blocks', 'fc2'))
    + _linear('blocks.{i}.adaLN_modulation.1', ('blocks', 'adaLN_modulation'))
    + _linear('final_layer.adaLN_modulation.1', ('final_layer', 'adaLN_modulation'))
    + _linear('final_layer.linear', ('final_layer', 'linear')))

POS_EMBED = 'pos_embed'  # a frozen buffer: checked against our table, never loaded


# --- size inference -------------------------------------------------------------------------

# (depth, hidden) -> heads for every published size: DiT/SiT S/B/L/XL and GroupDiff's SIZE_DICT
# (small 8x512, base, large, xl, huge 32x1280). Anything else needs --heads.
KNOWN_HEADS = {(d, h): n for d, h, n in sit.SIZES.values()}
KNOWN_HEADS.update({(8, 512): 8, (12, 768): 12, (24, 1024): 16, (28, 1152): 16, (32, 1280): 16})


@dataclasses.dataclass(frozen=True)
class Inferred:
  """What the tensor shapes say about the model."""
  depth: int
  hidden: int
  heads: int
  patch: int
  in_channels: int
  input_size: int
  num_classes: int
  learn_sigma: bool
  max_group_size: int

  def model_name(self, family: str) -> str:
    for size, (d, h, n) in sit.SIZES.items():
      if (d, h, n) == (self.depth, self.hidden, self.heads):
        return f'{family}-{size}/{self.patch}'
    return f'{family}-d{self.depth}h{self.hidden}n{self.heads}/{self.patch}'

  def sit_config(self, **overrides) -> sit.SiTConfig:
    fields = dict(depth=self.depth, hidden=self.hidden, heads=self.heads, patch=self.patch,
                  input_size=self.input_size, in_channels=self.in_channels,
                  num_classes=self.num_classes, learn_sigma=self.learn_sigma,
                  max_group_size=self.max_group_size)
    fields.update(overrides)
    return sit.SiTConfig(**fields)


def _shape(sd: dict, key: str) -> tuple[int, ...] | None:
  return tuple(sd[key].shape) if key in sd else None


def infer(sd: dict[str, np.ndarray], *, heads: int | None = None, input_size: int | None = None
          ) -> Inferred:
  """Model size from shapes: hidden/patch/channels from the patch conv, depth from block count,
  heads from the size table (or `heads`), input size from pos_embed (or `input_size`)."""
  problems = []
  w = sd.get('x_embedder.proj.weight')
  if w is None or w.ndim != 4 or w.shape[2] != w.shape[3]:
    raise ConversionError(
        'cannot infer the model: x_embedder.proj.weight must be a [hidden, C, p, p] conv weight, '
        f'got {_shape(sd, "x_embedder.proj.weight")}; keys seen: {_summarise(sorted(sd))}')
  hidden, in_channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
  block_ids = {int(m.group(1)) for k in sd for m in [re.match(r'blocks\.(\d+)\.', k)] if m}
  depth = max(block_ids) + 1 if block_ids else 0
  if block_ids != set(range(depth)) or not depth:
    problems.append(f'transformer blocks must be numbered 0..N-1, found {sorted(block_ids)}')
  if heads is None:
    heads = KNOWN_HEADS.get((depth, hidden))
    if heads is None:
      problems.append(
          f'depth {depth} x hidden {hidden} is no published size '
          f'({sorted(KNOWN_HEADS)}); pass --heads to convert a custom size')
  elif hidden % heads:
    problems.append(f'--heads={heads} does not divide hidden {hidden}')
  table = sd.get('y_embedder.embedding_table.weight')
  num_classes = int(table.shape[0]) - 1 if table is not None and table.ndim == 2 else 0
  if table is None or table.ndim != 2 or num_classes < 1:
    problems.append(f'y_embedder.embedding_table.weight: expected [num_classes + 1, {hidden}], '
                    f'got {_shape(sd, "y_embedder.embedding_table.weight")}')
  final = sd.get('final_layer.linear.weight')
  learn_sigma = False
  if final is None or final.ndim != 2 or final.shape[0] % (patch * patch):
    problems.append(f'final_layer.linear.weight: expected [p*p*C_out, {hidden}] with p={patch}, '
                    f'got {_shape(sd, "final_layer.linear.weight")}')
  else:
    c_out = final.shape[0] // (patch * patch)
    if c_out not in (in_channels, 2 * in_channels):
      problems.append(f'final_layer.linear.weight {tuple(final.shape)}: {c_out} output channels '
                      f'is neither {in_channels} nor {2 * in_channels} (learn_sigma)')
    learn_sigma = c_out == 2 * in_channels
  samples = sd.get('sample_embedder.embedding_table.weight')
  max_group_size = int(samples.shape[0]) if samples is not None and samples.ndim == 2 else 0
  pos = sd.get(POS_EMBED)
  if pos is not None:
    tokens = int(np.prod(pos.shape[:-1]))
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens or pos.shape[-1] != hidden:
      problems.append(f'pos_embed {tuple(pos.shape)} is not a square [1, T, {hidden}] table')
    elif input_size is not None and input_size != grid * patch:
      problems.append(f'--input_size={input_size} contradicts pos_embed {tuple(pos.shape)} '
                      f'(input size {grid * patch})')
    input_size = grid * patch
  elif input_size is None:
    input_size = 32  # 256x256 images through the SD-VAE: every released checkpoint
  if input_size % patch:
    problems.append(f'patch {patch} does not divide input size {input_size}')
  if problems:
    raise ConversionError('the state dict fits no model:\n  ' + '\n  '.join(problems))
  return Inferred(depth=depth, hidden=hidden, heads=heads, patch=patch, in_channels=in_channels,
                  input_size=input_size, num_classes=num_classes, learn_sigma=learn_sigma,
                  max_group_size=max_group_size)


# --- mapping ----------------------------------------------------------------------------------

def _active_rules(cfg: sit.SiTConfig):
  for rule in RULES:
    if rule.optional_group == 'sample' and not cfg.max_group_size:
      continue
    yield rule


def expected_shapes(cfg: sit.SiTConfig) -> dict[str, tuple[int, ...]]:
  """Official key -> shape for a model config (pos_embed excluded)."""
  d, p, c = cfg.hidden, cfg.patch, cfg.in_channels
  mlp = int(d * cfg.mlp_ratio)
  per_block = {'attn.qkv.weight': (3 * d, d), 'attn.qkv.bias': (3 * d,),
               'attn.proj.weight': (d, d), 'attn.proj.bias': (d,),
               'mlp.fc1.weight': (mlp, d), 'mlp.fc1.bias': (mlp,),
               'mlp.fc2.weight': (d, mlp), 'mlp.fc2.bias': (d,),
               'adaLN_modulation.1.weight': (6 * d, d), 'adaLN_modulation.1.bias': (6 * d,)}
  shapes = {'x_embedder.proj.weight': (d, c, p, p), 'x_embedder.proj.bias': (d,),
            't_embedder.mlp.0.weight': (d, FREQ_DIM), 't_embedder.mlp.0.bias': (d,),
            't_embedder.mlp.2.weight': (d, d), 't_embedder.mlp.2.bias': (d,),
            'y_embedder.embedding_table.weight': (cfg.num_classes + 1, d),
            'final_layer.adaLN_modulation.1.weight': (2 * d, d),
            'final_layer.adaLN_modulation.1.bias': (2 * d,),
            'final_layer.linear.weight': (p * p * cfg.out_channels, d),
            'final_layer.linear.bias': (p * p * cfg.out_channels,)}
  if cfg.max_group_size:
    shapes['sample_embedder.embedding_table.weight'] = (cfg.max_group_size, d)
  for i in range(cfg.depth):
    shapes.update({f'blocks.{i}.{k}': s for k, s in per_block.items()})
  return shapes


def check(sd: dict[str, np.ndarray], cfg: sit.SiTConfig) -> None:
  """Strict check: raises ConversionError listing missing, unexpected and mis-shaped keys."""
  want = expected_shapes(cfg)
  have = {k: tuple(v.shape) for k, v in sd.items() if k != POS_EMBED}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  lines = []
  if missing:
    lines.append(f'missing keys ({len(missing)}): ' + ', '.join(
        f'{k} (expected {want[k]})' for k in missing))
  if unexpected:
    lines.append(f'unexpected keys ({len(unexpected)}): ' + ', '.join(
        f'{k} {have[k]}' for k in unexpected))
  if bad:
    lines.append(f'wrong shapes ({len(bad)}): ' + ', '.join(
        f'{k} {have[k]} (expected {want[k]})' for k in bad))
  if POS_EMBED in sd:
    ours = sit.sincos_pos_embed(cfg.hidden, cfg.input_size // cfg.patch)
    theirs = np.asarray(sd[POS_EMBED], np.float32).reshape(-1, cfg.hidden)
    if theirs.shape != ours.shape or np.abs(theirs - ours).max() > 1e-4:
      # Not loaded, but a different table means the file's model computes another function.
      grid = cfg.input_size // cfg.patch
      lines.append(f'pos_embed {tuple(sd[POS_EMBED].shape)} differs from the 2-D sin-cos table '
                   f'this model recomputes (grid {grid}, hidden {cfg.hidden})')
  if lines:
    raise ConversionError(f'state dict does not match {describe(cfg)}:\n  ' + '\n  '.join(lines))


def describe(cfg: sit.SiTConfig) -> str:
  return (f'depth {cfg.depth}, hidden {cfg.hidden}, heads {cfg.heads}, patch {cfg.patch}, '
          f'input {cfg.input_size}, channels {cfg.in_channels}->{cfg.out_channels}, '
          f'{cfg.num_classes} classes, sample table {cfg.max_group_size}')


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def official_to_params(sd: dict[str, np.ndarray], cfg: sit.SiTConfig) -> dict:
  """Checked official state dict -> our nested pure dict (float32 numpy; blocks stacked)."""
  check(sd, cfg)
  params: dict = {}
  for rule in _active_rules(cfg):
    fn = TRANSFORMS[rule.transform].to_ours
    if '{i}' in rule.official:
      value = np.stack([fn(np.asarray(sd[rule.official.format(i=i)]))
                        for i in range(cfg.depth)])
    else:
      value = fn(np.asarray(sd[rule.official]))
    _set(params, rule.ours, np.ascontiguousarray(value, dtype=np.float32))
  return params


def params_to_official(params: dict, cfg: sit.SiTConfig, *, include_pos_embed: bool = True
                       ) -> dict[str, np.ndarray]:
  """Our pure dict -> official-name state dict (numpy). The inverse of `official_to_params`."""
  sd: dict[str, np.ndarray] = {}
  for rule in _active_rules(cfg):
    fn = TRANSFORMS[rule.transform].to_official
    value = np.asarray(_get(params, rule.ours))
    if '{i}' in rule.official:
      for i in range(cfg.depth):
        sd[rule.official.format(i=i)] = np.ascontiguousarray(fn(value[i], cfg))
    else:
      sd[rule.official] = np.ascontiguousarray(fn(value, cfg))
  if include_pos_embed:
    sd[POS_EMBED] = sit.sincos_pos_embed(cfg.hidden, cfg.input_size // cfg.patch)[None]
  return sd


def drop_sigma(sd: dict[str, np.ndarray], in_channels: int, patch: int) -> dict[str, np.ndarray]:
  """Keeps only the first `in_channels` output channels of the final linear layer.

  SiT trains 8 output channels but its forward drops the last 4 (no loss reaches them), so
  dropping them changes nothing the model was trained to compute.
  """
  out = dict(sd)
  w, b = sd['final_layer.linear.weight'], sd['final_layer.linear.bias']
  c_out = w.shape[0] // (patch * patch)
  out['final_layer.linear.weight'] = w.reshape(patch, patch, c_out, -1)[:, :, :in_channels] \
      .reshape(patch * patch * in_channels, -1)
  out['final_layer.linear.bias'] = b.reshape(patch, patch, c_out)[:, :, :in_channels].reshape(-1)
  return out


def _summarise(keys: list[str], limit: int = 12) -> str:
  return ', '.join(keys[:limit]) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')
