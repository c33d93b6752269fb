"""SiT / DiT backbone (adaLN-Zero transformer on latent patches) with the GroupDiff change.

The backbone follows the official DiT/SiT definition: patch embedding, fixed 2-D sin-cos position
embedding, timestep embedder ([cos, sin] of 256 frequencies), label embedder with a null class
for CFG, adaLN-Zero blocks and a final adaLN layer, each with the official initialisation.

The GroupDiff change is two things, both marked `GroupDiff` below:
  (i)  group attention: the tokens of the M images of a group (contiguous in the batch) are joined
       along the sequence axis for self-attention only, (B*M, T, D) -> (B, M*T, D) and back. The
       group size is an int, or a `group_attention.Groups` for a batch that mixes group sizes
       (conditional singles and unconditional groups, one pass); models/group_attention.py
       partitions it over the mesh;
  (ii) a learnable sample embedding (max_group_size x hidden) added to the conditioning vector,
       its ids a fresh random permutation per group on every call (or fixed ids).
With group size 1 the model is exactly SiT/DiT.

Images are NHWC. Parameters carry logical axis names ('embed', 'mlp', 'heads', 'vocab', 'layers');
the mesh rules in the config map them onto devices (groupdiff_jax.sharding).
"""
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from groupdiff_jax import sharding
from groupdiff_jax.models import dense
from groupdiff_jax.models.attention import member_attention
from groupdiff_jax.models.group_attention import (Groups, active_platform, as_groups,
                                                  group_attention)

# name -> (depth, hidden, heads); the official DiT/SiT sizes.
SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
FAMILIES = ('SiT', 'DiT')
FREQ_DIM = 256  # sinusoidal timestep features


class ModelConfigError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class SiTConfig:
  depth: int
  hidden: int
  heads: int
  patch: int
  input_size: int = 32
  in_channels: int = 4
  num_classes: int = 1000
  learn_sigma: bool = False
  mlp_ratio: float = 4.0
  max_group_size: int = 4
  fixed_sample_ids: bool = False
  attention: str = 'auto'
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  remat: bool = False
  residuals: str = 'auto'
  dense_grads: str = 'auto'
  layer_loop: str = 'auto'
  time_convention: str = 'noise_at_1'

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch) ** 2


def parse_name(name: str) -> tuple[str, int, int, int, int]:
  """'SiT-XL/2' -> (family, depth, hidden, heads, patch). Custom sizes: 'SiT-d4h64n4/2'."""
  m = re.fullmatch(r'(SiT|DiT)-(S|B|L|XL|d(\d+)h(\d+)n(\d+))/(\d+)', name)
  if not m:
    raise ModelConfigError(
        f'unknown model name {name!r}; expected FAMILY-SIZE/PATCH with FAMILY in {FAMILIES}, '
        f'SIZE in {sorted(SIZES)} (or dDEPTHhHIDDENnHEADS), e.g. SiT-XL/2')
  family, size, patch = m.group(1), m.group(2), int(m.group(6))
  if size in SIZES:
    depth, hidden, heads = SIZES[size]
  else:
    depth, hidden, heads = int(m.group(3)), int(m.group(4)), int(m.group(5))
  return family, depth, hidden, heads, patch


def config_from(model_cfg) -> SiTConfig:
  """Builds a SiTConfig from the `config.model` block."""
  _, depth, hidden, heads, patch = parse_name(model_cfg.name)
  if model_cfg.input_size % patch:
    raise ModelConfigError(f'patch {patch} does not divide input size {model_cfg.input_size}')
  if hidden % heads or hidden % 4:
    raise ModelConfigError(f'hidden {hidden} must be divisible by heads {heads} and by 4')
  if model_cfg.time_convention not in ('noise_at_1', 'noise_at_0'):
    raise ModelConfigError(f'unknown time_convention {model_cfg.time_convention!r}')
  residuals = model_cfg.get('residuals', 'auto')  # absent from configs written before it existed
  if residuals not in RESIDUALS:
    raise ModelConfigError(f'unknown model.residuals {residuals!r}; known: ' + ', '.join(RESIDUALS))
  dense_grads = model_cfg.get('dense_grads', 'auto')
  if dense_grads not in dense.GRADS:
    raise ModelConfigError(f'unknown model.dense_grads {dense_grads!r}; known: '
                           + ', '.join(dense.GRADS))
  layer_loop = model_cfg.get('layer_loop', 'auto')
  if layer_loop not in LAYER_LOOPS:
    raise ModelConfigError(f'unknown model.layer_loop {layer_loop!r}; known: '
                           + ', '.join(LAYER_LOOPS))
  return SiTConfig(
      depth=depth, hidden=hidden, heads=heads, patch=patch, input_size=model_cfg.input_size,
      in_channels=model_cfg.in_channels, num_classes=model_cfg.num_classes,
      learn_sigma=model_cfg.learn_sigma, max_group_size=model_cfg.max_group_size,
      fixed_sample_ids=model_cfg.fixed_sample_ids, attention=model_cfg.attention,
      dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, remat=model_cfg.remat,
      residuals=residuals, dense_grads=dense_grads, layer_loop=layer_loop,
      time_convention=model_cfg.time_convention)


