"""Convert official PyTorch SiT / DiT / REPA / GroupDiff checkpoints to a weights-only Orbax one.

  python -m groupdiff_jax.convert --src=SiT-XL-2-256x256.pt --kind=sit --out=/ckpt/sit_xl2

The output (`params/`, `ema/` where the file has EMA weights, `meta/`) is what
`--config.init_from=DIR` fine-tunes from (fresh optimizer) and what the sampling job loads. The
model size, patch, channels and classes are inferred from tensor shapes; `meta.model` records
them together with the time convention, so the printed `--config.model.*` flags reproduce the
model. Bad input (unreadable file, missing/unexpected keys, shapes that fit no size) exits
non-zero with every offending key listed, and nothing is written to --out: the checkpoint is
written to a temporary sibling directory and renamed at the very end.
"""
import dataclasses
import os
import shutil
from typing import Any

import numpy as np
from absl import flags

from groupdiff_jax import cli, convert_io
from groupdiff_jax import convert_keys
from groupdiff_jax.convert_keys import ConversionError, params_to_official  # re-exported
from groupdiff_jax.models import sit

__all__ = ['KINDS', 'ConversionError', 'convert_state_dict', 'convert_file', 'params_to_official',
           'load_converted']

DIT_NOTE = (
    'DiT is a DDPM model: eps + learned variance (8 channels) over 1000 integer timesteps, noise '
    'at t=999; the converted backbone is exact for that diffusion. Fine-tune it with the DDPM '
    'objective (configs/dit_xl.py: --config.transport.objective=ddpm) and sample it with '
    '--config.sample.sampler=ddpm (configs/sample_dit_xl.py); docs/dit.md. Under the '
    'flow-matching objective (t in [0, 1]) it is only an initialisation: its time embedding was '
    'trained on [0, 999] and its output is eps, not a velocity, so expect a re-adaptation phase '
    'rather than the DiT FID.')


@dataclasses.dataclass(frozen=True)
class Kind:
  """How one family of official checkpoints maps onto our model."""
  family: str                  # model-name family ('SiT' / 'DiT')
  time_convention: str         # config.model.time_convention for our SiT module
  meta_time: str               # what the checkpoint records: noise position / objective
  objective: str
  strip: tuple[str, ...] = ()  # key prefixes around the backbone
  drop: tuple[str, ...] = ()   # key prefixes of heads we do not use (dropped with a note)
  note: str = ''


KINDS = {
    'sit': Kind('SiT', 'noise_at_0', 'noise_at_0', 'flow_velocity', note=(
        'original SiT puts noise at t=0: recorded time_convention=noise_at_0, so the model feeds '
        '1-t to its time embedder and negates the velocity, and it trains/samples in our '
        'convention (noise at t=1). SiT trains no loss on channels 4-7 of an 8-channel head '
        '(--drop_sigma removes them).')),
    'dit': Kind('DiT', 'noise_at_1', 'ddpm_1000', 'ddpm_eps_learned_variance', note=DIT_NOTE),
    'repa': Kind('SiT', 'noise_at_1', 'noise_at_1', 'flow_velocity', drop=('projectors.',), note=(
        'REPA uses our convention (noise at t=1); its projector heads (REPA alignment loss) are '
        'dropped, as GroupDiff does when it fine-tunes from REPA.')),
    'groupdiff': Kind('SiT', 'noise_at_1', 'noise_at_1', 'flow_velocity', strip=('denoiser.',),
                      note='GroupDiff-SiT uses our convention (noise at t=1).'),
    # GroupDiff's DiT release (gdiff-l-4-dit-xl-2-resume.pth): GroupDiff names, DiT's DDPM.
    'groupdiff_dit': Kind('DiT', 'noise_at_1', 'ddpm_1000', 'ddpm_eps_learned_variance',
                          strip=('denoiser.',), note=DIT_NOTE),
}
# Output heads that suggest another kind: (kind, learn_sigma) -> advice.
KIND_HINTS = {
    ('groupdiff', True): 'the file has 8 output channels (learned sigma), as GroupDiff-DiT: if it '
                         'is a DiT (DDPM) checkpoint, convert it with --kind=groupdiff_dit',
    ('dit', False): 'the file has no learned-sigma channels, which the DiT DDPM sampler needs; '
                    'the backbone converts, but diffusion.ddpm cannot use it',
}
DEFAULT_GROUP_TABLE = 4  # rows of a fresh sample-embedding table (GroupDiff's num_max_sample)


@dataclasses.dataclass
class Converted:
  cfg: sit.SiTConfig
  name: str
  params: dict
  ema: dict | None
  notes: list[str]


def _prepare(sd: dict, kind: Kind, notes: list[str], label: str) -> dict:
  sd = convert_io.strip_prefixes(sd, convert_io.GENERIC_PREFIXES + kind.strip)
  dropped = sorted(k for k in sd if k.startswith(kind.drop)) if kind.drop else []
  if dropped:
    notes.append(f'{label}: dropped {len(dropped)} tensors under '
                 f'{", ".join(kind.drop)} (e.g. {dropped[0]})')
  return {k: v for k, v in sd.items() if k not in set(dropped)}


