"""The pre-norm ViT image towers behind DINOv2 and CLIP, in Flax NNX.

One module covers both: DINOv2 adds LayerScale, biases on the patch projection, SwiGLU for ViT-g and
position-embedding interpolation for other resolutions; CLIP adds a LayerNorm before the blocks,
quick-GELU and a linear projection of the CLS token. Both return the final-LayerNorm CLS token.
Checkpoint loading (Hugging Face layout) lives in models/encoders.py.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  hidden: int
  depth: int
  heads: int
  mlp_hidden: int
  patch: int
  grid: int                     # side of the trained position-embedding grid (image_size // patch)
  mlp: str = 'gelu'             # a key of MLP_ACTIVATIONS, or 'swiglu'
  channels: int = 3
  qkv_bias: bool = True
  patch_bias: bool = True
  layerscale: bool = False      # DINOv2: residual branches scaled by a learned per-channel gamma
  pre_norm: bool = False        # CLIP: LayerNorm on the embeddings before the first block
  ln_eps: float = 1e-6
  projection_dim: int = 0       # CLIP: visual_projection of the CLS token (0 = none)
  interpolate_pos: bool = True  # DINOv2 resizes position embeddings; CLIP needs the trained size

  @property
  def embed_dim(self) -> int:
    return self.projection_dim or self.hidden


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# 'gelu' is the exact (erf) GELU, as torch.nn.GELU() and HF's ACT2FN['gelu'].
MLP_ACTIVATIONS = {
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'quick_gelu': _quick_gelu,
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
}


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic-convolution weights for taps at offsets -1, 0, 1, 2 (torch's bicubic, A=-0.75)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] matrix of torch.nn.functional.interpolate(mode='bicubic', align_corners=False).

  Source coordinate (i + 0.5) * in/out - 0.5 is not clamped; the four taps are clamped to the
  edge (replicate border), as in torch's upsample_bicubic2d. Built in float64 at trace time.
  """
  scale = size_in / size_out
  src = (np.arange(size_out) + 0.5) * scale - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)
  mat = np.zeros((size_out, size_in))
  for tap in range(4):
    idx = np.clip(base.astype(int) - 1 + tap, 0, size_in - 1)
    np.add.at(mat, (np.arange(size_out), idx), w[:, tap])
  return mat


class Attention(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, dtype, precision, rngs: nnx.Rngs):
    lin = functools.partial(nnx.Linear, cfg.hidden, cfg.hidden, dtype=dtype, precision=precision,
                            rngs=rngs)
    self.q, self.k, self.v = (lin(use_bias=cfg.qkv_bias) for _ in range(3))
    self.o = lin(use_bias=True)
    self.heads, self.precision = cfg.heads, precision

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision)
    logits = logits.astype(jnp.float32) * (d // self.heads) ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # softmax in float32 for any dtype
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v, precision=self.precision)
    return self.o(out.reshape(b, t, d))


class Mlp(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, dtype, precision, rngs: nnx.Rngs):
    lin = functools.partial(nnx.Linear, dtype=dtype, precision=precision, rngs=rngs)
    self.swiglu = cfg.mlp == 'swiglu'
    if self.swiglu:
      self.gate = lin(cfg.hidden, cfg.mlp_hidden)
      self.up = lin(cfg.hidden, cfg.mlp_hidden)
    else:
      self.act = MLP_ACTIVATIONS[cfg.mlp]
      self.fc1 = lin(cfg.hidden, cfg.mlp_hidden)
    self.fc2 = lin(cfg.mlp_hidden, cfg.hidden)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.swiglu:
      return self.fc2(jax.nn.silu(self.gate(x)) * self.up(x))
    return self.fc2(self.act(self.fc1(x)))


class Block(nnx.Module):
  def __init__(self, cfg: ViTConfig, *, dtype, precision, rngs: nnx.Rngs):
    # use_fast_variance=False: E[x^2]-E[x]^2 loses the 1e-5 parity with torch on wide layers.
    norm = functools.partial(nnx.LayerNorm, cfg.hidden, epsilon=cfg.ln_eps, dtype=dtype,
                             use_fast_variance=False, rngs=rngs)
    self.norm1, self.norm2 = norm(), norm()
    self.attn = Attention(cfg, dtype=dtype, precision=precision, rngs=rngs)
    self.mlp = Mlp(cfg, dtype=dtype, precision=precision, rngs=rngs)
    self.layerscale = cfg.layerscale
    if cfg.layerscale:
      self.gamma1 = nnx.Param(jnp.ones((cfg.hidden,)))
      self.gamma2 = nnx.Param(jnp.ones((cfg.hidden,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attn(self.norm1(x))
    x = x + (h * self.gamma1[...].astype(h.dtype) if self.layerscale else h)
    h = self.mlp(self.norm2(x))
    return x + (h * self.gamma2[...].astype(h.dtype) if self.layerscale else h)


class VisionTransformer(nnx.Module):
  """images [B, H, W, C] (already normalised) -> CLS embedding [B, cfg.embed_dim]."""

  def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, precision=None,
               rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    # A patch-size-stride convolution is a linear map of flattened (p, p, C) patches.
    self.patch_embed = nnx.Linear(cfg.patch * cfg.patch * cfg.channels, cfg.hidden,
                                  use_bias=cfg.patch_bias, dtype=dtype, precision=precision,
                                  rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((cfg.hidden,)))
    self.pos_embed = nnx.Param(jnp.zeros((1 + cfg.grid * cfg.grid, cfg.hidden)))
    norm = functools.partial(nnx.LayerNorm, cfg.hidden, epsilon=cfg.ln_eps, dtype=dtype,
                             use_fast_variance=False, rngs=rngs)
    self.pre_norm = norm() if cfg.pre_norm else None
    self.blocks = nnx.List([Block(cfg, dtype=dtype, precision=precision, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm = norm()
    self.proj = (nnx.Linear(cfg.hidden, cfg.projection_dim, use_bias=False, dtype=dtype,
                            precision=precision, rngs=rngs) if cfg.projection_dim else None)

  def position_embeddings(self, gh: int, gw: int) -> jax.Array:
    """[1 + gh*gw, D]: the trained grid, bicubically resized when the patch grid differs."""
    cfg, pos = self.cfg, self.pos_embed[...]
    if (gh, gw) == (cfg.grid, cfg.grid):
      return pos
    if not cfg.interpolate_pos:
      raise ValueError(f'input patch grid {gh}x{gw} differs from the trained {cfg.grid}x{cfg.grid}'
                       ' and this encoder does not interpolate position embeddings')
    grid = pos[1:].reshape(cfg.grid, cfg.grid, -1).astype(jnp.float32)
    mh = jnp.asarray(bicubic_matrix(cfg.grid, gh), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(cfg.grid, gw), jnp.float32)
    grid = jnp.einsum('Hh,hwd,Ww->HWd', mh, grid, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:1], grid.reshape(gh * gw, -1).astype(pos.dtype)], axis=0)

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, h, w, c = images.shape
    gh, gw, p = h // cfg.patch, w // cfg.patch, cfg.patch
    x = images[:, :gh * p, :gw * p].astype(self.dtype)  # a strided conv drops the remainder
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    x = self.patch_embed(x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, cfg.hidden))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings(gh, gw).astype(x.dtype)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    for block in self.blocks:
      x = block(x)
    out = self.norm(x[:, 0])  # LayerNorm is per token: normalising only CLS gives the same value
    return self.proj(out) if self.proj is not None else out