# What the backward pass keeps of each block (model.residuals), unless model.remat recomputes the
# whole block: every intermediate ('all': plain autodiff), or, in the sublayers around attention,
# only the outputs of the dense layers ('dots'; layer norms, modulation and GELU are recomputed
# from them; attention keeps its own residuals). 'auto' picks per platform. On CPU and GPU every
# saved elementwise intermediate is a trip through memory (stacked by the layer scan, written and
# read back), which costs more than recomputing it: SiT-S/2 train step on CPU 5.6 s -> 4.8 s; on
# an H200, SiT-XL/2 at batch 128 420 -> 484 images/s, and at batch 256 'all' needs 185 GiB while
# 'dots' takes 65 (BENCHMARKS.md). TPU keeps 'all' (its compiled step fits and is unmeasured
# here with 'dots').
RESIDUALS = ('auto', 'all', 'dots')
AUTO_RESIDUALS = {'cpu': 'dots', 'gpu': 'dots', 'cuda': 'dots'}


def sublayer_policy(cfg: SiTConfig, platform: str):
  """The `jax.checkpoint` policy of the sublayers around attention, or None (plain autodiff)."""
  residuals = AUTO_RESIDUALS.get(platform, 'all') if cfg.residuals == 'auto' else cfg.residuals
  if residuals != 'dots' or cfg.remat:
    return None
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if dense.resolve_grads(cfg.dense_grads, platform) == 'cpu_kernel':
    # The kernel path's dots sit inside a custom_vjp, out of the dot policy's sight: keep its
    # named outputs too, whatever jax's remat makes of custom_vjp calls.
    policy = jax.checkpoint_policies.save_from_both_policies(
        policy, jax.checkpoint_policies.save_only_these_names(dense.OUTPUT_NAME))
  return policy


# How the blocks run (model.layer_loop): one `lax.scan` over the stacked layers, or a Python loop
# over them ('unrolled'). Differentiated, a scan stacks every block's residuals into [depth, ...]
# buffers that XLA zero-fills and then writes slice by slice each step, and the backward pass
# slices them and the weights back out; unrolled, each block's tensors stand alone. On CPU that
# is ~7% of the SiT-S/2 train step, at twice the compile time (7 -> 16 s); forward passes gain
# nothing (SiT-B/2: same speed, compile 0.7 -> 4.5 s). So 'auto' unrolls the train step on CPU
# only; TPU and GPU keep the scan (compile time and memory at depth 28, unmeasured unrolled).
LAYER_LOOPS = ('auto', 'scan', 'unrolled')


def unrolled_layers(cfg: SiTConfig, platform: str, training: bool) -> bool:
  """Whether the blocks run as a Python loop (model.layer_loop; 'auto' as above)."""
  if cfg.layer_loop == 'auto':
    return training and platform == 'cpu'
  return cfg.layer_loop == 'unrolled'


# Fields of a checkpoint's meta['model'] that define the function (the rest are runtime choices).
META_FIELDS = ('input_size', 'in_channels', 'num_classes', 'learn_sigma', 'max_group_size',
               'fixed_sample_ids', 'time_convention')


def config_from_meta(model_meta: dict, **overrides) -> SiTConfig:
  """The SiTConfig a checkpoint's meta['model'] records (trainer or converter); `overrides` set
  runtime fields (dtype, attention) and win over the recorded ones."""
  _, depth, hidden, heads, patch = parse_name(model_meta['name'])
  fields = {k: model_meta[k] for k in META_FIELDS if k in model_meta}
  fields.update(overrides)
  return SiTConfig(depth=depth, hidden=hidden, heads=heads, patch=patch, **fields)