def _normal_table(rows: int, hidden: int, seed: int) -> np.ndarray:
  # GroupDiff's own initialisation, N(0, 0.02): what its strict=False load leaves when it
  # fine-tunes from a checkpoint without the table.
  return (np.random.default_rng(seed).standard_normal((rows, hidden)) * 0.02).astype(np.float32)


# How a sample-embedding table is made for a file that has none.
#   zeros:  (default) the converted model computes exactly the file's function, so sampling it
#           reproduces the original; fine-tuning still trains the table (its gradient is not 0).
#   normal: GroupDiff's own fine-tuning init, N(0, 0.02); the converted model then differs
#           slightly from the file's (c gains s_emb[id]) until it is fine-tuned.
SAMPLE_INITS = {
    'normal': _normal_table,
    'zeros': lambda rows, hidden, seed: np.zeros((rows, hidden), np.float32),
}


def convert_state_dict(params_sd: dict, kind: str, *, ema_sd: dict | None = None,
                       heads: int | None = None, input_size: int | None = None,
                       max_group_size: int | None = None, drop_sigma: bool = False,
                       sample_init: str = 'zeros', seed: int = 0) -> Converted:
  """Official-name state dict(s) -> our pure-dict params (and EMA), with the inferred config.

  max_group_size: None keeps the file's sample-embedding table (GroupDiff) or adds a fresh
  4-row one made by SAMPLE_INITS[sample_init] (others, so the result fits the default GroupDiff
  model); 0 omits it.
  """
  if kind not in KINDS:
    raise ConversionError(f'unknown --kind={kind!r}; known: {", ".join(KINDS)}')
  if sample_init not in SAMPLE_INITS:
    raise ConversionError(f'unknown sample_init {sample_init!r}; known: {", ".join(SAMPLE_INITS)}')
  spec, notes = KINDS[kind], []
  trees = {'params': _prepare(params_sd, spec, notes, 'params')}
  if ema_sd is not None:
    trees['ema'] = _prepare(ema_sd, spec, notes, 'ema')
  info = convert_keys.infer(trees['params'], heads=heads, input_size=input_size)
  if drop_sigma and info.learn_sigma:
    trees = {k: convert_keys.drop_sigma(v, info.in_channels, info.patch) for k, v in trees.items()}
    info = dataclasses.replace(info, learn_sigma=False)
    notes.append('dropped the 4 learned-sigma output channels (--drop_sigma)')
  rows = info.max_group_size
  if max_group_size is not None and rows and max_group_size != rows:
    raise ConversionError(f'--max_group_size={max_group_size} contradicts the file\'s '
                          f'sample_embedder.embedding_table ({rows} rows)')
  if max_group_size is None and not rows:
    max_group_size = DEFAULT_GROUP_TABLE
  if not rows and max_group_size:
    table = SAMPLE_INITS[sample_init](max_group_size, info.hidden, seed)
    for sd in trees.values():
      sd['sample_embedder.embedding_table.weight'] = table
    notes.append(f'added a {max_group_size}-row GroupDiff sample-embedding table '
                 f'(--sample_init={sample_init}' + (
                     ', N(0, 0.02) as GroupDiff fine-tuning: the model differs slightly from the '
                     'file\'s until fine-tuned; --sample_init=zeros keeps it exact'
                     if sample_init == 'normal' else ': the model computes exactly the file\'s '
                     'function and fine-tuning trains the table; --sample_init=normal is '
                     'GroupDiff\'s own N(0, 0.02) init') +
                 '; --max_group_size=0 omits the table)')
  elif rows and max_group_size == 0:
    raise ConversionError('--max_group_size=0 would drop the file\'s sample_embedder table')
  cfg = info.sit_config(max_group_size=max_group_size if not rows else rows,
                        time_convention=spec.time_convention, dtype='float32')
  out = {}
  for label, sd in trees.items():
    try:
      out[label] = convert_keys.official_to_params(sd, cfg)
    except ConversionError as e:
      raise ConversionError(f'{label}: {e}') from e
  if (kind, cfg.learn_sigma) in KIND_HINTS:
    notes.append('WARNING: ' + KIND_HINTS[kind, cfg.learn_sigma])
  if spec.note:
    notes.append(spec.note)
  return Converted(cfg, info.model_name(spec.family), out['params'], out.get('ema'), notes)


def model_meta(conv: Converted) -> dict[str, Any]:
  """The `config.model` fields that rebuild this model."""
  c = conv.cfg
  return dict(name=conv.name, input_size=c.input_size, in_channels=c.in_channels,
              num_classes=c.num_classes, learn_sigma=c.learn_sigma,
              max_group_size=c.max_group_size, time_convention=c.time_convention)


def config_flags(conv: Converted) -> str:
  return ' '.join(f'--config.model.{k}={v}' for k, v in model_meta(conv).items())