# --- initialisers, each with its logical axes ---------------------------------------------------

def _xavier(axes):
  return nnx.with_partitioning(nnx.initializers.xavier_uniform(), axes)


def _normal(axes, std=0.02):
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _zeros(axes):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _dense(cfg, n_in, n_out, kernel_init, rngs, bias_axes=(None,)):
  return dense.Linear(n_in, n_out, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=kernel_init,
                      bias_init=_zeros(bias_axes), rngs=rngs, grads=cfg.dense_grads)


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(hidden: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos table [grid*grid, hidden]: first half encodes the column, second the row."""
  omega = 1.0 / 10000 ** (np.arange(hidden // 4, dtype=np.float64) / (hidden / 4.0))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing='ij')

  def encode(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int = FREQ_DIM) -> jax.Array:
  """[cos(t f), sin(t f)] with f_k = 10000^(-k/(dim/2)); t is fed unscaled (SiT: [0, 1])."""
  freqs = jnp.exp(-math.log(10000) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters, eps 1e-6, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + 1e-6)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# --- modules ---------------------------------------------------------------------------------------

class TimestepEmbedder(nnx.Module):
  def __init__(self, cfg: SiTConfig, rngs: nnx.Rngs):
    self.mlp_0 = _dense(cfg, FREQ_DIM, cfg.hidden, _normal((None, 'embed')), rngs, ('embed',))
    self.mlp_2 = _dense(cfg, cfg.hidden, cfg.hidden, _normal(('embed', 'mlp')), rngs, ('mlp',))

  def __call__(self, t):
    return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_features(t))))


class Embedder(nnx.Module):
  """A lookup table (labels incl. the null class, or GroupDiff sample ids), N(0, 0.02) init."""

  def __init__(self, rows: int, cfg: SiTConfig, rngs: nnx.Rngs):
    self.embedding_table = nnx.Param(
        _normal(('vocab', 'embed'))(rngs.params(), (rows, cfg.hidden), jnp.dtype(cfg.param_dtype)))

  def __call__(self, ids):
    return jnp.take(self.embedding_table[...], ids, axis=0)


class Block(nnx.Module):
  """adaLN-Zero transformer block whose self-attention spans the tokens of a whole group."""

  def __init__(self, cfg: SiTConfig, rngs: nnx.Rngs):
    d, mlp = cfg.hidden, int(cfg.hidden * cfg.mlp_ratio)
    self.cfg = cfg
    self.qkv = _dense(cfg, d, 3 * d, _xavier(('embed', 'heads')), rngs, ('heads',))
    self.proj = _dense(cfg, d, d, _xavier(('heads', 'embed')), rngs, ('embed',))
    self.fc1 = _dense(cfg, d, mlp, _xavier(('embed', 'mlp')), rngs, ('mlp',))
    self.fc2 = _dense(cfg, mlp, d, _xavier(('mlp', 'embed')), rngs, ('embed',))
    self.adaLN_modulation = _dense(cfg, d, 6 * d, _zeros(('embed', 'mlp')), rngs, ('mlp',))

  def _qkv(self, x, c):
    """adaLN modulation vectors [n, 6*d] and the attention's q, k, v [n, t, 3, heads, head_dim]."""
    n, t, d = x.shape
    mods = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
    shift1, scale1 = jnp.split(mods, 6, axis=-1)[:2]
    h = _modulate(_layer_norm(x), shift1, scale1).astype(self.cfg.dtype)
    return mods, self.qkv(h).reshape(n, t, 3, self.cfg.heads, d // self.cfg.heads)

  def _rest(self, x, attended, mods):
    """Attention projection and residual, then the MLP sublayer; attended: [n, t, heads, hd]."""
    n, t, d = x.shape
    _, _, gate1, shift2, scale2, gate2 = jnp.split(mods, 6, axis=-1)
    x = x + gate1[:, None, :] * self.proj(attended.reshape(n, t, d)).astype(jnp.float32)
    h = _modulate(_layer_norm(x), shift2, scale2).astype(self.cfg.dtype)
    h = self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))
    return x + gate2[:, None, :] * h.astype(jnp.float32)

  def __call__(self, x, c, groups: Groups, with_mass: bool = False, policy=None):
    """policy: a `jax.checkpoint` policy for the two sublayers around attention (attention
    itself keeps its own residuals: recomputing it would cost more than it saves)."""
    qkv_fn, rest_fn = self._qkv, self._rest
    if policy is not None:
      # prevent_cse=False: the blocks run under a scan, which already keeps XLA from merging the
      # recomputation with the forward; the default's barriers would only block fusion.
      qkv_fn, rest_fn = (jax.checkpoint(f, policy=policy, prevent_cse=False)
                         for f in (qkv_fn, rest_fn))
    mods, qkv = qkv_fn(x, c)
    qkv = sharding.constrain(qkv, ('batch', 'tokens', None, 'heads', None))
    # GroupDiff (i): the M images of each group attend jointly over M*T tokens.
    attended = group_attention(qkv, groups, self.cfg.attention)   # [n, t, heads, head_dim]
    x = sharding.constrain(rest_fn(x, attended, mods), ('batch', 'tokens', None))
    if with_mass:  # diagnostics only (S_cross, uniform groups): the output above is unchanged
      (_, m), = groups.segments
      grouped = qkv.reshape(qkv.shape[0] // m, m * qkv.shape[1], *qkv.shape[2:])
      return x, member_attention(grouped[:, :, 0], grouped[:, :, 1], m)
    return x


class FinalLayer(nnx.Module):
  def __init__(self, cfg: SiTConfig, rngs: nnx.Rngs):
    self.adaLN_modulation = _dense(cfg, cfg.hidden, 2 * cfg.hidden, _zeros(('embed', 'mlp')),
                                   rngs, ('mlp',))
    self.linear = _dense(cfg, cfg.hidden, cfg.patch ** 2 * cfg.out_channels,
                         _zeros(('embed', None)), rngs)

  def __call__(self, x, c):
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32), 2, -1)
    return self.linear(_modulate(_layer_norm(x), shift, scale).astype(self.linear.dtype))