def write(conv: Converted, out: str, meta: dict) -> None:
  """Writes the weights-only checkpoint to a temporary sibling and renames it to `out`."""
  import jax  # pylint: disable=import-outside-toplevel
  from groupdiff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(f'--out={out} exists and is not empty; choose a new directory')
  tmp = f'{out}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    ckpt = checkpoint.Checkpointer(tmp, max_to_keep=1, async_save=False)
    to_jax = lambda tree: None if tree is None else jax.tree.map(jax.numpy.asarray, tree)
    ckpt.save_weights(0, params=to_jax(conv.params), ema=to_jax(conv.ema), meta=meta)
    ckpt.close()
    if os.path.isdir(out):
      os.rmdir(out)  # an empty directory the user made beforehand
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def convert_file(src: str, kind: str, out: str, *, heads: int | None = None,
                 input_size: int | None = None, max_group_size: int | None = None,
                 drop_sigma: bool = False, sample_init: str = 'zeros',
                 allow_pickle: bool = False, seed: int = 0, verbose: bool = True
                 ) -> dict[str, Any]:
  """Reads `src`, converts it and writes the checkpoint to `out`. Returns the written meta."""
  loaded = convert_io.read(src, allow_pickle=allow_pickle)
  conv = convert_state_dict(loaded.params, kind, ema_sd=loaded.ema, heads=heads,
                            input_size=input_size, max_group_size=max_group_size,
                            drop_sigma=drop_sigma, sample_init=sample_init, seed=seed)
  spec = KINDS[kind]
  notes = loaded.notes + conv.notes
  meta = {'model': model_meta(conv), 'source': os.path.abspath(src), 'kind': kind,
          'time_convention': spec.meta_time, 'objective': spec.objective,
          'heads': conv.cfg.heads, 'has_ema': conv.ema is not None, 'notes': notes}
  write(conv, out, meta)
  if verbose:
    for note in notes:
      print(f'note: {note}')
    print(f'wrote {os.path.abspath(out)}: {conv.name} ({convert_keys.describe(conv.cfg)}), '
          f'{"params + ema" if conv.ema is not None else "params"}')
    print(f'fine-tune with: --config.init_from={os.path.abspath(out)} {config_flags(conv)}')
  return meta


def load_converted(path: str, *, dtype: str = 'float32', prefer_ema: bool = True,
                   **overrides) -> tuple[sit.SiT, dict]:
  """Builds the model that `meta.model` describes and loads the weights (EMA if present).

  `overrides` set SiTConfig fields (e.g. time_convention, fixed_sample_ids, attention) and win
  over what the checkpoint records."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from groupdiff_jax import checkpoint  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(checkpoint.find_checkpoint_dir(path), read_only=True,
                                 async_save=False)
  meta = ckpt.read_meta(ckpt.steps()[-1])
  ckpt.close()
  cfg = sit.config_from_meta(meta['model'], **{'dtype': dtype, **overrides})
  # Built abstractly: the checkpoint supplies every parameter, so skip the random init.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: sit.create(cfg)))
  target = nnx.to_pure_dict(state)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, ema, meta = checkpoint.load_weights(
      path, params=target, shardings=jax.tree.map(lambda _: device, target),
      prefer_ema=prefer_ema)
  nnx.replace_by_pure_dict(state, ema if ema is not None else params)
  return nnx.merge(graphdef, state), meta


# --- command line ---------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no global flags."""
  flags.DEFINE_string('src', None, 'checkpoint file: .pt / .pth / .safetensors')
  flags.DEFINE_enum('kind', None, list(KINDS), 'which official code base wrote the file')
  flags.DEFINE_string('out', None, 'output directory (must not exist or be empty)')
  flags.DEFINE_integer('heads', None, 'attention heads, for sizes outside the published table')
  flags.DEFINE_integer('input_size', None, 'latent side length when the file has no pos_embed')
  flags.DEFINE_integer('max_group_size', None, 'sample-embedding rows: default keeps the file\'s '
                       'table (groupdiff) or adds a fresh 4-row one; 0 omits it')
  flags.DEFINE_enum('sample_init', 'zeros', list(SAMPLE_INITS), 'init of an added sample-'
                    'embedding table: zeros = exactly the file\'s model (fine-tuning trains it), '
                    'normal = GroupDiff\'s N(0, 0.02) init')
  flags.DEFINE_bool('drop_sigma', False,
                    'drop the learned-sigma output channels (SiT ignores them)')
  flags.DEFINE_bool('allow_pickle', False,
                    'torch.load with weights_only=False (trusted files only)')
  flags.DEFINE_integer('seed', 0, 'seed of a freshly added sample-embedding table')


def main(argv: list[str]) -> None:
  del argv
  missing = [n for n in ('src', 'kind', 'out') if not getattr(FLAGS, n)]
  if missing:
    raise cli.UserError(f'required flags: {", ".join("--" + n for n in missing)}')
  convert_file(FLAGS.src, FLAGS.kind, FLAGS.out, heads=FLAGS.heads,
               input_size=FLAGS.input_size, max_group_size=FLAGS.max_group_size,
               drop_sigma=FLAGS.drop_sigma, sample_init=FLAGS.sample_init,
               allow_pickle=FLAGS.allow_pickle, seed=FLAGS.seed)


if __name__ == '__main__':
  define_flags()
  cli.run(main, dirs=('out',), user_errors=lambda: (ConversionError,))