class SiT(nnx.Module):
  """SiT/DiT with group attention. Call: model(x, t, y, group_size=M, rng=key) -> [B, H, W, C_out]."""

  def __init__(self, cfg: SiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, c, d = cfg.patch, cfg.in_channels, cfg.hidden
    # Patch embedding as patchify + Dense: the official conv's xavier init uses these dense fans.
    self.x_embedder = _dense(cfg, p * p * c, d, _xavier((None, 'embed')), rngs, ('embed',))
    self.t_embedder = TimestepEmbedder(cfg, rngs)
    self.y_embedder = Embedder(cfg.num_classes + 1, cfg, rngs)  # row num_classes = null class
    # GroupDiff (ii): one learnable embedding per position in a group (no null row).
    self.sample_embedder = Embedder(cfg.max_group_size, cfg, rngs) if cfg.max_group_size else None

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(r):
      return Block(cfg, r)

    self.blocks = make_blocks(rngs)  # stacked: every parameter has a leading 'layers' axis
    self.final_layer = FinalLayer(cfg, rngs)

  def sample_ids(self, num_images: int, group_size: int, rng: jax.Array | None) -> jax.Array:
    """GroupDiff (ii): each group takes the first M entries of a fresh permutation of the table."""
    groups = num_images // group_size
    if self.cfg.fixed_sample_ids:
      return jnp.tile(jnp.arange(group_size), groups)
    if rng is None:
      raise ValueError('the model draws random sample-embedding ids: pass rng= (or set '
                       'model.fixed_sample_ids=True)')
    keys = jax.random.uniform(rng, (groups, self.cfg.max_group_size))
    return jnp.argsort(keys, axis=-1)[:, :group_size].reshape(-1)

  def group_sample_ids(self, groups: Groups, rng: jax.Array | None) -> jax.Array:
    """`sample_ids` of every segment (one key per segment; the key itself for one segment)."""
    if len(groups.segments) == 1:
      return self.sample_ids(*groups.segments[0], rng)
    count = len(groups.segments)
    keys = [None] * count if rng is None else jax.random.split(rng, count)
    return jnp.concatenate([self.sample_ids(n, m, key)
                            for (n, m), key in zip(groups.segments, keys)])

  def patchify(self, x):
    n, h, w, c = x.shape
    p = self.cfg.patch
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)  # token vector order (p_row, p_col, c)

  def unpatchify(self, x):
    n, p, c = x.shape[0], self.cfg.patch, self.cfg.out_channels
    g = self.cfg.input_size // p
    x = x.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, c)

  def __call__(self, x, t, y, *, group_size: int | Groups = 1, rng: jax.Array | None = None,
               sample_ids: jax.Array | None = None, group_blocks: int | None = None,
               return_attention_mass: bool = False, training: bool = False):
    """group_size: M (uniform groups) or a `Groups` (static mixed structure, one pass).
    group_blocks: None = group attention in every block; k = only in the first k (static).
    return_attention_mass (diagnostics): also return [depth, B/M, M, M], each block's
    `attention.member_attention` (the attention mass between the images of each group).
    training: the pass the train step differentiates (selects model.layer_loop='auto')."""
    cfg = self.cfg
    n = x.shape[0]
    groups = as_groups(group_size, n)
    if cfg.max_group_size and groups.max_group_size > cfg.max_group_size:
      raise ValueError(f'group size {groups.max_group_size} exceeds model.max_group_size '
                       f'{cfg.max_group_size}')
    if cfg.time_convention == 'noise_at_0':  # original SiT weights: noise at t = 0
      t = 1.0 - t
    x = sharding.constrain(x, ('batch', None, None, None))
    h = self.x_embedder(self.patchify(x.astype(cfg.dtype))).astype(jnp.float32)
    h = h + sincos_pos_embed(cfg.hidden, cfg.input_size // cfg.patch)[None]
    c = self.t_embedder(t) + self.y_embedder(y)
    if self.sample_embedder is not None:
      if sample_ids is None:
        sample_ids = self.group_sample_ids(groups, rng)
      c = c + self.sample_embedder(sample_ids)
    c = c.astype(jnp.float32)

    graphdef, layers = nnx.split(self.blocks)
    platform = active_platform()
    policy = sublayer_policy(cfg, platform)
    unrolled = unrolled_layers(cfg, platform, training)

    def run_blocks(h, layers, size):
      def one_block(h, layer):
        # FSDP: this layer's weights gathered in the compute dtype just before use.
        block = nnx.merge(graphdef, sharding.gather_for_compute(layer, cfg.dtype))
        if return_attention_mass:  # the per-layer mass leaves the scan as its stacked output
          return block(h, c, size, with_mass=True)
        return block(h, c, size, policy=policy), None
      if cfg.remat:
        one_block = jax.checkpoint(one_block, policy=jax.checkpoint_policies.nothing_saveable)
      if not unrolled:
        return jax.lax.scan(one_block, h, layers)
      outputs = []
      for i in range(jax.tree.leaves(layers)[0].shape[0]):
        h, out = one_block(h, jax.tree.map(lambda a, i=i: a[i], layers))
        outputs.append(out)
      return h, (jnp.stack(outputs) if return_attention_mass else None)

    # Inference group schedule (the paper's Table 2 ablation): only the first `group_blocks`
    # blocks attend across the group, the rest per image. Two scans over the stacked layers,
    # because the attention reshape (a static shape) differs between the two parts.
    k = cfg.depth if group_blocks is None else min(max(group_blocks, 0), cfg.depth)
    if k == cfg.depth or groups.max_group_size == 1:
      h, masses = run_blocks(h, layers, groups)
    else:
      if return_attention_mass:
        raise ValueError('return_attention_mass needs group attention in every block '
                         '(group_blocks=None)')
      if k:
        h = run_blocks(h, jax.tree.map(lambda a: a[:k], layers), groups)[0]
      h = run_blocks(h, jax.tree.map(lambda a: a[k:], layers), Groups.uniform(n, 1))[0]
    out = self.unpatchify(self.final_layer(h, c)).astype(jnp.float32)
    if cfg.time_convention == 'noise_at_0':  # d/dt flips sign with t -> 1 - t (velocity only)
      out = out.at[..., :cfg.in_channels].multiply(-1.0)
    return (out, masses) if return_attention_mass else out


def create(cfg: SiTConfig, seed: int = 0) -> SiT:
  """Builds the model with logical sharding metadata but without placing it on devices."""
  with nnx.use_eager_sharding(False):
    return SiT(cfg, rngs=nnx.Rngs(params=seed))


def count_params(model: SiT) -> int:
  """Trainable parameters (the fixed position embedding is not a parameter)."""
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
